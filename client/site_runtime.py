"""Everything a ClientApp handler needs about *this* site: who it is, its data, its model, its seeds.

Site identity and paths come from the node-config, experiment settings from the run-config:

- simulation: Flower injects ``partition-id``; the site is ``cfg.sites[partition-id]`` of the run-config.
- deployment: ``flower-supernode --node-config 'site="NAME" config-path="/local/site.yaml"'``; the site's paths
  are read from that local YAML (never sent). Instead of ``config-path`` the node-config may give
  ``manifest``, ``features-dir``, ``omics`` and ``split-column`` directly. Optional ``state-dir`` names the
  folder for the site's private state.

Data are loaded through the site's slide cache (``momkd_fed.data.site``), so the fresh process Flower starts per
message reads parsed slides instead of re-parsing feature files.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from momkd_fed.config import Config, SiteConfig, load_config
from momkd_fed.data.bag import Bag, SiteData
from momkd_fed.data.omics import OmicsMoments, normalize_omics, omics_moments
from momkd_fed.data.site import CACHE_FOLDER, load_site
from momkd_fed.device import resolve_device
from momkd_fed.errors import ConfigError
from momkd_fed.model import build_model

from .run_config import RunOptions

log = logging.getLogger(__name__)

STATE_FOLDER = "federated_state"  # inside the site's cache folder (deployment)


def resolve_site(node_config: Mapping[str, object], cfg: Config) -> SiteConfig:
    """The SiteConfig of this node (see the module docstring for the keys).

    Raises
    ------
    ConfigError
        Neither ``partition-id`` nor ``site`` in the node-config, a partition id outside ``cfg.sites``, or a
        site name missing from the local YAML.
    """
    if "site" in node_config:
        name = str(node_config["site"])
        if "config-path" in node_config:
            return load_config(str(node_config["config-path"])).site(name)
        if "manifest" in node_config:
            return SiteConfig(name=name, manifest=str(node_config["manifest"]),
                              features_dir=str(node_config.get("features-dir", "")),
                              omics=str(node_config.get("omics", "")),
                              split_column=str(node_config.get("split-column", "split")))
        return cfg.site(name)
    if "partition-id" in node_config:
        pid = int(node_config["partition-id"])  # type: ignore[arg-type]
        if not 0 <= pid < len(cfg.sites):
            raise ConfigError(f"node-config partition-id={pid}: the run-config lists {len(cfg.sites)} sites "
                              f"(fix: run the simulation with num-supernodes = number of sites)")
        return cfg.sites[pid]
    raise ConfigError("node-config: no 'site' key (fix: start the SuperNode with --node-config "
                      "'site=\"NAME\" config-path=\"/path/site.yaml\"')")


def state_dir(node_config: Mapping[str, object], opts: RunOptions, site: SiteConfig, cfg: Config,
              run_key: str) -> Path:
    """Folder of this site's private state for run ``run_key``.

    ``node-config state-dir`` if given, else the simulation's ``run.state-dir/<site>``, else
    ``<site cache folder>/federated_state/<site>``; always with ``/<run_key>`` appended.
    """
    if "state-dir" in node_config:
        root = Path(str(node_config["state-dir"]))
    elif opts.state_dir:
        root = Path(opts.state_dir) / site.name
    else:
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(site.features_dir) / CACHE_FOLDER
        root = cache / STATE_FOLDER / site.name
    return root / (run_key or "default")


def site_seed(seed: int, round_: int, site: str) -> int:
    """Deterministic per-(seed, round, site) seed: the same in an uninterrupted and a resumed run."""
    return (seed * 1_000_003 + round_ * 7_919 + zlib.crc32(site.encode())) % (2**31 - 1)


def case_vectors(bags: list[Bag]) -> list[np.ndarray]:
    """One genomic vector per training case (a case with several slides counts once)."""
    seen: dict[str, np.ndarray] = {}
    for b in bags:
        if b.omics is not None and b.split == "train" and b.case_id not in seen:
            seen[b.case_id] = b.omics.numpy()
    return list(seen.values())


@dataclass
class SiteRuntime:
    """This site's config, data and device for one message."""

    cfg: Config
    opts: RunOptions
    site: SiteConfig
    data: SiteData
    device: torch.device

    @classmethod
    def load(cls, cfg: Config, opts: RunOptions, node_config: Mapping[str, object]) -> "SiteRuntime":
        """Resolve the site and load its data (through the slide cache)."""
        site = resolve_site(node_config, cfg)
        data = load_site(site, cfg)
        return cls(cfg=cfg, opts=opts, site=site, data=data, device=resolve_device(cfg.train))

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def paired(self) -> bool:
        """Whether any training slide of this site has genomics."""
        return any(b.omics is not None for b in self.data.split("train"))

    def moments(self) -> OmicsMoments:
        """Genomic moments over this site's training cases (count 0 and empty arrays without genomics)."""
        vecs = case_vectors(self.data.bags)
        if not vecs:
            return OmicsMoments(sum=np.zeros(0), sumsq=np.zeros(0), count=0)
        return omics_moments(vecs)

    def normalised(self, split: str, mean: np.ndarray | None, std: np.ndarray | None) -> list[Bag]:
        """Bags of ``split`` with genomics z-scored by (mean, std) and clipped; unchanged without genomics."""
        bags = self.data.split(split)
        if mean is None or std is None or mean.size == 0:
            return [dataclasses.replace(b, omics=None) for b in bags]
        clip = self.cfg.data.omics_clip
        return [b if b.omics is None else dataclasses.replace(b, omics=normalize_omics(b.omics, mean, std, clip))
                for b in bags]

    def build_model(self, n_genes: int) -> torch.nn.Module:
        """The federation's model with its seeded initial weights (identical at every site and the server)."""
        return build_initial_model(self.cfg, n_genes).to(self.device)


def build_initial_model(cfg: Config, n_genes: int) -> torch.nn.Module:
    """``build_model`` under ``torch.manual_seed(train.seed)``: the same initial weights in every process."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg, cfg.data.feature_dim, n_genes)
    finally:
        torch.random.set_rng_state(state)
