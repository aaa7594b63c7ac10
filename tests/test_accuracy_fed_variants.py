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


def _row(rnd, pers, files=None):
    """A rounds.jsonl row: site -> (personal val AUC, personal test AUC); ``files``: site -> the round, validation and
    test AUC of its personal_model.pt as its evaluate reply reports them."""
    files = files or {}
    return {"round": rnd, "evaluate": {
        s: {"personal": {"val_auc": v, "test_auc": t,
                         **({"personal_file_round": files[s][0], "personal_file_val_auc": files[s][1],
                             "personal_file_test_auc": files[s][2]} if s in files else {})}, "global": {}}
        for s, (v, t) in pers.items()}}


def test_personal_classifier_read_from_the_file_and_at_every_other_round_rule(tmp_path):
    rows = [_row(1, {"a": (0.6, 0.50), "b": (None, 0.40)}, {"a": (1, 0.6, 0.50)}),
            _row(2, {"a": (0.8, 0.70), "b": (None, 0.45)}, {"a": (2, 0.8, 0.70), "b": (2, None, 0.45)}),
            _row(3, {"a": (0.8, 0.90), "b": (None, 0.55)}),  # a: a tie keeps the earlier round; no file round: kept
            _row(4, {"a": (0.7, 0.60), "b": (None, 0.65)})]  # b: no validation AUC at all: the last round
    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = accuracy.personal_classifier_aucs(tmp_path, best_round=3)
    assert got["sites"]["a"] == {"classifier": 0.70, "round": 2, "val_auc": 0.8}  # the file, as last reported
    assert got["sites"]["b"]["classifier"] == 0.45 and got["sites"]["b"]["round"] == 2
    assert math.isnan(got["sites"]["b"]["val_auc"])
    assert got["at_own_best_val"] == {"a": 0.70, "b": 0.65} and got["own_best_val_round"] == {"a": 2, "b": 4}
    assert got["at_best_round"] == {"a": 0.90, "b": 0.55} and got["at_last_round"] == {"a": 0.60, "b": 0.65}
    with pytest.raises(RuntimeError, match="rounds.jsonl"):
        accuracy.personal_classifier_aucs(tmp_path / "empty", best_round=None)


def test_personal_round_rules_read_new_and_old_results_rows():
    new = {"result": {"personal": {"sites": {"a": {"classifier": 0.61}}, "at_own_best_val": {"a": 0.7},
                                   "at_best_round": {"a": 0.8}, "at_last_round": {"a": 0.6}}}}
    rules = accuracy.personal_by_rule(new)  # the default rule is "last": its figure is the file the site reported
    assert accuracy.personal_rule(new) == "last"
    assert rules == {"last": {"a": 0.61}, "best_validation": {"a": 0.7}, "federation_best": {"a": 0.8}}
    new["variant_overrides"] = {"federation.personal_round": "best_validation"}
    assert accuracy.personal_by_rule(new)["best_validation"] == {"a": 0.61}
    assert accuracy.personal_by_rule(new)["last"] == {"a": 0.6}
    # a row from before federation.personal_round: "sites" held the best own validation round
    old = {"result": {"personal": {"sites": {"a": {"classifier": 0.7, "round": 2}}, "at_best_round": {"a": 0.8},
                                   "at_last_round": {"a": 0.6}}}}
    assert accuracy.personal_by_rule(old) == {"last": {"a": 0.6}, "best_validation": {"a": 0.7},
                                              "federation_best": {"a": 0.8}}


def test_a_setting_that_trains_nothing_differently_keeps_the_fingerprint():
    from momkd_fed.config import Config

    base = accuracy.config_fingerprint(Config())
    with_rule = accuracy.with_overrides(Config(), {"federation.personal_round": "best_validation"})
    assert with_rule.federation.personal_round == "best_validation" and accuracy.config_fingerprint(with_rule) == base
    assert accuracy.config_fingerprint(accuracy.with_overrides(Config(), {"federation.prox_mu": 0.1})) != base
    # the centralised and alone runs: a federation setting trains nothing differently there, a training one does
    other_fed = accuracy.with_overrides(Config(), {"federation.slot_momentum": 0.5, "federation.rounds": 3})
    for setting in ("pooled", "alone"):
        local = accuracy.config_fingerprint(Config(), setting)
        assert local != base and accuracy.config_fingerprint(other_fed, setting) == local
        assert accuracy.config_fingerprint(accuracy.with_overrides(Config(), {"train.lr": 1e-3}), setting) != local
    assert accuracy.config_fingerprint(other_fed) != base


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


def test_round_rule_table_reads_every_rule_against_centralised_and_alone():
    def fed(seed, last, best, own, mem_best, mem_last):
        return {"task": "odx", "seed": seed, "setting": "federated", "variant": "default", "result": {
            "global": {"sites": {"g": {"memory": mem_best}, "h": {"memory": mem_best}}},
            "global_last_round": {"sites": {"g": {"memory": mem_last}, "h": {"memory": mem_last}}},
            "personal": {"sites": {"g": {"classifier": last}, "h": {"classifier": last}},
                         "at_own_best_val": {"g": own, "h": own}, "at_best_round": {"g": best, "h": best},
                         "at_last_round": {"g": last, "h": last}}}}

    cen = {"sites": {"g": {"classifier": 0.8, "memory": 0.7}, "h": {"classifier": 0.8, "memory": 0.7}}}
    alone = {"sites": {"h": {"classifier": 0.5}}}
    by = {"default": {0: fed(0, 0.75, 0.70, 0.60, 0.68, 0.66), 1: fed(1, 0.87, 0.80, 0.70, 0.72, 0.70)},
          "centralised": {0: {"result": cen}, 1: {"result": cen}},
          "alone": {0: {"result": alone}, 1: {"result": alone}}}
    lines = accuracy.round_rule_table("odx", by, ["default"], ["g", "h"], ["h"])
    mem = next(line for line in lines if line.startswith("| default | global memory head"))
    pers = next(line for line in lines if line.startswith("| default | personal classifiers"))
    assert mem == "| default | global memory head | -0.020±0.028 | | +0.000±0.028 | 2 |"
    # personal: last -0.05, +0.07 (gains +0.25, +0.37); own val -0.2, -0.1; federation's best -0.1, 0.0
    assert pers == ("| default | personal classifiers | +0.010±0.085 / +0.310±0.085 | -0.150±0.071 / +0.150±0.071 "
                    "| -0.050±0.071 / +0.250±0.071 | 2 |")
