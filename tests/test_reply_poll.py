"""QuickReplies: the ServerApp's Grid collects replies every 0.2 s instead of Flower's fixed 3 s."""

from __future__ import annotations

import time
from types import SimpleNamespace

from server.reply_poll import QuickReplies


class SlowGrid:
    """Replies become available ``delay`` seconds after the push, one per pull; counts the pulls."""

    def __init__(self, delays: dict[str, float]) -> None:
        self.delays, self.pulls, self.t0 = delays, 0, 0.0

    def get_node_ids(self):
        return [1, 2]

    def push_messages(self, messages):
        self.t0 = time.monotonic()
        return [m for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.t0
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)
                if self.delays[i] <= now]

    def send_and_receive(self, messages, *, timeout=None):  # Flower's: a fixed 3 s between asks
        raise AssertionError("QuickReplies must not use the wrapped grid's send_and_receive")


def test_replies_collected_soon_after_the_last_one_arrives():
    grid = SlowGrid({"a": 0.0, "b": 0.5, "c": 0.9})
    quick = QuickReplies(grid)
    t0 = time.monotonic()
    replies = quick.send_and_receive(["a", "b", "c"], timeout=30)
    took = time.monotonic() - t0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"]
    assert 0.9 <= took < 0.9 + 3 * quick.every + 0.5  # Flower's grid would return at 3 s
    assert quick.get_node_ids() == [1, 2]  # everything else is the wrapped grid's


def test_timeout_returns_what_arrived():
    grid = SlowGrid({"a": 0.0, "b": 60.0})
    t0 = time.monotonic()
    replies = QuickReplies(grid).send_and_receive(["a", "b"], timeout=0.6)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert time.monotonic() - t0 < 2.0 and grid.pulls >= 2
