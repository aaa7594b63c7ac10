"""The sharing policy: every state-dict key in exactly one of shared / memory / private."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from momkd_fed.config import FederationConfig
from momkd_fed.errors import ConfigError
from momkd_fed.federation.sharing import (overlay_state, paired_only_keys, partition_state, validate_sharing)

KEYS = [
    "histology_encoder.gat1.lin_l.weight", "histology_encoder.norm1.weight", "patch_proj.weight", "slide_proj.weight",
    "omics_encoder.0.weight", "omics_encoder.1.bias", "omics_proj.weight", "omics_decoder.0.weight",
    "classifier.1.weight", "classifier.3.bias", "log_tau", "memory.slots", "memory.agg_sums", "memory.agg_counts",
    "memory.agg_slides",
]


def _state():
    return {k: torch.zeros(2) for k in KEYS}


def test_default_partition_matches_design():
    part = partition_state(_state(), FederationConfig())
    groups = [set(part.shared), set(part.memory), set(part.private)]
    assert sum(len(g) for g in groups) == len(KEYS) and set().union(*groups) == set(KEYS)  # exactly one group each
    assert set(part.memory) == {k for k in KEYS if k.startswith("memory.")}
    assert set(part.private) == {"omics_decoder.0.weight", "classifier.1.weight", "classifier.3.bias", "log_tau"}
    assert "omics_proj.weight" in part.shared and "histology_encoder.norm1.weight" in part.shared
    assert paired_only_keys(part.shared, FederationConfig()) == ["omics_encoder.0.weight", "omics_encoder.1.bias",
                                                                 "omics_proj.weight"]


def test_sharing_the_head_moves_it_to_shared():
    fed = dataclasses.replace(FederationConfig(), shared=FederationConfig().shared + ["classifier.", "log_tau"])
    part = partition_state(_state(), fed)
    assert {"classifier.1.weight", "log_tau"} <= set(part.shared) and "classifier.1.weight" not in part.private


@pytest.mark.parametrize("prefix", ["memory.", "memory.slots", "mem", ""])
def test_prefix_matching_memory_is_a_config_error(prefix):
    fed = dataclasses.replace(FederationConfig(), shared=["patch_proj.", prefix])
    with pytest.raises(ConfigError, match="memory"):
        partition_state(_state(), fed)


def test_unmatched_prefixes_warn(caplog):
    fed = dataclasses.replace(FederationConfig(), shared=["histology_encoder.", "nonexistent."],
                              paired_only=["omics_encoder."])
    with caplog.at_level(logging.WARNING):
        warnings = validate_sharing(KEYS, fed)
    assert any("nonexistent." in w for w in warnings) and any("omics_encoder." in w for w in warnings)
    assert len(warnings) == 2 and "nonexistent." in caplog.text
    assert validate_sharing(KEYS, FederationConfig()) == []


def test_overlay_state_checks_keys_and_shapes():
    local = {"a": torch.zeros(2), "b": torch.ones(3)}
    out = overlay_state(local, {"a": torch.full((2,), 5.0, dtype=torch.float64)})
    assert torch.equal(out["a"], torch.full((2,), 5.0)) and out["a"].dtype == torch.float32 and out["b"] is local["b"]
    with pytest.raises(ConfigError, match="shape"):
        overlay_state(local, {"a": torch.zeros(3)})
    with pytest.raises(ConfigError, match="does not have"):
        overlay_state(local, {"zz": torch.zeros(3)})
    assert set(overlay_state(local, {"zz": torch.zeros(3)}, allow_missing=["zz"])) == {"a", "b"}


def test_partition_of_the_real_model():
    from momkd_fed.config import LossConfig, MemoryConfig, ModelConfig
    from momkd_fed.model.momkd import MoMKD

    model = MoMKD(ModelConfig(hidden_dim=8, heads=2, shared_dim=4, omics_hidden=8, omics_embed_dim=8, cls_hidden=4),
                  MemoryConfig(slots=3), LossConfig(), feature_dim=6, n_genes=5)
    state = model.state_dict()
    fed = FederationConfig()
    assert validate_sharing(state, fed) == []
    part = partition_state(state, fed)
    assert len(part.shared) + len(part.memory) + len(part.private) == len(state)
    assert set(part.memory) == {"memory.slots"}
    assert {k.split(".")[0] for k in part.private} == {"log_tau", "omics_decoder", "classifier"}
    assert {k.split(".")[0] for k in part.shared} == {"histology_encoder", "patch_proj", "slide_proj",
                                                        "omics_encoder", "omics_proj"}
    assert set(paired_only_keys(part.shared, fed)) == {k for k in part.shared if k.startswith("omics_")}
