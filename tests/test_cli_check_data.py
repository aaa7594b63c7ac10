"""`momkd-fed synth` then `momkd-fed check-data`: clean data passes; each kind of corruption fails naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from momkd_fed.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fed")
    res = runner.invoke(app, ["synth", "--preset", "tiny", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def _copy(clean: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "fed"
    shutil.copytree(clean, dst, ignore=shutil.ignore_patterns(".momkd_cache"))
    return dst


def _first_h5(fed: Path) -> Path:
    return sorted((fed / "hospital_a" / "features").rglob("*.h5"))[0]


def _check(fed: Path):
    return runner.invoke(app, ["check-data", "--config", str(fed / "federation.yaml")])


def test_clean_synthetic_federation_passes(clean):
    res = _check(clean)
    assert res.exit_code == 0, res.output
    assert "data OK" in res.output


def _truncate(fed):
    p = _first_h5(fed)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p.name, "not a readable HDF5"


def _nan(fed):
    p = _first_h5(fed)
    with h5py.File(p, "r+") as f:
        x = f["features"][()]
        x[0, 0] = np.nan
        f["features"][...] = x
    return p.name, "non-finite"


def _wrong_dim(fed):
    p = _first_h5(fed)
    with h5py.File(p, "r+") as f:
        n = f["features"].shape[0]
        del f["features"]
        f.create_dataset("features", data=np.zeros((n, 7), np.float32))
    return p.name, "but data.feature_dim is 32"


def _duplicate_slide(fed):
    m = fed / "hospital_b" / "manifest.csv"
    df = pd.read_csv(m)
    pd.concat([df, df.iloc[[0]]]).to_csv(m, index=False)
    return "manifest.csv", "duplicate"


def _unknown_label(fed):
    m = fed / "hospital_b" / "manifest.csv"
    df = pd.read_csv(m, dtype=str)
    df.loc[df.index[0], "label"] = "Postive"  # a typo, not a no-result value like Indeterminate
    df.to_csv(m, index=False)
    return "manifest.csv", "unknown label 'Postive'"


@pytest.mark.parametrize("corrupt", [_truncate, _nan, _wrong_dim, _duplicate_slide, _unknown_label])
def test_each_corruption_fails_naming_file_and_problem(clean, tmp_path, corrupt):
    fed = _copy(clean, tmp_path)
    fname, problem = corrupt(fed)
    res = _check(fed)
    assert res.exit_code != 0
    lines = [line for line in res.output.splitlines() if fname in line]
    assert lines and any(problem in line for line in lines), res.output[-2000:]
