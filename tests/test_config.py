"""The typed config: defaults, rejection of bad input, the Flower run-config round trip, the generated reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from momkd_fed.config import (Config, SiteConfig, config_from_dict, from_flat, load_config, to_dict, to_flat)
from momkd_fed.config_reference import render_markdown, render_yaml
from momkd_fed.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _custom() -> Config:
    return config_from_dict({
        "data": {"label_column": "her2_calc", "label_map": {"Positive": 1, "Negative": 0}, "feature_dim": 1024,
                 "gene_panel": ["ERBB2", "GRB7"]},
        "memory": {"update": "ema", "slots": 8},
        "loss": {"w_recon": 0.01},
        "federation": {"shared": ["histology_encoder."], "paired_only": []},
        "sites": [{"name": "a", "manifest": "/m.csv", "features_dir": "/f", "omics": "/o.csv"},
                  {"name": "b", "manifest": "/m2.csv", "features_dir": "/f2"}],
    })


def test_round_trip_through_flower_run_config_is_lossless():
    cfg = _custom()
    flat = to_flat(cfg)
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert flat["loss.w_recon"] == 0.01 and flat["memory.update"] == "ema"
    assert from_flat(flat) == cfg
    assert from_flat(to_flat(Config())) == Config()


def test_unknown_keys_are_rejected_with_the_key_path():
    with pytest.raises(ConfigError, match=r"model\.hiden_dim: unknown key; allowed keys here: name, hidden_dim"):
        config_from_dict({"model": {"hiden_dim": 3}})
    with pytest.raises(ConfigError, match=r"trainer: unknown key"):
        config_from_dict({"trainer": {}})
    with pytest.raises(ConfigError, match=r"sites\[0\]\.path: unknown key"):
        config_from_dict({"sites": [{"name": "a", "path": "x"}]})
    with pytest.raises(ConfigError, match=r"model\.widht: unknown key"):
        from_flat({"model.widht": 3})


def test_wrong_types_and_values_name_the_allowed_values():
    with pytest.raises(ConfigError, match=r"memory\.update: 'fast' is not allowed; allowed values: 'gradient', 'ema', 'frozen'"):
        config_from_dict({"memory": {"update": "fast"}})
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, got '3'"):
        config_from_dict({"train": {"epochs": "3"}})
    with pytest.raises(ConfigError, match=r"train\.balanced_sampling: expected true/false"):
        config_from_dict({"train": {"balanced_sampling": 1}})
    with pytest.raises(ConfigError, match=r"data\.gene_panel: expected a list"):
        config_from_dict({"data": {"gene_panel": "ERBB2"}})
    with pytest.raises(ConfigError, match=r"model\.hidden_dim: 30 is not divisible by model\.heads=4"):
        config_from_dict({"model": {"hidden_dim": 30, "heads": 4}})
    with pytest.raises(ConfigError, match=r"sites: duplicate site names \['a'\]"):
        config_from_dict({"sites": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ConfigError, match=r"data\.label_map: classes must be 0 or 1"):
        config_from_dict({"data": {"label_map": {"x": 2}}})


def test_ints_are_accepted_where_floats_are_expected():
    assert config_from_dict({"loss": {"w_ce": 1}}).loss.w_ce == 1.0


def test_yaml_site_paths_resolve_against_the_yaml_folder(tmp_path):
    (tmp_path / "fed.yaml").write_text("sites:\n  - {name: a, manifest: a/manifest.csv, features_dir: a/features}\n")
    cfg = load_config(tmp_path / "fed.yaml")
    assert cfg.site("a").manifest == str(tmp_path / "a" / "manifest.csv")
    with pytest.raises(ConfigError, match="no site named 'z'"):
        cfg.site("z")


def test_overrides_use_dotted_keys_and_are_checked():
    cfg = load_config(None, overrides={"model.name": "abmil", "train.epochs": 2})
    assert cfg.model.name == "abmil" and cfg.train.epochs == 2
    with pytest.raises(ConfigError, match="model.nam: unknown key"):
        load_config(None, overrides={"model.nam": "abmil"})


def test_missing_or_broken_yaml_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(name):
    load_config(ROOT / "configs" / name)


def test_generated_reference_files_match_the_typed_config():
    assert (ROOT / "configs" / "defaults.yaml").read_text() == render_yaml(), \
        "configs/defaults.yaml is stale: run python -m momkd_fed.config_reference"
    assert (ROOT / "docs" / "configuration.md").read_text() == render_markdown(), \
        "docs/configuration.md is stale: run python -m momkd_fed.config_reference"
    assert load_config(ROOT / "configs" / "defaults.yaml") == Config()
    md = render_markdown()
    for section, value in to_dict(Config()).items():
        if section != "sites":
            for key in value:
                assert f"| `{key}` |" in md
    for key in SiteConfig.__dataclass_fields__:
        assert f"| `{key}` |" in md
