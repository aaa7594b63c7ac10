"""Packing tensors and statistics into Flower records and back (used by the ClientApp and the ServerApp).

Every record name, array key, metric key and config key is defined once, in :mod:`momkd_fed.federation.contract`
(including the ones the Flower glue uses: the ``"site"`` ConfigRecord, ``"metrics-personal"``, the ``"omics"``
moment / z-score keys, and the ``n-genes`` / ``run-key`` config keys); the names below are re-exported from
there so that ``records.SITE_RECORD`` and ``contract.SITE_RECORD`` are the same object.
"""

from __future__ import annotations

from collections.abc import Mapping
from io import BytesIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from momkd_fed.federation import contract
from momkd_fed.federation.contract import (CFG_N_GENES, CFG_RUN_KEY, MOMENT_KEYS, NORM_KEYS,  # noqa: F401
                                           PERSONAL_METRICS_RECORD, SITE_GENES, SITE_NAME, SITE_PAIRED, SITE_RECORD,
                                           SITE_TEST_SLIDES, SITE_TRAIN_SLIDES)


WIRE_DTYPES = ("float32", "bfloat16", "float16")  # federation.wire_dtype values
DELTA_STYPE = "momkd.delta."  # + wire dtype: an Array holding ``value - base`` in that dtype (see to_record)


def to_record(tensors: Mapping[str, torch.Tensor | np.ndarray], wire_dtype: str = "float32",
              base: Mapping[str, torch.Tensor] | None = None) -> ArrayRecord:
    """Tensors or arrays -> ArrayRecord (keys and order kept; bf16 tensors sent as float32).

    Parameters
    ----------
    wire_dtype : "float32", "bfloat16" or "float16"
        ``federation.wire_dtype``. Other than float32, each floating tensor travels as its difference from
        ``base[key]`` (the global weights the server sent this round) in that dtype: stype ``momkd.delta.float16``
        (a float16 .npy) or ``momkd.delta.bfloat16`` (raw little-endian bfloat16, 2 bytes per value). Sending the
        update rather than the weights keeps the rounding error relative to the round's change, not to the
        weights (absolute bf16 weights would add a rounding bias of up to 2**-9 of each weight every round).
        Non-floating tensors and keys missing from ``base`` travel unchanged. :func:`from_record` with the same
        ``base`` restores float32 values.
    base : mapping str -> Tensor, optional
        Required when ``wire_dtype`` is not float32.
    """
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype: {wire_dtype!r} is not one of {WIRE_DTYPES}")
    if wire_dtype != "float32" and base is None:
        raise ValueError(f"wire_dtype {wire_dtype}: the global weights (base) are needed to send updates")
    arrays = {}
    for k, v in tensors.items():
        if wire_dtype != "float32" and k in base and _is_float(v):
            arrays[k] = _delta_array(torch.as_tensor(v).detach().cpu().float() - base[k].detach().cpu().float(),
                                     wire_dtype)
            continue
        if isinstance(v, torch.Tensor):
            v = contract.to_numpy({k: v})[k]
        arrays[k] = Array(np.asarray(v, order="C"))  # keeps 0-d tensors 0-d (ascontiguousarray makes them 1-d)
    return ArrayRecord(arrays)


def _is_float(v: torch.Tensor | np.ndarray) -> bool:
    return v.is_floating_point() if isinstance(v, torch.Tensor) else np.issubdtype(v.dtype, np.floating)


def _delta_array(delta: torch.Tensor, wire_dtype: str) -> Array:
    """A float32 update -> Array of stype ``momkd.delta.<wire_dtype>``."""
    shape = tuple(int(d) for d in delta.shape)
    if wire_dtype == "float16":
        buf = BytesIO()
        np.save(buf, np.asarray(delta.numpy().astype(np.float16), order="C"), allow_pickle=False)
        return Array(dtype="float16", shape=shape, stype=DELTA_STYPE + wire_dtype, data=buf.getvalue())
    raw = delta.contiguous().to(torch.bfloat16).view(torch.int16).numpy().astype("<i2")  # round to nearest even
    return Array(dtype="bfloat16", shape=shape, stype=DELTA_STYPE + wire_dtype, data=raw.tobytes())


def _decode(key: str, a: Array, base: Mapping[str, torch.Tensor] | None) -> np.ndarray:
    if not a.stype.startswith(DELTA_STYPE):
        return a.numpy()
    if base is None or key not in base:
        raise ValueError(f"{key!r} arrived as an update ({a.stype}) but no global weights were given to add it to")
    if a.stype == DELTA_STYPE + "float16":
        delta = np.load(BytesIO(a.data), allow_pickle=False).astype(np.float32)
    elif a.stype == DELTA_STYPE + "bfloat16":
        bits = np.frombuffer(a.data, dtype="<u2").astype(np.uint32) << 16
        delta = bits.view(np.float32).reshape(a.shape)
    else:
        raise ValueError(f"{key!r}: unknown array serialisation {a.stype!r}")
    return base[key].detach().cpu().float().numpy() + delta  # float32 before any maths


def from_record(record: ArrayRecord, base: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """ArrayRecord -> CPU tensors (writable copies), keys and order kept.

    Arrays sent as updates (``wire_dtype`` other than float32, see :func:`to_record`) are added to ``base`` and
    come back as float32.
    """
    return contract.from_numpy({k: _decode(k, a, base) for k, a in record.items()})


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
