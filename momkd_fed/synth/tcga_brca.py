"""The ``tcga-brca`` preset: TCGA-BRCA regions as hospitals, REAL genomics and labels, synthetic histology.

Sources (read in place from ``shared_data/tcga_brca``, never copied into the project):
``tcga_brca_labels_joined.csv`` (one row per slide: region, her2_calc, pr_ihc, odx85, mag_approx) and
``porpoise_tcga_brca_all_clean_mutsig.csv.zip`` (RNA-seq z-scores per slide; its slide ids carry ``.svs``).
Slides = the labels rows that have omics (1,022 slides, 956 patients), one site per TCGA region. Region
``Other`` (10 slides with omics from Sao Paulo, Pakistan and Nigeria, none with a HER2 label) has no
geographically nearest region and is too small to be a site: it is dropped by default (``other_region`` can
name a region to merge it into instead).

Genomics: the ``*_rnaseq`` columns clipped to [-10, 10]; the panel is the ``n_genes`` (default 768) genes of
highest variance over all cases (unsupervised; labels are never looked at), written without the ``_rnaseq``
suffix. Labels are written as they are (``her2_calc`` positive/negative/equivocal, ``pr_ihc``
Positive/Negative/Indeterminate/[Not Evaluated], ``odx85`` H/L; missing = empty); the YAML's label map lists
only the two classes, so everything else is excluded by the reader. 20x-native slides come from the real
``mag_approx`` (20 -> level-0 magnification 20). The histology of every slide, including slides of
histology-only sites (Canada and Midwest by default: they write no omics.csv), is generated from the case's
real genomic profile by :mod:`momkd_fed.synth.generator` at D = 1536 (UNI2-h width). Bag sizes are log-normal
with median 300 patches (real 20x/256 px bags are ~10k): this keeps the benchmarks feasible on 2 CPU cores.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError
from .cohort import Cohort, SiteCohort
from .generator import HistologyParams, stable_rng

LABELS_FILE = "tcga_brca/tcga_brca_labels_joined.csv"
OMICS_FILE = "tcga_brca/porpoise_tcga_brca_all_clean_mutsig.csv.zip"
TASKS = {  # task -> (manifest label column, label map)
    "her2": ("her2_calc", {"negative": 0, "positive": 1}),
    "pr": ("pr_ihc", {"Negative": 0, "Positive": 1}),
    "odx": ("odx85", {"L": 0, "H": 1}),
}
LABEL_COLUMNS = ["her2_calc", "pr_ihc", "odx85"]


def default_shared_data() -> Path:
    """``$MOMKD_SHARED_DATA``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("MOMKD_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass(frozen=True)
class TcgaBrcaPreset:
    """Knobs of the TCGA-BRCA cohort (any field can be overridden by ``synthesize(..., field=value)``)."""

    shared_data: Path | None = None  # folder holding tcga_brca/; None = default_shared_data()
    task: str = "her2"  # her2, pr or odx: the YAML's label column (manifests carry all three)
    n_genes: int = 768  # highest-variance rnaseq genes kept
    clip: float = 10.0  # rnaseq z-scores clipped to [-clip, clip]
    histology_only: tuple[str, ...] = ("canada", "midwest")  # sites that write no genomics
    other_region: str = "drop"  # "drop", or the region that absorbs region 'Other'
    max_slides_per_site: int = 0  # keep at most this many slides per site (whole patients; 0 = all)
    histology: HistologyParams = field(default_factory=lambda: HistologyParams(
        feature_dim=1536, median_patches=300, patches_sigma=0.5, min_patches=60, max_patches=1500,
        # site effects sized for ~80% site decodability from slide means at D=1536 (measured; module docstring)
        site_shift_norm=0.6, stain_mean_norm=0.5, site_jitter_norm=0.5))


def _read_sources(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    labels_path, omics_path = root / LABELS_FILE, root / OMICS_FILE
    for p in (labels_path, omics_path):
        if not p.is_file():
            raise DataError(str(p), "TCGA-BRCA source file not found",
                            "pass shared_data=<folder holding tcga_brca/> or set MOMKD_SHARED_DATA")
    labels = pd.read_csv(labels_path, dtype={c: str for c in LABEL_COLUMNS})
    with zipfile.ZipFile(omics_path) as z:
        omics = pd.read_csv(io.BytesIO(z.read(z.namelist()[0])), index_col=0)
    omics["slide_id"] = omics["slide_id"].str.replace(r"\.svs$", "", regex=True)
    return labels, omics


def build(preset: TcgaBrcaPreset, seed: int) -> Cohort:
    """Read the real labels and genomics and lay out one site per TCGA region (no histology yet)."""
    if preset.task not in TASKS:
        raise ConfigError(f"tcga-brca: task {preset.task!r} is unknown; allowed values: {', '.join(TASKS)}")
    root = Path(preset.shared_data) if preset.shared_data is not None else default_shared_data()
    labels, omics = _read_sources(root)
    rna = [c for c in omics.columns if c.endswith("_rnaseq")]
    slides = labels.merge(omics[["slide_id", "case_id"]], on=["slide_id", "case_id"], how="inner")
    slides["region"] = slides["region"].str.lower()
    if preset.other_region == "drop":
        slides = slides[slides["region"] != "other"]
    else:
        target = preset.other_region.lower()
        if target not in set(slides["region"]) - {"other"}:
            raise ConfigError(f"tcga-brca: other_region {preset.other_region!r} is not a region; allowed: drop, "
                              f"{', '.join(sorted(set(slides['region']) - {'other'}))}")
        slides.loc[slides["region"] == "other", "region"] = target
    slides["level0_magnification"] = np.where(slides["mag_approx"] == 20, 20, 40)

    per_case = omics.drop_duplicates("case_id").set_index("case_id")[rna].clip(-preset.clip, preset.clip)
    per_case = per_case.loc[sorted(slides["case_id"].unique())]
    order = per_case.var(axis=0).sort_values(ascending=False, kind="stable")
    panel = [c for c in rna if c in set(order.index[: preset.n_genes])]  # keep the file's gene order
    genes = per_case[panel].rename(columns=lambda c: c[: -len("_rnaseq")]).astype(np.float64)

    sites = []
    for region in sorted(slides["region"].unique(), key=lambda r: (-int((slides["region"] == r).sum()), r)):
        site_slides = slides[slides["region"] == region]
        if preset.max_slides_per_site:
            site_slides = _subset(site_slides, preset.max_slides_per_site, stable_rng(seed, "subset", region))
        frame = site_slides[["case_id", "slide_id", *LABEL_COLUMNS, "level0_magnification"]].reset_index(drop=True)
        sites.append(SiteCohort(name=region, slides=frame, has_omics=region not in preset.histology_only))
    unknown = set(preset.histology_only) - {s.name for s in sites}
    if unknown:
        raise ConfigError(f"tcga-brca: histology_only names unknown sites {sorted(unknown)}; sites: "
                          f"{', '.join(s.name for s in sites)}")
    kept = sorted({c for s in sites for c in s.slides["case_id"]})
    column, label_map = TASKS[preset.task]
    return Cohort(sites=sites, genes=genes.loc[kept], label_columns=list(LABEL_COLUMNS), stratify_column=column,
                  encoder="synthetic_uni_v2", config=_config(preset, seed, sites, column, label_map),
                  header=_header(preset, seed, sites, column))


def _subset(slides: pd.DataFrame, max_slides: int, rng: np.random.Generator) -> pd.DataFrame:
    """Whole patients, in a seeded random order, while the slide count stays <= ``max_slides``."""
    cases = np.array(sorted(slides["case_id"].unique()))
    counts = slides.groupby("case_id").size()
    keep, total = [], 0
    for case in cases[rng.permutation(len(cases))]:
        if total + counts[case] <= max_slides:
            keep.append(case)
            total += counts[case]
    return slides[slides["case_id"].isin(keep)]


def _config(preset: TcgaBrcaPreset, seed: int, sites: list[SiteCohort], column: str, label_map: dict) -> dict:
    return {
        "data": {"label_column": column, "label_map": dict(label_map), "feature_dim": preset.histology.feature_dim},
        "split": {"seed": seed},
        "federation": {"min_sites": len(sites)},
    }


def _header(preset: TcgaBrcaPreset, seed: int, sites: list[SiteCohort], column: str) -> list[str]:
    h = preset.histology
    lines = [
        f"momkd-fed synthetic federation: preset 'tcga-brca', task {preset.task!r} (label column {column!r}),",
        "written by `momkd-fed synth`; regenerate instead of editing.",
        "Load with momkd_fed.config.load_config(path); site paths are relative to this file.",
        "REAL TCGA-BRCA labels and RNA-seq (one site per TCGA region; region 'Other' "
        + ("dropped" if preset.other_region == "drop" else f"merged into {preset.other_region!r}") + ");",
        f"SYNTHETIC histology (D={h.feature_dim}, bags log-normal, median {h.median_patches} patches) generated",
        "from each case's real genomic profile. Manifests carry her2_calc, pr_ihc and odx85 for every task.",
        f"seed {seed}; {preset.n_genes} highest-variance rnaseq genes (unsupervised), "
        f"clipped to +-{preset.clip:g}.",
        "sites (slides, genomics):",
    ]
    for s in sites:
        lines.append(f"  {s.name}: {len(s.slides)} slides, " + ("genomics" if s.has_omics else "histology only"))
    return lines
