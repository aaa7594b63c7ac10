"""benchmarks/personal_head_bound.py: the slide vectors are the model's own, and a site head learns from them."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from momkd_fed.config import Config, MemoryConfig, ModelConfig
from momkd_fed.data.bag import Bag
from momkd_fed.data.graph import knn_neighbors
from momkd_fed.model.momkd import MoMKD

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import personal_head_bound as phb  # noqa: E402


def _bag(p: int, label: int, seed: int, d: int) -> Bag:
    gen = torch.Generator().manual_seed(seed)
    coords = torch.randint(0, 20, (p, 2), generator=gen) * 224
    feats = torch.randn(p, d, generator=gen) + 1.5 * label  # the label shifts every patch: learnable
    return Bag(slide_id=f"s{seed}", case_id=f"c{seed}", label=label, features=feats, coords=coords,
               neighbors=knn_neighbors(coords.numpy(), 4))


def test_slide_vectors_are_what_the_models_classifier_sees_and_a_fresh_head_learns_from_them():
    cfg = Config()
    cfg.model = ModelConfig(hidden_dim=16, heads=2, shared_dim=8, cls_hidden=16)
    cfg.memory = MemoryConfig(slots=3)
    cfg.train.epochs, cfg.train.patience, cfg.train.lr = 8, 0, 1e-2
    torch.manual_seed(0)
    model = MoMKD(cfg.model, cfg.memory, cfg.loss, 12, 0).eval()
    bags = [_bag(10 + i % 7, i % 2, i, 12) for i in range(40)]
    v = phb.slide_vectors(model, bags)  # (N, D)
    assert v.shape == (40, 16)
    with torch.no_grad():
        logits = torch.stack([model(b.features, b.neighbors).logits for b in bags])
    torch.testing.assert_close(model.classifier(v), logits)  # the vectors the model's own head classifies

    split = {"train": slice(0, 24), "val": slice(24, 32), "test": slice(32, 40)}
    vs = {k: v[s] for k, s in split.items()}
    ys = {k: torch.tensor([b.label for b in bags[s]]) for k, s in split.items()}
    before = {k: t.clone() for k, t in model.classifier.state_dict().items()}
    head, epoch = phb.train_head(model.classifier, vs, ys, cfg, seed=0)
    assert all(torch.equal(before[k], t) for k, t in model.classifier.state_dict().items())  # template untouched
    assert 1 <= epoch <= 8
    with torch.no_grad():
        p = torch.softmax(head(vs["test"]), -1)[:, 1]
    assert phb.roc_auc(ys["test"].numpy(), p.numpy()) > 0.9
