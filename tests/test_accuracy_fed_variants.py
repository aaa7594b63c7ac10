"""benchmarks/accuracy.py --fed-variants: how the sites' personal classifiers are read, and run claims."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import accuracy  # noqa: E402


def _row(rnd, pers):
    """A rounds.jsonl row: site -> (personal val AUC, personal test AUC)."""
    return {"round": rnd, "evaluate": {s: {"personal": {"val_auc": v, "test_auc": t}, "global": {}}
                                       for s, (v, t) in pers.items()}}


def test_personal_classifier_read_at_each_sites_own_best_validation_round(tmp_path):
    rows = [_row(1, {"a": (0.6, 0.50), "b": (None, 0.40)}),
            _row(2, {"a": (0.8, 0.70), "b": (None, 0.45)}),
            _row(3, {"a": (0.8, 0.90), "b": (None, 0.55)}),  # a: a tie keeps the earlier round
            _row(4, {"a": (0.7, 0.60), "b": (None, 0.65)})]  # b: no validation AUC at all: the last round
    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = accuracy.personal_classifier_aucs(tmp_path, best_round=3)
    assert got["sites"]["a"] == {"classifier": 0.70, "round": 2, "val_auc": 0.8}
    assert got["sites"]["b"]["classifier"] == 0.65 and got["sites"]["b"]["round"] == 4
    assert math.isnan(got["sites"]["b"]["val_auc"])
    assert got["at_best_round"] == {"a": 0.90, "b": 0.55} and got["at_last_round"] == {"a": 0.60, "b": 0.65}
    with pytest.raises(RuntimeError, match="rounds.jsonl"):
        accuracy.personal_classifier_aucs(tmp_path / "empty", best_round=None)


def test_variant_definitions_and_run_claims(tmp_path):
    a = accuracy.parse_args(["--fed-variants", "default,mine", "--variant", "mine:federation.prox_mu=3,train.lr=1e-4"])
    assert a.fed_variants == ["default", "mine"] and a.variants["mine"] == {"federation.prox_mu": 3, "train.lr": 1e-4}
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--fed-variants", "nope"])
    claim = tmp_path / "x" / ".claim"
    assert accuracy._claim(claim) and claim.read_text() == str(os.getpid())
    claim.write_text("999999999")  # a claim whose process is gone is taken over
    assert accuracy._claim(claim) and claim.read_text() == str(os.getpid())
    claim.write_text(str(os.getppid()))  # a live process's claim is respected
    assert not accuracy._claim(claim)
