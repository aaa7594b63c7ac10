"""Manifest and genomics readers (labels, splits, panels, bad values) and the normalisation moments."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from momkd_fed.data.manifest import normalize_label, read_manifest
from momkd_fed.data.omics import (merge_moments, moments_to_mean_std, normalize_omics, omics_moments,
                                  read_omics)
from momkd_fed.errors import DataError

LMAP = {"0": 0, "1": 1, "negative": 0, "positive": 1}


def _csv(path, text):
    path.write_text(text)
    return path


def test_manifest_labels_excluded_not_negative(tmp_path):
    p = _csv(tmp_path / "m.csv", "case_id,slide_id,her2\nA,a1,Positive\nA,a2,positive\nB,b1,Indeterminate\n"
                                  "C,c1,\nD,d1,1.0\nE,e1,0\nF,f1,NaN\n")
    m = read_manifest(p, "her2", LMAP)
    assert [(r.slide_id, r.label) for r in m.rows] == [("a1", 1), ("a2", 1), ("d1", 1), ("e1", 0)]
    assert not m.has_split and all(r.split is None for r in m.rows)
    reasons = dict(m.excluded)
    assert set(reasons) == {"b1", "c1", "f1"}
    assert "Indeterminate" in reasons["b1"] and "missing label" in reasons["c1"]
    assert normalize_label(1.0) == "1" and normalize_label(" 0.0 ") == "0" and normalize_label("nan") is None


def test_manifest_split_column(tmp_path):
    p = _csv(tmp_path / "m.csv", "case_id,slide_id,label,split\nA,a1,1,Train\nB,b1,0,test\nC,c1,x,bogus\n")
    m = read_manifest(p, "label", LMAP)  # c1 is unlabelled, so its bogus split does not matter
    assert m.has_split and [r.split for r in m.rows] == ["train", "test"]


@pytest.mark.parametrize("text,needle", [
    ("case_id,slide_id,label\nA,a1,1\nB,a1,0\nC,c,1\nD,c,0\n", "2 duplicate slide_id values: ['a1', 'c']"),
    ("case_id,slide_id,her2\nA,a1,1\n", "missing required column 'label'; columns present: ['case_id', 'slide_id', 'her2']"),
    ("case_id,slide_id,label,split\nA,a1,1,train\nB,b1,0,holdout\n", "invalid values in 1 labelled rows, e.g. [('b1', 'holdout')]; allowed: train, val, test"),
    ("", "manifest is empty"),
    ("case_id,slide_id,label\n", "header but no rows"),
    ("case_id,slide_id,label,split\nA,a1,1,train\nA,a2,1,test\n", "patients have slides in different splits"),
    ("slide_id,label\na1,1\n", "missing required column 'case_id'"),
])
def test_manifest_errors(tmp_path, text, needle):
    p = _csv(tmp_path / "manifest.csv", text)
    with pytest.raises(DataError) as ei:
        read_manifest(p, "label", LMAP)
    assert str(p) in str(ei.value) and needle in str(ei.value)


def test_manifest_missing_file(tmp_path):
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv", "label", LMAP)


def _matrix(tmp_path, fmt="csv"):
    df = pd.DataFrame({"case_id": ["001", "B", "C"], "site": ["x", "y", "z"], "G1": [1.0, 2.0, 3.0],
                       "G2": [0.0, 0.5, 1.0], "G3": [7, 8, 9]})
    p = tmp_path / f"omics.{fmt}"
    if fmt == "parquet":
        df.to_parquet(p)
    else:
        df.to_csv(p, sep="\t" if fmt == "tsv" else ",", index=False)
    return p


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_omics_matrix(tmp_path, fmt):
    om = read_omics(_matrix(tmp_path, fmt), ["G3", "G1"])
    assert om.genes == ["G3", "G1"] and set(om.by_case) == {"001", "B", "C"}
    np.testing.assert_array_equal(om.by_case["B"], np.array([8, 2], np.float32))
    assert om.by_case["B"].dtype == np.float32
    om = read_omics(_matrix(tmp_path, fmt), [])  # empty panel: every numeric column; 'site' is metadata
    assert om.genes == ["G1", "G2", "G3"]
    om = read_omics(_matrix(tmp_path, fmt), ["G1"], log1p=True)
    np.testing.assert_allclose(om.by_case["C"], [2.0])


def test_omics_npy_folder(tmp_path):
    d = tmp_path / "npy"
    d.mkdir()
    (d / "genes.txt").write_text("G1\nG2\nG3\n")
    np.save(d / "A.npy", np.array([1, 2, 3], np.float32))
    np.save(d / "B.npy", np.array([4, 5, 6], np.float64))
    om = read_omics(d, ["G3", "G1"])
    assert om.genes == ["G3", "G1"]
    np.testing.assert_array_equal(om.by_case["B"], [6, 4])
    (d / "genes.txt").unlink()
    with pytest.raises(DataError, match="vector length 3 != 2 genes in data.gene_panel") as ei:
        read_omics(d, ["G1", "G2"])
    assert "A.npy" in str(ei.value)


def test_omics_identical_duplicate_rows_merge(tmp_path):
    p = _csv(tmp_path / "o.csv", "case_id,G1\nA,1\nA,1\nB,2\n")
    assert sorted(read_omics(p, ["G1"]).by_case) == ["A", "B"]


@pytest.mark.parametrize("text,panel,needle", [
    ("case_id,G1,G2\nA,1,2\n", ["G1", "G9", "G8"], "2 of 3 panel genes are missing: G9, G8"),
    ("case_id,G1,G2\nA,1,2\nB,abc,3\n", ["G1", "G2"], "case 'B', gene 'G1': non-numeric or missing value 'abc'"),
    ("case_id,G1,G2\nA,1,2\nB,,3\n", ["G1", "G2"], "case 'B', gene 'G1'"),
    ("case_id,G1\nA,1\nA,2\n", ["G1"], "1 cases appear in several rows with different values: A"),
    ("case_id,G1\n", ["G1"], "no rows"),
    ("", [], "empty"),
])
def test_omics_errors(tmp_path, text, panel, needle):
    p = _csv(tmp_path / "omics.csv", text)
    with pytest.raises(DataError) as ei:
        read_omics(p, panel)
    assert str(p) in str(ei.value) and needle in str(ei.value)


def test_moments_merge_equals_pooled():
    rng = np.random.default_rng(0)
    a, b = rng.normal(3, 2, size=(40, 5)), rng.normal(-1, 1, size=(25, 5))
    a[:, 4] = 1.0
    b[:, 4] = 1.0  # a constant gene: std floored, no division by zero
    mean, std = moments_to_mean_std(merge_moments([omics_moments(a), omics_moments(b)]))
    pooled = np.concatenate([a, b])
    np.testing.assert_allclose(mean, pooled.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std[:4], pooled.std(0)[:4], rtol=1e-4)
    assert std[4] == pytest.approx(1e-6)
    z = normalize_omics(pooled[:3].astype(np.float32), mean, std, clip=10.0)
    assert np.isfinite(z).all() and np.abs(z).max() <= 10.0
    zt = normalize_omics(torch.from_numpy(pooled[:3].astype(np.float32)), mean, std, clip=10.0)
    np.testing.assert_allclose(zt.numpy(), z, rtol=1e-5, atol=1e-6)
    assert np.abs(normalize_omics(np.full(5, 1e4, np.float32), mean, std, clip=10.0)).max() == 10.0
