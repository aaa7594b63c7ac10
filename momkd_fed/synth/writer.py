"""Writes a synthetic cohort to disk in the formats users already have (data-formats.md).

Layout under ``out``::

    <site>/features/20x_256px_0px_overlap/features_<encoder>/<slide_id>.h5   TRIDENT patch features
    <site>/manifest.csv                                                    case_id, slide_id, labels, split
    <site>/omics.csv                                                       case_id + genes (genomic sites only)
    federation.yaml                                                        config for momkd_fed.config.load_config
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..config import SplitConfig
from ..data.h5 import write_trident_h5
from .cohort import Cohort, assign_splits
from .generator import PATCH_SIZE, TARGET_MAGNIFICATION, HistologyModel, stable_rng

log = logging.getLogger(__name__)

FEATURES_SUBDIR = f"{TARGET_MAGNIFICATION}x_{PATCH_SIZE}px_0px_overlap"
FLOAT_FORMAT = "%.5f"  # genomics CSV precision (byte-identical across runs)


def features_dir(out: Path, site: str, encoder: str) -> Path:
    """The TRIDENT features folder of ``site``."""
    return out / site / "features" / FEATURES_SUBDIR / f"features_{encoder}"


def write_cohort(cohort: Cohort, model: HistologyModel, out: Path, seed: int) -> Path:
    """Generate every slide's bag and write features, manifests, genomics and the federation YAML.

    Parameters
    ----------
    cohort : the preset's cases, labels and genomics.
    model : a histology model already fitted (``fit_programs``) on ``cohort.genes``.
    out : output folder (created).
    seed : cohort seed; each slide's bag depends only on (seed, slide_id), so subsets reproduce.

    Returns
    -------
    Path of ``out/federation.yaml``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    programs = pd.DataFrame(model.programs(cohort.genes.to_numpy()), index=cohort.genes.index)  # (N, K)
    split_cfg = SplitConfig(**cohort.config.get("split", {}))
    site_entries = []
    for site in cohort.sites:
        slides = site.slides.sort_values("slide_id", kind="stable").reset_index(drop=True)
        rng = stable_rng(seed, "split", site.name)
        slides["split"] = assign_splits(slides, cohort.stratify_column, split_cfg.val_fraction,
                                        split_cfg.test_fraction, rng)
        fdir = features_dir(out, site.name, cohort.encoder)
        for row in slides.itertuples(index=False):
            srng = stable_rng(seed, "slide", row.slide_id)
            n = model.bag_size(srng)
            sample = model.slide(srng, site.name, programs.loc[row.case_id].to_numpy(), n,
                                 level0_magnification=int(row.level0_magnification))
            write_trident_h5(fdir / f"{row.slide_id}.h5", sample.features, sample.coords,
                             patch_size=PATCH_SIZE, patch_size_level0=sample.patch_size_level0,
                             level0_magnification=sample.level0_magnification,
                             target_magnification=TARGET_MAGNIFICATION, overlap=0,
                             level0_width=sample.level0_width, level0_height=sample.level0_height,
                             encoder=cohort.encoder)
        manifest = slides[["case_id", "slide_id", *cohort.label_columns, "split"]]
        manifest.to_csv(out / site.name / "manifest.csv", index=False)
        entry = {"name": site.name, "manifest": f"{site.name}/manifest.csv",
                 "features_dir": f"{site.name}/features", "omics": ""}
        if site.has_omics:
            cases = sorted(slides["case_id"].unique())
            omics = cohort.genes.loc[cases].astype(np.float32)
            omics.index.name = "case_id"
            omics.to_csv(out / site.name / "omics.csv", float_format=FLOAT_FORMAT)
            entry["omics"] = f"{site.name}/omics.csv"
        site_entries.append(entry)
        log.info("site %s: %d slides, %d cases, genomics=%s", site.name, len(slides),
                 slides["case_id"].nunique(), site.has_omics)
    path = out / "federation.yaml"
    write_federation_yaml(path, {**cohort.config, "sites": site_entries}, cohort.header)
    return path


def write_federation_yaml(path: Path, config: dict, header: list[str]) -> None:
    """Write ``config`` as YAML with ``header`` as leading comment lines (atomic)."""
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=110)
    text = "".join(f"# {line}\n" if line else "#\n" for line in header) + "\n" + body
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
