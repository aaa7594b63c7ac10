"""predict_paths: histology-only scores, attention h5 + QuPath GeoJSON, failed slides reported, others complete."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest

from momkd_fed.checkpoint import save_checkpoint
from momkd_fed.config import config_from_dict
from momkd_fed.data.h5 import write_clam_h5, write_trident_h5
from momkd_fed.device import seed_everything
from momkd_fed.errors import CheckpointError, DataError
from momkd_fed.model import build_model
from momkd_fed.predict import infer_patch_size, predict_paths

D = 10


def _checkpoint(tmp_path, name="momkd", threshold=0.5):
    cfg = config_from_dict({
        "data": {"feature_dim": D, "knn_k": 8},
        "model": {"name": name, "hidden_dim": 8, "heads": 2, "shared_dim": 4, "cls_hidden": 4, "abmil_hidden": 4},
        "memory": {"slots": 3},
        "train": {"device": "cpu"},
    })
    seed_everything(0)
    model = build_model(cfg, D, 0)
    return save_checkpoint(tmp_path / "model.pt", model, cfg, feature_dim=D, n_genes=0,
                           extra={"threshold": {"classifier": threshold, "memory": 0.0}})


def _slides(folder, n=3, rng=None):
    rng = rng or np.random.default_rng(0)
    sizes = {}
    for i in range(n):
        p = 4 + 7 * i
        xy = np.stack(np.meshgrid(np.arange(5), np.arange(7)), -1).reshape(-1, 2)[:p] * 512
        write_trident_h5(folder / f"slide{i}.h5", rng.normal(size=(p, D)), xy, patch_size_level0=512)
        sizes[f"slide{i}"] = p
    return sizes


@pytest.mark.parametrize("name", ["momkd", "abmil"])
def test_predict_folder_with_a_corrupt_file(tmp_path, name):
    ckpt = _checkpoint(tmp_path, name, threshold=0.5)
    feats = tmp_path / "features"
    sizes = _slides(feats)
    (feats / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated garbage")
    sub = feats / "nested"
    write_clam_h5(sub / "clam1.h5", np.random.default_rng(1).normal(size=(6, D)),
                  np.array([[0, 0], [256, 0], [512, 0], [0, 256], [256, 256], [512, 256]]))
    sizes["clam1"] = 6
    write_trident_h5(feats / "wrongdim.h5", np.zeros((3, D + 1)), np.zeros((3, 2)))
    out = tmp_path / "out"
    report = predict_paths(ckpt, feats, out)
    failed = {p.rsplit("/", 1)[-1]: r for p, r in report.failed}
    assert set(failed) == {"broken.h5", "wrongdim.h5"}
    assert "HDF5" in failed["broken.h5"] and "dim" in failed["wrongdim.h5"]
    assert sorted(r["slide_id"] for r in report.ok) == sorted(sizes)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [list(r) for r in rows][0] == ["slide_id", "probability", "memory_score", "label_pred"]
    assert {r["slide_id"] for r in rows} == set(sizes)
    for r in rows:
        prob = float(r["probability"])
        assert 0 < prob < 1 and int(r["label_pred"]) == int(prob >= 0.5)
        assert (r["memory_score"] == "") == (name == "abmil")
        with h5py.File(out / "attention" / f"{r['slide_id']}.h5") as f:
            a, c = f["attention_scores"][()], f["coords"][()]
            assert a.dtype == np.float32 and a.shape == (sizes[r["slide_id"]],) and c.shape == (len(a), 2)
            assert abs(float(a.sum()) - 1.0) < 1e-5
            ps = int(f["coords"].attrs["patch_size_level0"])
        gj = json.loads((out / "attention" / f"{r['slide_id']}.geojson").read_text())
        assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(a)
        feat0 = gj["features"][0]
        x, y = c[0].tolist()
        side = ps or 256  # CLAM file: patch size inferred from the coordinate grid
        assert feat0["geometry"]["coordinates"][0] == [[x, y], [x + side, y], [x + side, y + side], [x, y + side],
                                                       [x, y]]
        assert feat0["properties"]["measurements"]["attention"] == pytest.approx(float(a[0]))
        assert feat0["properties"]["objectType"] == "tile"


def test_single_file_threshold_and_heatmap(tmp_path):
    ckpt = _checkpoint(tmp_path, threshold=0.0)  # every slide predicted positive
    _slides(tmp_path, n=1)
    report = predict_paths(ckpt, tmp_path / "slide0.h5", tmp_path / "out", heatmaps=True)
    assert len(report.ok) == 1 and report.ok[0]["label_pred"] == 1 and not report.failed
    png = tmp_path / "out" / "heatmaps" / "slide0.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_empty_slide_is_reported(tmp_path):
    ckpt = _checkpoint(tmp_path)
    write_trident_h5(tmp_path / "f" / "empty.h5", np.zeros((0, D)), np.zeros((0, 2)))
    report = predict_paths(ckpt, tmp_path / "f", tmp_path / "out")
    assert not report.ok and "empty" in report.failed[0][1]
    assert (tmp_path / "out" / "predictions.csv").read_text().strip() == "slide_id,probability,memory_score,label_pred"


def test_bad_paths_raise(tmp_path):
    ckpt = _checkpoint(tmp_path)
    with pytest.raises(DataError, match="not found"):
        predict_paths(ckpt, tmp_path / "missing", tmp_path / "out")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="no .h5"):
        predict_paths(ckpt, tmp_path / "emptydir", tmp_path / "out")
    with pytest.raises(CheckpointError):
        predict_paths(tmp_path / "nope.pt", tmp_path, tmp_path / "out")


def test_infer_patch_size():
    assert infer_patch_size(np.array([[0, 0], [448, 0], [896, 448]])) == 448
    assert infer_patch_size(np.array([[10, 20]])) == 0
