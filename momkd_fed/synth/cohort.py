"""What a preset hands to the writer: cases, slides, labels and genomics per site, before any histology exists."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class SiteCohort:
    """One synthetic hospital.

    Attributes
    ----------
    name : site name (also its folder name).
    slides : one row per slide with ``case_id``, ``slide_id``, the label columns and ``level0_magnification``
        (40 or 20: the scan's native magnification).
    has_omics : whether the site holds genomics (an ``omics.csv`` is written only then).
    """

    name: str
    slides: pd.DataFrame
    has_omics: bool


@dataclass
class Cohort:
    """Everything a preset decides; the writer adds histology and files.

    Attributes
    ----------
    sites : the sites, in federation order.
    genes : (N cases, G genes) frame indexed by ``case_id``: every case's genomic profile, including cases of
        histology-only sites (their histology is still generated from it; their genomics is never written).
    label_columns : manifest label columns (values kept as strings; missing = empty).
    stratify_column : label column the patient-level split is stratified on.
    encoder : name written as the ``encoder`` attribute and in the features folder name.
    config : nested plain data for the federation YAML (sections of momkd_fed.config.Config, without ``sites``).
    header : comment lines written at the top of the federation YAML.
    """

    sites: list[SiteCohort]
    genes: pd.DataFrame
    label_columns: list[str]
    stratify_column: str
    encoder: str
    config: dict
    header: list[str] = field(default_factory=list)


def assign_splits(slides: pd.DataFrame, stratify_column: str, val_fraction: float, test_fraction: float,
                  rng: np.random.Generator) -> pd.Series:
    """Patient-level split stratified on a label column; one value (train/val/test) per slide.

    Patients (``case_id``) are grouped by their label value (missing labels form their own stratum) and each
    stratum is cut into test/val/train; a stratum of >= 3 patients puts at least one patient in each split, so
    every split sees both classes whenever the site has 3+ patients of each. A patient's slides share a split.

    Returns
    -------
    pd.Series aligned with ``slides.index``.
    """
    first = slides.groupby("case_id", sort=True)[stratify_column].first()
    stratum = first.fillna("<missing>").astype(str)
    split_of: dict[str, str] = {}
    for value in sorted(stratum.unique()):
        cases = np.array(sorted(stratum.index[stratum == value]))
        cases = cases[rng.permutation(len(cases))]
        n = len(cases)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 3:
            n_test, n_val = max(n_test, 1), max(n_val, 1)
        while n_test + n_val >= n and n_test + n_val > 0:  # keep at least one training patient
            if n_val >= n_test and n_val > 0:
                n_val -= 1
            else:
                n_test -= 1
        for i, case in enumerate(cases):
            split_of[case] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return slides["case_id"].map(split_of)
