"""The synthetic presets and :func:`synthesize`, the one entry point the CLI calls."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import tcga_brca, tiny
from .generator import HistologyModel, HistologyParams
from .writer import write_cohort

log = logging.getLogger(__name__)

PRESETS = {  # name -> (preset dataclass, cohort builder)
    "tiny": (tiny.TinyPreset, tiny.build),
    "tcga-brca": (tcga_brca.TcgaBrcaPreset, tcga_brca.build),
}


def make_preset(preset: str, **overrides: Any) -> Any:
    """The preset's dataclass with ``overrides`` applied.

    An override may name a preset field (e.g. ``task``, ``max_slides_per_site``) or a field of
    :class:`~momkd_fed.synth.generator.HistologyParams` (e.g. ``feature_dim``, ``median_patches``).
    Lists are accepted for tuple fields.
    """
    if preset not in PRESETS:
        raise ConfigError(f"synth: unknown preset {preset!r}; allowed values: {', '.join(PRESETS)}")
    cls = PRESETS[preset][0]
    base = cls()
    top = {f.name: f for f in dataclasses.fields(cls)}
    hist = {f.name for f in dataclasses.fields(HistologyParams)}
    mine, histo = {}, {}
    for key, value in overrides.items():
        if isinstance(value, list):
            value = tuple(value)
        if key in top and key != "histology":
            mine[key] = value
        elif key in hist:
            histo[key] = value
        else:
            allowed = sorted((set(top) - {"histology"}) | hist)
            raise ConfigError(f"synth {preset}: unknown override {key!r}; allowed: {', '.join(allowed)}")
    if "shared_data" in mine and mine["shared_data"] is not None:
        mine["shared_data"] = Path(mine["shared_data"])
    return dataclasses.replace(base, **mine, histology=dataclasses.replace(base.histology, **histo))


def synthesize(preset: str, out: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a synthetic multi-site cohort under ``out`` and return ``out/federation.yaml``.

    Parameters
    ----------
    preset : "tiny" or "tcga-brca".
    out : output folder (created; existing files of the same names are replaced).
    seed : cohort seed; the same seed writes byte-identical manifests/genomics and identical h5 arrays.
    **overrides : preset or histology fields (see :func:`make_preset`), e.g. ``task="pr"``,
        ``shared_data=Path(...)``, ``max_slides_per_site=20``, ``median_patches=150``.
    """
    start = time.perf_counter()
    params = make_preset(preset, **overrides)
    cohort = PRESETS[preset][1](params, seed)
    model = HistologyModel(params.histology, n_genes=cohort.genes.shape[1], seed=seed)
    model.fit_programs(cohort.genes.to_numpy())
    path = write_cohort(cohort, model, Path(out), seed)
    log.info("synth %s: %d sites, %d slides written to %s in %.1f s", preset, len(cohort.sites),
             sum(len(s.slides) for s in cohort.sites), out, time.perf_counter() - start)
    return path
