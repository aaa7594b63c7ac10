"""predict_paths: histology-only scores, attention h5 + QuPath GeoJSON, failed slides reported, others complete."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest

from momkd_fed.calibration import Calibration, calibrate_points
from momkd_fed.checkpoint import save_checkpoint
from momkd_fed.config import config_from_dict
from momkd_fed.data.h5 import write_clam_h5, write_trident_h5
from momkd_fed.device import seed_everything
from momkd_fed.errors import CheckpointError, DataError
from momkd_fed.model import build_model
from momkd_fed.predict import infer_patch_size, predict_paths

D = 10


def _cfg(name="momkd", shared=None):
    fed = {} if shared is None else {"federation": {"shared": shared}}
    return config_from_dict({
        "data": {"feature_dim": D, "knn_k": 8},
        "model": {"name": name, "hidden_dim": 8, "heads": 2, "shared_dim": 4, "cls_hidden": 4, "abmil_hidden": 4},
        "memory": {"slots": 3},
        "train": {"device": "cpu"},
        **fed,
    })


def _calibration(head, threshold):
    """A calibration whose decision threshold is ``threshold`` (fitted on made-up validation scores)."""
    y = np.r_[np.zeros(10), np.ones(10)]
    raw = np.r_[np.linspace(0.05, 0.6, 10), np.linspace(0.4, 0.95, 10)]
    if head == "memory":
        raw = 4 * raw - 2
    cal = calibrate_points(head, y, raw)
    cal.threshold = threshold
    cal.probability_threshold = float(cal.probability([threshold])[0])
    return cal.to_dict()


def _checkpoint(tmp_path, name="momkd", threshold=0.5, extra=None, file="model.pt"):
    cfg = _cfg(name)
    seed_everything(0)
    model = build_model(cfg, D, 0)
    heads = {"classifier": "trained", **({"memory": "trained"} if name == "momkd" else {})}
    extra = extra if extra is not None else {
        "threshold": {"classifier": threshold, "memory": 0.0}, "heads": heads, "primary_head": "classifier",
        "calibration": {h: _calibration(h, threshold if h == "classifier" else 0.0) for h in heads}}
    return save_checkpoint(tmp_path / file, model, cfg, feature_dim=D, n_genes=0, extra=extra)


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
    assert [list(r) for r in rows][0] == ["slide_id", "head", "probability", "label_pred", "raw_score"]
    assert {r["slide_id"] for r in rows} == set(sizes)
    cal = Calibration.from_dict(_calibration("classifier", 0.5))
    for r in rows:
        prob, raw = float(r["probability"]), float(r["raw_score"])
        assert r["head"] == "classifier" and 0 < raw < 1 and int(r["label_pred"]) == int(raw >= 0.5)
        assert prob == pytest.approx(float(cal.probability([raw])[0]), abs=1e-12)
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
    assert (tmp_path / "out" / "predictions.csv").read_text().strip() == "slide_id,head,probability,label_pred,raw_score"


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


def test_memory_head_and_an_untrained_classifier_is_never_used(tmp_path):
    """A federated global model with a site-private classifier: predict answers with the calibrated memory head
    and refuses the classifier with one line naming the head and the fix."""
    _slides(tmp_path / "f", n=3)
    extra = {"kind": "federated-best", "heads": {"classifier": "untrained", "memory": "trained"},
             "primary_head": "memory", "calibration": {"memory": _calibration("memory", 0.1)},
             "threshold": {"classifier": 0.5, "memory": 0.0}}
    ckpt = _checkpoint(tmp_path, extra=extra, file="best_model.pt")
    report = predict_paths(ckpt, tmp_path / "f", tmp_path / "out")
    assert report.head == "memory" and len(report.ok) == 3
    cal = Calibration.from_dict(extra["calibration"]["memory"])
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    for r in rows:
        raw = float(r["raw_score"])
        assert r["head"] == "memory" and -2 <= raw <= 2 and int(r["label_pred"]) == int(raw >= 0.1)
        assert float(r["probability"]) == pytest.approx(float(cal.probability([raw])[0]), abs=1e-12)
    with pytest.raises(CheckpointError, match=r"best_model.pt: the classifier head of this model is untrained.*"
                                              r"fix: --head memory.*personal_model.pt") as err:
        predict_paths(ckpt, tmp_path / "f", tmp_path / "out2", head="classifier")
    assert "\n" not in str(err.value) and not (tmp_path / "out2").exists()
    # a file written before heads were recorded: a federated kind with the default sharing is inferred the same
    legacy = _checkpoint(tmp_path, extra={"kind": "federated-global"}, file="global_model.pt")
    with pytest.raises(CheckpointError, match="classifier head of this model is untrained"):
        predict_paths(legacy, tmp_path / "f", tmp_path / "out3", head="classifier")
    rep = predict_paths(legacy, tmp_path / "f", tmp_path / "out3")  # memory head, no calibration: said, not faked
    assert rep.head == "memory" and rep.calibration is None and "no calibration" in rep.notes[0]
    assert all(r["probability"] == "" for r in csv.DictReader(open(tmp_path / "out3" / "predictions.csv")))
    # ABMIL has no memory head; a model without any trained head cannot predict
    abmil = _checkpoint(tmp_path, name="abmil", file="abmil.pt")
    with pytest.raises(CheckpointError, match="has no memory head"):
        predict_paths(abmil, tmp_path / "f", tmp_path / "out4", head="memory")
    none = _checkpoint(tmp_path, name="abmil", extra={"heads": {"classifier": "untrained"}}, file="none.pt")
    with pytest.raises(CheckpointError, match="no head of this model was trained"):
        predict_paths(none, tmp_path / "f", tmp_path / "out5")


def test_cli_refuses_an_untrained_head_with_one_line_and_a_non_zero_exit(tmp_path):
    from typer.testing import CliRunner

    from momkd_fed.cli import app

    _slides(tmp_path / "f", n=1)
    extra = {"kind": "federated-best", "heads": {"classifier": "untrained", "memory": "trained"},
             "primary_head": "memory", "calibration": {"memory": _calibration("memory", 0.0)}}
    ckpt = _checkpoint(tmp_path, extra=extra, file="best_model.pt")
    res = CliRunner().invoke(app, ["predict", "--model", str(ckpt), "--features", str(tmp_path / "f"), "--out",
                                   str(tmp_path / "o"), "--head", "classifier"])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "classifier head of this model is untrained" in lines[0] and "--head memory" in lines[0]
    res = CliRunner().invoke(app, ["predict", "--model", str(ckpt), "--features", str(tmp_path / "f"), "--out",
                                   str(tmp_path / "o")])
    assert res.exit_code == 0 and "with the memory head (calibrated probability)" in res.output
