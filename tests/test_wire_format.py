"""``federation.wire_dtype``: 16-bit train replies (the update vs. the global weights) and their decoding.

The unit tests check the packing boundary (client/records.py) through Flower's own Array serialisation; the
round test runs setup + one round through the real ClientApp and strategy (Messages handed over in this process,
as in tests/test_flower_inprocess.py) and checks what the replies really carried.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import array_from_proto, array_to_proto
from flwr.supercore.task_identity import TaskIdentity

from client import records as R
from momkd_fed.federation import contract


def _weights(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = {"enc.weight": torch.randn(64, 32, generator=g) * 0.05, "enc.bias": torch.randn(64, generator=g) * 0.05,
            "steps": torch.tensor([7], dtype=torch.int64)}
    new = {k: (v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 1)
           for k, v in base.items()}
    return base, new


@pytest.mark.parametrize("wire,itemsize", [("bfloat16", 2), ("float16", 2), ("float32", 4)])
def test_round_trip_through_flower_serialisation(wire, itemsize):
    base, new = _weights()
    rec = R.to_record(new, wire, base)
    w = rec["enc.weight"]
    assert w.dtype == wire and tuple(w.shape) == (64, 32)
    if wire == "bfloat16":
        assert len(w.data) == 64 * 32 * 2  # raw 2-byte values, no header
    else:
        assert 64 * 32 * itemsize < len(w.data) <= 64 * 32 * itemsize + 256  # .npy header
    assert rec["steps"].dtype == "int64" and rec["steps"].stype == "numpy.ndarray"  # not floating: unchanged
    # through Flower's protobuf form, as it travels
    wire_rec = {k: array_from_proto(array_to_proto(a)) for k, a in rec.items()}
    out = R.from_record(wire_rec, base=base)
    assert out["enc.weight"].dtype == torch.float32 and torch.equal(out["steps"], new["steps"])
    delta = new["enc.weight"] - base["enc.weight"]
    err = (out["enc.weight"] - new["enc.weight"]).abs().max().item()
    bound = {"bfloat16": 2.0**-8, "float16": 2.0**-10, "float32": 0.0}[wire] * delta.abs().max().item()
    assert err <= bound + 1e-9  # relative to the update, not to the weights
    if wire != "float32":
        assert err > 0.0  # it really was rounded


def test_update_needs_the_global_weights():
    base, new = _weights()
    with pytest.raises(ValueError, match="base"):
        R.to_record(new, "bfloat16")
    with pytest.raises(ValueError, match="wire_dtype"):
        R.to_record(new, "int8", base)
    rec = R.to_record(new, "float16", base)
    with pytest.raises(ValueError, match="enc.weight"):
        R.from_record(rec)


def test_histology_only_reply_half_the_bytes():
    """bf16 halves a reply's array payload (keys missing from the reply are simply absent)."""
    base, new = _weights()
    del new["enc.bias"]
    full = R.record_bytes(RecordDict({"arrays": R.to_record(new)}))
    half = R.record_bytes(RecordDict({"arrays": R.to_record(new, "bfloat16", base)}))
    assert half < 0.55 * full


class _Grid:
    """Flower Grid stand-in: each Message goes to the real ClientApp in this process; replies are kept."""

    def __init__(self, run_config: dict, n: int) -> None:
        from client.client_app import app

        self.app = app
        self.nodes = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i, "num-partitions": n},
                                       state=RecordDict(), run_config=run_config) for i in range(n)}
        self.replies: list[tuple[str, Message]] = []
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            try:
                reply = self.app(msg, self.nodes[msg.metadata.dst_node_id])
            except Exception as exc:  # as Flower's runtime does
                reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            self.replies.append((msg.metadata.message_type, reply))
            out.append(reply)
        return out


@pytest.mark.slow
def test_round_with_bf16_wire(tmp_path):
    from client.run_config import RunOptions, make_run_config, split_run_config
    from momkd_fed.config import load_config
    from momkd_fed.synth import synthesize
    from server.rounds import run_federation

    torch.set_num_threads(1)
    path = synthesize("tiny", tmp_path / "data", seed=0, slides_per_site=[16, 16, 16])
    cfg = load_config(path, {"federation.rounds": 1, "memory.kmeans_iters": 2, "federation.wire_dtype": "bfloat16"})
    rc = make_run_config(cfg, RunOptions(out_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state")))
    grid = _Grid(rc, len(cfg.sites))
    cfg, opts = split_run_config(rc)
    result = run_federation(grid, cfg, opts)
    assert result["rounds_completed"] == 1

    train = [m for kind, m in grid.replies if kind == "train"]
    assert len(train) == 3 and not any(m.has_error() for m in train)
    for m in train:
        arrays = m.content.array_records[contract.ARRAYS_RECORD]
        assert {a.dtype for a in arrays.values()} == {"bfloat16"}
        assert all(a.stype == R.DELTA_STYPE + "bfloat16" and len(a.data) == 2 * int(np.prod(a.shape))
                   for a in arrays.values())
        memory = m.content.array_records[contract.MEMORY_RECORD]  # memory aggregates keep their float32
        assert {a.dtype for a in memory.values()} == {"float32"}
    # the server's global weights moved and stayed float32 and finite
    from server import run_outputs

    st = run_outputs.load_latest(tmp_path / "run", cfg)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in st.shared.values())
    rows = (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    r1 = json.loads(rows[0])
    # received bytes: about half of the float32 shared weights (plus float32 memory aggregates)
    sent_shared = sum(4 * v.numel() for v in st.shared.values())
    assert r1["bytes_received"]["hospital_a"] < 0.6 * sent_shared


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_zero_dim_parameters_keep_their_shape(wire):
    """A 0-d parameter (e.g. log_tau, when the config shares it) comes back 0-d, so sites can load it."""
    base = {"log_tau": torch.tensor(-1.6)}
    new = {"log_tau": torch.tensor(-1.5)}
    rec = R.to_record(new, wire, base)
    wire_rec = {k: array_from_proto(array_to_proto(a)) for k, a in rec.items()}
    out = R.from_record(wire_rec, base=base)
    assert out["log_tau"].shape == () and abs(float(out["log_tau"]) + 1.5) < 1e-2
