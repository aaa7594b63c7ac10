"""Packing tensors and statistics into Flower records and back (used by the ClientApp and the ServerApp).

Every record name, array key, metric key and config key is defined once, in :mod:`momkd_fed.federation.contract`
(including the ones the Flower glue uses: the ``"site"`` ConfigRecord, ``"metrics-personal"``, the ``"omics"``
moment / z-score keys, and the ``n-genes`` / ``run-key`` config keys); the names below are re-exported from
there so that ``records.SITE_RECORD`` and ``contract.SITE_RECORD`` are the same object.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from momkd_fed.federation import contract
from momkd_fed.federation.contract import (CFG_N_GENES, CFG_RUN_KEY, MOMENT_KEYS, NORM_KEYS,  # noqa: F401
                                           PERSONAL_METRICS_RECORD, SITE_GENES, SITE_NAME, SITE_PAIRED, SITE_RECORD,
                                           SITE_TEST_SLIDES, SITE_TRAIN_SLIDES)


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
