"""Checkpoints: self-describing round trip, identical predictions after reload, typed errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from momkd_fed.checkpoint import load_model, read_checkpoint, save_checkpoint
from momkd_fed.config import config_from_dict, to_dict
from momkd_fed.data.bag import Bag
from momkd_fed.data.graph import knn_neighbors
from momkd_fed.device import seed_everything
from momkd_fed.engine import evaluate, init_memory_from_bags, make_optimizer, train_epoch
from momkd_fed.errors import CheckpointError
from momkd_fed.model import build_model

D, G = 10, 5


def _cfg(name="momkd", update="gradient"):
    return config_from_dict({
        "data": {"feature_dim": D, "knn_k": 3},
        "model": {"name": name, "hidden_dim": 8, "heads": 2, "shared_dim": 4, "omics_hidden": 8,
                  "omics_embed_dim": 8, "cls_hidden": 4, "abmil_hidden": 4},
        "memory": {"slots": 3, "kmeans_iters": 3, "update": update},
        "train": {"device": "cpu", "progress": False},
    })


def _bags(n=6):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = 5 + i
        xy = np.stack([np.arange(p) * 100, np.zeros(p)], 1).astype(np.int64)
        out.append(Bag(f"s{i}", f"c{i}", i % 2, torch.from_numpy(rng.normal(size=(p, D)).astype(np.float32)),
                       torch.from_numpy(xy), knn_neighbors(xy, 3),
                       torch.from_numpy(rng.normal(size=G).astype(np.float32)) if i % 2 == 0 else None))
    return out


def _trained(cfg, n_genes=G):
    seed_everything(0)
    model = build_model(cfg, D, n_genes)
    bags = _bags()
    init_memory_from_bags(model, bags, cfg)
    train_epoch(model, bags, make_optimizer(model, cfg.train), cfg, generator=torch.Generator().manual_seed(0),
                device=torch.device("cpu"))
    return model, bags


@pytest.mark.parametrize("name,update", [("momkd", "gradient"), ("momkd", "ema"), ("abmil", "gradient")])
def test_round_trip_predicts_identically(tmp_path, name, update):
    cfg = _cfg(name, update)
    model, bags = _trained(cfg)
    path = save_checkpoint(tmp_path / "m.pt", model, cfg, feature_dim=D, n_genes=G,
                           omics_norm=(np.zeros(G, np.float32), np.ones(G, np.float32)),
                           extra={"epoch": 3, "round": None, "threshold": {"classifier": 0.4, "memory": 0.1},
                                  "metrics": {"auc": float("nan"), "arr": np.float64(0.7)}, "genes": ["a", "b"]})
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind
    model2, cfg2, meta = load_model(path)
    assert to_dict(cfg2) == to_dict(cfg) and not model2.training
    assert meta["epoch"] == 3 and meta["threshold"]["classifier"] == 0.4 and meta["extra"]["genes"] == ["a", "b"]
    assert set(meta["versions"]) == {"momkd_fed", "torch", "python"} and meta["n_genes"] == G
    assert torch.equal(meta["omics_norm"]["std"], torch.ones(G))
    sd, sd2 = model.state_dict(), model2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    if name == "momkd":
        assert any(k.startswith("memory.") for k in sd2)
    p1 = evaluate(model, bags, torch.device("cpu"), keep_attention=True)
    p2 = evaluate(model2, bags, torch.device("cpu"), keep_attention=True)
    assert np.array_equal(p1.probs, p2.probs)
    assert all(np.array_equal(a, b) for a, b in zip(p1.attention, p2.attention))
    if p1.memory_scores is not None:
        assert np.array_equal(p1.memory_scores, p2.memory_scores)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt.*not a readable checkpoint"):
        load_model(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a momkd-fed checkpoint"):
        read_checkpoint(foreign)


def test_truncated_file(tmp_path):
    cfg = _cfg()
    model, _ = _trained(cfg)
    path = save_checkpoint(tmp_path / "m.pt", model, cfg, feature_dim=D, n_genes=G)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.pt"):
        load_model(path)


def test_mismatched_weights_name_the_keys(tmp_path):
    cfg = _cfg()
    model, _ = _trained(cfg)
    path = save_checkpoint(tmp_path / "m.pt", model, cfg, feature_dim=D, n_genes=G)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"].pop("log_tau")
    ckpt["state_dict"]["stray.weight"] = torch.zeros(1)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"missing keys \['log_tau'\].*unexpected keys \['stray.weight'\]"):
        load_model(path)
    # dims that disagree with the weights: shape mismatch named
    ckpt = torch.load(save_checkpoint(tmp_path / "m2.pt", model, cfg, feature_dim=D, n_genes=G), weights_only=True)
    ckpt["n_genes"] = G + 1
    torch.save(ckpt, tmp_path / "m2.pt")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_model(tmp_path / "m2.pt")


def test_invalid_embedded_config(tmp_path):
    cfg = _cfg()
    model, _ = _trained(cfg)
    path = save_checkpoint(tmp_path / "m.pt", model, cfg, feature_dim=D, n_genes=G)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["model"]["no_such_field"] = 1
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="embedded config.*no_such_field"):
        load_model(path)
