"""run_training: site choice, genomic normalisation from training cases only, and the end-to-end tiny run."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from momkd_fed.checkpoint import load_model
from momkd_fed.config import SiteConfig, config_from_dict, load_config
from momkd_fed.data.bag import Bag, SiteData
from momkd_fed.errors import ConfigError, DataError
from momkd_fed.metrics import roc_auc
from momkd_fed.training import _gene_panel, _select_sites, normalise_sites, run_training


def _bag(case, split, omics, label=0):
    return Bag(slide_id=f"{case}-{split}-{np.random.rand():.6f}", case_id=case, label=label,
               features=torch.zeros(1, 2), coords=torch.zeros(1, 2, dtype=torch.long),
               neighbors=torch.zeros(1, 1, dtype=torch.long),
               omics=None if omics is None else torch.tensor(omics, dtype=torch.float32), split=split)


def test_site_selection():
    cfg = config_from_dict({"sites": [{"name": "a"}, {"name": "b"}]})
    assert [s.name for s in _select_sites(cfg, "b", False)] == ["b"]
    assert [s.name for s in _select_sites(cfg, None, True)] == ["a", "b"]
    with pytest.raises(ConfigError, match="--site NAME or pool"):
        _select_sites(cfg, None, False)
    with pytest.raises(ConfigError, match="no site named 'c'"):
        _select_sites(cfg, "c", False)
    with pytest.raises(ConfigError, match="no sites"):
        _select_sites(config_from_dict({}), None, True)


def test_normalisation_uses_training_cases_once_pooled_over_sites():
    cfg = config_from_dict({"data": {"omics_clip": 0.0}})
    sites = [SiteConfig(name="a", omics="a.csv"), SiteConfig(name="b", omics="b.csv"), SiteConfig(name="c")]
    a = SiteData("a", [_bag("p1", "train", [0.0, 10.0]), _bag("p1", "train", [0.0, 10.0]),  # 2 slides, 1 case
                       _bag("p2", "val", [100.0, 100.0]), _bag("p3", "test", [-50.0, 7.0])], genes=["g1", "g2"])
    b = SiteData("b", [_bag("q1", "train", [4.0, 10.0]), _bag("q2", "train", None)], genes=["g1", "g2"])
    c = SiteData("c", [_bag("r1", "train", None)])
    mean, std = normalise_sites([a, b, c], sites, cfg)
    np.testing.assert_allclose(mean, [2.0, 10.0])  # one vector per case, train only: (0 + 4) / 2
    np.testing.assert_allclose(std, [2.0, 1e-6])  # zero-variance gene floored
    np.testing.assert_allclose(a.bags[0].omics.numpy(), [-1.0, 0.0])
    np.testing.assert_allclose(a.bags[2].omics.numpy(), [49.0, 9e7], rtol=1e-5)  # val normalised with train stats
    assert b.bags[1].omics is None and c.bags[0].omics is None
    cfg.data.omics_clip = 3.0
    a.bags[2].omics = torch.tensor([100.0, 100.0])
    normalise_sites([a], sites[:1], cfg)
    assert float(a.bags[2].omics.abs().max()) <= 3.0
    # genomics only on validation cases: refused, never normalised with validation statistics
    d = SiteData("a", [_bag("p2", "val", [1.0, 2.0]), _bag("p1", "train", None)], genes=["g1", "g2"])
    with pytest.raises(DataError, match="no training case has them"):
        normalise_sites([d], sites[:1], cfg)


def test_gene_panels_must_agree():
    sites = [SiteConfig(name="a", omics="a.csv"), SiteConfig(name="b", omics="b.csv")]
    a = SiteData("a", [_bag("p", "train", [1.0, 2.0])], genes=["g1", "g2"])
    b = SiteData("b", [_bag("q", "train", [1.0, 2.0])], genes=["g2", "g1"])
    with pytest.raises(DataError, match="b.csv.*gene panel differs from site 'a'"):
        _gene_panel([a, b], sites)
    assert _gene_panel([a, SiteData("c", [_bag("r", "train", None)])], [sites[0], SiteConfig(name="c")]) == \
        ["g1", "g2"]


@pytest.fixture(scope="module")
def tiny_federation(tmp_path_factory):
    from momkd_fed.synth import synthesize

    return synthesize("tiny", tmp_path_factory.mktemp("tiny"), seed=0)  # the default preset, as `simulate` uses


@pytest.mark.slow
def test_pooled_tiny_end_to_end_then_predict(tiny_federation, tmp_path):
    from momkd_fed.data.site import load_site
    from momkd_fed.predict import predict_paths

    torch.set_num_threads(1)
    cfg = load_config(tiny_federation)
    t0 = time.perf_counter()
    metrics = run_training(cfg, tmp_path / "run", pooled=True)
    wall = time.perf_counter() - t0
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "epochs.jsonl", "metrics.json", "model.pt",
                                                      "predictions"]
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["test"]["classifier"]["n"] == metrics["slides"]["test"] > 0
    for head in ("classifier", "memory"):
        assert on_disk["test"][head]["auc"] is not None and on_disk["val"][head]["n"] > 0
    assert set(on_disk["test_per_site"]) == {"hospital_a", "hospital_b", "hospital_c"}
    assert sum(v["classifier"]["n"] for v in on_disk["test_per_site"].values()) == metrics["slides"]["test"]
    assert all(v["count"] > 0 for v in on_disk["excluded"].values())  # tiny has empty/Indeterminate labels
    assert metrics["paired_train_slides"] > 0 and metrics["n_genes"] == 64
    rows = [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["epochs_run"] and {"train_total", "train_ce", "val_auc"} <= set(rows[0])
    print(f"\npooled tiny: test AUC classifier {metrics['test']['classifier']['auc']:.3f}, memory "
          f"{metrics['test']['memory']['auc']:.3f}, wall {wall:.1f} s")
    assert metrics["test"]["classifier"]["auc"] > 0.7 and metrics["test"]["memory"]["auc"] > 0.7

    model, cfg2, meta = load_model(run / "model.pt")
    assert cfg2.sites == cfg.sites and meta["threshold"] == metrics["thresholds"]

    # predict on the test slides of every site, with a corrupt file among them
    feats = tmp_path / "test_slides"
    feats.mkdir()
    test_ids = []
    for sc in cfg.sites:
        for b in load_site(sc, cfg).split("test"):
            src = next(Path(sc.features_dir).rglob(f"{b.slide_id}.h5"))
            shutil.copy(src, feats / src.name)
            test_ids.append(b.slide_id)
    (feats / "corrupt.h5").write_bytes(b"not hdf5 at all")
    report = predict_paths(run / "model.pt", feats, tmp_path / "pred")
    assert [p for p, _ in report.failed] == [str(feats / "corrupt.h5")]
    assert sorted(r["slide_id"] for r in report.ok) == sorted(test_ids)
    for r in report.ok:
        with h5py.File(tmp_path / "pred" / "attention" / f"{r['slide_id']}.h5") as f:
            assert math.isclose(float(f["attention_scores"][()].sum()), 1.0, abs_tol=1e-5)
        assert (tmp_path / "pred" / "attention" / f"{r['slide_id']}.geojson").is_file()
    # histology-only inference from files reproduces the run's test scores; the calibrated probability (fitted
    # on the validation split) ranks them the same
    assert report.head == "classifier" == meta["primary_head"] and meta["heads"] == {"classifier": "trained",
                                                                                      "memory": "trained"}
    assert set(meta["calibration"]) == {"classifier", "memory"} == set(on_disk["test_ece"])
    assert meta["calibration"]["classifier"]["threshold"] == metrics["thresholds"]["classifier"]
    by_id = {r["slide_id"]: r["raw_score"] for r in report.ok}
    labels = [b.label for sc in cfg.sites for b in load_site(sc, cfg).split("test")]
    auc_again = roc_auc(labels, [by_id[i] for i in test_ids])
    assert auc_again == pytest.approx(metrics["test"]["classifier"]["auc"], abs=1e-6)
    prob = {r["slide_id"]: r["probability"] for r in report.ok}
    assert roc_auc(labels, [prob[i] for i in test_ids]) == pytest.approx(auc_again, abs=1e-6)
    print(f"pooled tiny: test ECE {on_disk['test_ece']}")
    # the run's own per-slide test scores (for ROC curves) agree with predict
    written = pd.concat([pd.read_csv(run / "predictions" / f"test_{sc.name}.csv") for sc in cfg.sites])
    assert sorted(written["slide_id"]) == sorted(test_ids)
    for sid, prob in zip(written["slide_id"], written["probability"]):
        assert prob == pytest.approx(by_id[sid], abs=1e-5)


@pytest.mark.slow
def test_single_site_abmil_and_failed_run_leaves_nothing(tiny_federation, tmp_path):
    torch.set_num_threads(1)
    cfg = load_config(tiny_federation, {"model.name": "abmil", "train.epochs": 2})
    metrics = run_training(cfg, tmp_path / "run", site="hospital_c")
    assert metrics["test"]["memory"] is None and metrics["test_per_site"] == {} and metrics["n_genes"] == 0
    # a run that fails inside training leaves no files behind
    cfg.train.lr = -1.0
    with pytest.raises(ValueError, match="learning rate"):
        run_training(cfg, tmp_path / "run2", site="hospital_c")
    assert not any((tmp_path / "run2").iterdir())
    # a one-class training split is refused before anything is written
    cfg.data.label_map = {"negative": 0, "no_such_value": 1}
    with pytest.raises(DataError, match="training split holds .* class 0 only"):
        run_training(cfg, tmp_path / "run3", site="hospital_c")
    assert not (tmp_path / "run3").exists()
