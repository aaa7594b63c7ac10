"""The ``tiny`` preset: three small hospitals with latent-factor genomics, for tests and quick demos.

Cases have latent biology z ~ N(m_site * e_0, I_4). The label is ``positive`` when z_0 + 0.5 z_1 + noise > 0
(same rule everywhere; sites differ in prevalence only through the mean m_site of z_0: genuine label shift).
Genes are a fixed random linear mix of z (z_0 loaded most strongly, like the dominant luminal axis of breast
cancer) plus gene noise and a small per-site batch offset, so a linear model on the genes reaches AUC ~0.9.
Histology follows :mod:`momkd_fed.synth.generator`. A few patients have two slides, a few labels are empty or
``Indeterminate``, ~5% of slides are 20x-native scans, and one site holds no genomics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import pandas as pd

from ..errors import ConfigError
from .cohort import Cohort, SiteCohort
from .generator import HistologyParams, stable_rng


@dataclass(frozen=True)
class TinyPreset:
    """Knobs of the tiny cohort (any field can be overridden by ``synthesize(..., field=value)``)."""

    sites: tuple[str, ...] = ("hospital_a", "hospital_b", "hospital_c")
    # ~300 slides: ~180 train / ~45 val / ~60 test. At half this size (150 slides, 26 test) a test AUC moved by
    # +-0.1 between seeds and MoMKD (graph encoder + memory) was data-starved: 0.61/0.41/0.49 vs ABMIL 0.79/0.52/0.73
    slides_per_site: tuple[int, ...] = (96, 120, 84)
    prevalence: tuple[float, ...] = (0.25, 0.5, 0.65)  # expected positive fraction per site
    histology_only: tuple[str, ...] = ("hospital_c",)  # sites that write no genomics
    n_genes: int = 64
    n_latent: int = 4
    lead_loading: float = 2.0  # gene loading scale of z_0 relative to the other factors
    gene_noise: float = 1.0  # per-gene noise std (before the genes are rescaled to unit scale)
    site_gene_shift: float = 0.2  # per-site, per-gene batch offset std (omics site effect, a few % of variance)
    label_noise: float = 0.7  # std of the noise in the label rule
    two_slide_fraction: float = 0.06  # patients with two slides
    missing_fraction: float = 0.04  # patients with an empty label
    indeterminate_fraction: float = 0.03  # patients labelled "Indeterminate"
    native_20x_fraction: float = 0.05  # slides scanned at 20x native
    histology: HistologyParams = field(default_factory=lambda: HistologyParams(n_programs=4))


def build(preset: TinyPreset, seed: int) -> Cohort:
    """Draw the tiny cohort's cases, labels and genomics (no histology yet)."""
    if not len(preset.sites) == len(preset.slides_per_site) == len(preset.prevalence):
        raise ConfigError("tiny: sites, slides_per_site and prevalence must have the same length "
                          f"(got {len(preset.sites)}, {len(preset.slides_per_site)}, {len(preset.prevalence)})")
    rng = stable_rng(seed, "tiny")
    loadings = rng.standard_normal((preset.n_genes, preset.n_latent))  # (G, Z)
    loadings[:, 0] *= preset.lead_loading
    gene_scale = np.sqrt(preset.lead_loading**2 + preset.n_latent - 1 + preset.gene_noise**2)
    rule = np.zeros(preset.n_latent)
    rule[:2] = (1.0, 0.5)
    total_sd = np.sqrt(rule @ rule + preset.label_noise**2)
    gene_names = [f"GENE{i + 1:03d}" for i in range(preset.n_genes)]

    sites, gene_rows, case_ids = [], [], []
    for name, n_slides, prev in zip(preset.sites, preset.slides_per_site, preset.prevalence):
        srng = stable_rng(seed, "tiny-site", name)
        n_two = int(round(n_slides * preset.two_slide_fraction / (1 + preset.two_slide_fraction)))
        n_cases = n_slides - n_two
        shift = NormalDist().inv_cdf(prev) * total_sd  # mean of z_0 giving the expected prevalence
        z = srng.standard_normal((n_cases, preset.n_latent))  # (N, Z)
        z[:, 0] += shift
        y = (z @ rule + preset.label_noise * srng.standard_normal(n_cases)) > 0  # (N,)
        batch = srng.standard_normal(preset.n_genes) * preset.site_gene_shift  # (G,)
        genes = (z @ loadings.T + preset.gene_noise * srng.standard_normal((n_cases, preset.n_genes))) / gene_scale
        gene_rows.append(genes + batch)  # (N, G)
        cases = [f"{name}-{i + 1:04d}" for i in range(n_cases)]
        case_ids += cases
        labels = np.where(y, "positive", "negative").astype(object)
        u = srng.random(n_cases)
        labels[u < preset.missing_fraction] = np.nan
        labels[(u >= preset.missing_fraction) & (u < preset.missing_fraction + preset.indeterminate_fraction)] = \
            "Indeterminate"
        two = set(srng.choice(n_cases, size=n_two, replace=False).tolist())
        rows = []
        for i, case in enumerate(cases):
            for k in range(2 if i in two else 1):
                mag = 20 if srng.random() < preset.native_20x_fraction else 40
                rows.append({"case_id": case, "slide_id": f"{case}-DX{k + 1}", "label": labels[i],
                             "level0_magnification": mag})
        sites.append(SiteCohort(name=name, slides=pd.DataFrame(rows), has_omics=name not in preset.histology_only))
    genes = pd.DataFrame(np.concatenate(gene_rows), index=pd.Index(case_ids, name="case_id"), columns=gene_names)
    h = preset.histology
    return Cohort(sites=sites, genes=genes, label_columns=["label"], stratify_column="label",
                  encoder="synthetic", config=_config(preset, seed), header=_header(preset, seed, h))


