"""TRIDENT / CLAM .h5 reading: both formats round-trip; each kind of bad file is refused with a message naming
the file and the problem."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from momkd_fed.data.h5 import read_slide_h5, write_clam_h5, write_trident_h5
from momkd_fed.errors import DataError

D = 16


def _slide(P: int = 12, D: int = D, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(P, D)).astype(np.float32)
    coords = np.stack(np.meshgrid(np.arange(4), np.arange(P // 4 + 1)), -1).reshape(-1, 2)[:P] * 512
    return feats, coords


def test_trident_roundtrip(tmp_path):
    f, c = _slide()
    ei = np.stack([np.arange(12), (np.arange(12) + 1) % 12])
    write_trident_h5(tmp_path / "s1.h5", f, c, patch_size_level0=1024, edge_index=ei)
    sf = read_slide_h5(tmp_path / "s1.h5", D)
    assert sf.fmt == "trident" and sf.patch_size_level0 == 1024
    assert sf.features.dtype == np.float32 and sf.coords.dtype == np.int64
    np.testing.assert_array_equal(sf.features, f)
    np.testing.assert_array_equal(sf.coords, c)
    np.testing.assert_array_equal(sf.edge_index, ei)


def test_clam_roundtrip_and_float16_cast(tmp_path):
    f, c = _slide()
    write_clam_h5(tmp_path / "s2.h5", f, c)
    sf = read_slide_h5(tmp_path / "s2.h5", D)
    assert sf.fmt == "clam" and sf.patch_size_level0 == 0 and sf.edge_index is None
    assert sf.coords.dtype == np.int64
    np.testing.assert_array_equal(sf.coords, c)
    with h5py.File(tmp_path / "s3.h5", "w") as h:  # float16 features as some writers store them
        h["features"] = f.astype(np.float16)
        h["coords"] = c.astype(np.float64)  # integer-valued floats are accepted
    sf = read_slide_h5(tmp_path / "s3.h5", D)
    assert sf.features.dtype == np.float32 and sf.coords.dtype == np.int64


def test_empty_slide_is_valid(tmp_path):
    write_trident_h5(tmp_path / "e.h5", np.zeros((0, D)), np.zeros((0, 2)))
    sf = read_slide_h5(tmp_path / "e.h5", D)
    assert sf.features.shape == (0, D) and sf.coords.shape == (0, 2)


def _raw(path, **datasets):
    with h5py.File(path, "w") as h:
        for k, v in datasets.items():
            h[k] = v


def _bad_files(tmp_path):
    f, c = _slide()
    cases = {}
    p = tmp_path / "truncated.h5"
    write_trident_h5(p, np.random.default_rng(0).normal(size=(4000, D)), np.zeros((4000, 2)))
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    cases["truncated"] = (p, "hdf5")
    p = tmp_path / "nan.h5"
    f2 = f.copy()
    f2[[1, 5], 3] = np.nan
    write_trident_h5(p, f2, c)
    cases["nan"] = (p, "non-finite values (NaN/inf) in 2 of 12 rows")
    p = tmp_path / "dim.h5"
    write_trident_h5(p, np.zeros((12, 1024)), c)
    cases["dim"] = (p, "1024 (UNI")
    p = tmp_path / "oned.h5"
    _raw(p, features=np.zeros(12, np.float32), coords=c)
    cases["1-D"] = (p, "must be 2-D")
    p = tmp_path / "nocoords.h5"
    _raw(p, features=f)
    cases["no coords"] = (p, "no 'coords' dataset")
    p = tmp_path / "coords3.h5"
    _raw(p, features=f, coords=np.zeros((12, 3), np.int64))
    cases["coords shape"] = (p, "'coords' must have shape (P, 2)")
    p = tmp_path / "rows.h5"
    _raw(p, features=f, coords=c[:10])
    cases["row mismatch"] = (p, "row counts disagree")
    p = tmp_path / "nofeat.h5"
    _raw(p, coords=c, feats=f)
    cases["no features"] = (p, "no 'features' dataset")
    p = tmp_path / "text.h5"
    p.write_text("slide_id,label\n")
    cases["not hdf5"] = (p, "not a readable HDF5")
    p = tmp_path / "fraccoords.h5"
    _raw(p, features=f, coords=c + 0.5)
    cases["non-integer coords"] = (p, "integer pixel positions")
    p = tmp_path / "eishape.h5"
    _raw(p, features=f, coords=c, edge_index_k8=np.zeros((3, 5), np.int64))
    cases["edge_index shape"] = (p, "'edge_index_k8' must have shape (2, E)")
    p = tmp_path / "eirange.h5"
    _raw(p, features=f, coords=c, edge_index_k8=np.array([[0, 1], [1, 12]]))
    cases["edge_index range"] = (p, "outside [0, 12)")
    cases["missing file"] = (tmp_path / "absent.h5", "not found")
    return cases


def test_bad_files_are_refused_naming_file_and_problem(tmp_path):
    cases = _bad_files(tmp_path)
    assert len(cases) >= 13
    for name, (path, needle) in cases.items():
        with pytest.raises(DataError) as ei:
            read_slide_h5(path, D)
        msg = str(ei.value)
        assert str(path) in msg, name
        assert needle.lower() in msg.lower(), f"{name}: {msg}"
        assert ei.value.fix, name
