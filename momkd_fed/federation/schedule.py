"""The local learning rate of each federated round (``federation.lr_schedule``), as a pure function.

The server sends it to every site in the round's config (``contract.CFG_LR``); a resumed run sends exactly what the
uninterrupted run would have, since it depends on the round number only.

- ``constant``: ``train.lr`` in every round.
- ``cosine``: from ``train.lr`` in round 1 down to ``train.lr * federation.lr_final_factor`` in round
  ``federation.rounds``, along half a cosine::

      lr_r = lr * (f + (1 - f) * (1 + cos(pi * (r - 1) / (R - 1))) / 2)
"""

from __future__ import annotations

import math

from ..config import Config


def round_lr(cfg: Config, server_round: int) -> float:
    """Local learning rate of round ``server_round`` (1-based; rounds past ``federation.rounds`` keep the last)."""
    lr = float(cfg.train.lr)
    fed = cfg.federation
    if fed.lr_schedule == "constant" or fed.rounds <= 1:
        return lr
    t = min(max(server_round - 1, 0), fed.rounds - 1) / (fed.rounds - 1)  # 0 in round 1, 1 in the last
    f = fed.lr_final_factor
    return lr * (f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * t)))