def _config(preset: TinyPreset, seed: int) -> dict:
    return {
        "data": {"label_column": "label", "label_map": {"negative": 0, "positive": 1},
                 "feature_dim": preset.histology.feature_dim},
        "split": {"seed": seed},
        # D=64 (two 32-channel heads), a 32-d memory sphere with 8 slots per class: at D=32/S=16/K=4 the memory
        # could not hold the background tissue types and the label phenotypes apart (MoMKD test AUC ~0.76 vs
        # ~0.86-0.89 here on the same cohorts); ABMIL gets the same width. 12 epochs: both models still improved
        # at epoch 8. One torch thread: these ops are tiny, and two threads on a busy 2-core machine made an epoch
        # ~10x slower (17-43 s instead of 2-3 s).
        "model": {"hidden_dim": 64, "heads": 2, "shared_dim": 32, "omics_hidden": 64, "omics_embed_dim": 64,
                  "cls_hidden": 32, "abmil_hidden": 64},
        "memory": {"slots": 8},
        "train": {"epochs": 12, "lr": 1e-3, "patience": 12, "threads": 1},
        "federation": {"rounds": 3, "local_epochs": 1, "min_sites": len(preset.sites)},
    }


def _header(preset: TinyPreset, seed: int, h: HistologyParams) -> list[str]:
    genomic = [s for s in preset.sites if s not in preset.histology_only]
    return [
        "momkd-fed synthetic federation: preset 'tiny' (written by `momkd-fed synth`; do not edit by hand,",
        "regenerate instead). Load with momkd_fed.config.load_config(path); site paths are relative to this file.",
        f"seed {seed}; sites {', '.join(preset.sites)} ({', '.join(map(str, preset.slides_per_site))} slides,",
        f"expected positive fraction {', '.join(map(str, preset.prevalence))});",
        f"genomics at {', '.join(genomic)} only.",
        f"Patch features: D={h.feature_dim}, bags log-normal (median {h.median_patches}, "
        f"{h.min_patches}-{h.max_patches} patches), {preset.n_genes} latent-factor genes.",
        "Label: 'label' positive/negative; empty and 'Indeterminate' labels are excluded by the reader.",
        "Model dims are small so that pooled training takes seconds on a CPU.",
    ]
