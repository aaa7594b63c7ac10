"""Packing tensors and statistics into Flower records and back (used by the ClientApp and the ServerApp).

Record names and metric keys come from :mod:`momkd_fed.federation.contract`; the few names the Flower glue adds
on top of it are defined here, once:

- ``"site"`` (ConfigRecord, every site reply): :data:`SITE_NAME`, :data:`SITE_PAIRED`, :data:`SITE_GENES`,
  :data:`SITE_TRAIN_SLIDES`, :data:`SITE_TEST_SLIDES` -- who replied (node ids are not stable across restarts).
- ``"metrics-personal"`` (MetricRecord, evaluate reply): the personalised model's test metrics
  (global shared weights + this site's private head and temperature), same keys as ``"metrics"``, which holds
  the *global* model's test metrics.
- ``"omics"`` (ArrayRecord): site -> server the genomic moments (:data:`MOMENT_KEYS`); server -> site the
  federation's z-score statistics (:data:`NORM_KEYS`).
- config keys :data:`CFG_N_GENES` (genes of the federation's genomic branch) and :data:`CFG_RUN_KEY` (identifies
  the run across a resume, so a site finds its own private state again).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from momkd_fed.federation import contract

SITE_RECORD = "site"
SITE_NAME = "name"  # str
SITE_PAIRED = "paired"  # bool: the site holds genomics
SITE_GENES = "n-genes"  # int: genes of the site's genomic matrix (0 = histology-only)
SITE_TRAIN_SLIDES = "train-slides"  # int
SITE_TEST_SLIDES = "test-slides"  # int

PERSONAL_METRICS_RECORD = "metrics-personal"

MOMENT_KEYS = ("sum", "sumsq", "count")  # (G,), (G,), (1,) float64
NORM_KEYS = ("mean", "std")  # (G,), (G,) float32

CFG_N_GENES = "n-genes"  # int
CFG_RUN_KEY = "run-key"  # str


def to_record(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """Tensors or arrays -> ArrayRecord (keys and order kept; bf16 sent as float32)."""
    arrays = {}
    for k, v in tensors.items():
        if isinstance(v, torch.Tensor):
            v = contract.to_numpy({k: v})[k]
        arrays[k] = Array(np.ascontiguousarray(v))
    return ArrayRecord(arrays)


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> CPU tensors (writable copies), keys and order kept."""
    return contract.from_numpy({k: a.numpy() for k, a in record.items()})


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of every array in a RecordDict (what dominates a message's size on the wire)."""
    return sum(len(a.data) for rec in content.array_records.values() for a in rec.values())


def site_record(name: str, paired: bool, n_genes: int, train_slides: int, test_slides: int) -> ConfigRecord:
    """The ``"site"`` ConfigRecord every reply carries."""
    return ConfigRecord({SITE_NAME: name, SITE_PAIRED: bool(paired), SITE_GENES: int(n_genes),
                         SITE_TRAIN_SLIDES: int(train_slides), SITE_TEST_SLIDES: int(test_slides)})


def reply_site(msg: Message) -> str:
    """Site name of a reply (its ``"site"`` record), else ``"node-<id>"`` (error replies carry no content)."""
    if msg.has_content() and SITE_RECORD in msg.content.config_records:
        return str(msg.content.config_records[SITE_RECORD][SITE_NAME])
    return f"node-{msg.metadata.src_node_id}"


def metrics_record(values: Mapping[str, float]) -> MetricRecord:
    """A MetricRecord from checked contract values (ints stay ints, floats stay floats)."""
    return MetricRecord({k: (int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else float(v))
                         for k, v in values.items()})
