"""Which round's global model the federation keeps: the one with the best pooled validation AUC.

A centralised run keeps its best epoch by validation AUC (``engine.fit``); the federation does the same over rounds.
Each site scores the *global* model of round r on its own validation split (histology-only) and sends the AUC and
the slide count; the server pools them as a slide-weighted mean (per-slide scores never leave a site) and keeps
the round with the highest value. The monitored head is the classifier when ``classifier.`` is shared (the global
classifier is trained), otherwise the memory score delta(F_wsi), whose head is always global.

A round whose pooled value is NaN (no site has validation slides of both classes) never displaces a finite one;
when no round has a finite value the latest round is kept, as a centralised run without validation does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..run_log import slide_weighted_mean
from . import contract
from .sharing import classifier_shared


def monitor_key(shared: list[str]) -> str:
    """:data:`contract.VAL_AUC` if the classifier is shared, else :data:`contract.VAL_AUC_MEMORY`."""
    return contract.VAL_AUC if classifier_shared(shared) else contract.VAL_AUC_MEMORY


def pooled_validation(site_metrics: Mapping[str, Mapping[str, float]], key: str) -> float:
    """Slide-weighted mean of ``key`` over the sites' global-model evaluate metrics; NaN if no site has a value.

    Parameters
    ----------
    site_metrics : mapping
        Site -> its evaluate metrics (:data:`contract.EVALUATE_METRIC_KEYS`) of the global model.
    """
    return slide_weighted_mean({s: m[key] for s, m in site_metrics.items()},
                               {s: m[contract.VAL_SLIDES] for s, m in site_metrics.items()})


@dataclass
class BestRound:
    """The best round so far: ``round`` (0 = none yet), its pooled validation ``score`` and the ``monitor`` key."""

    round: int = 0
    score: float = math.nan
    monitor: str = ""

    def offer(self, rnd: int, score: float, monitor: str) -> bool:
        """Take round ``rnd`` if it is better (strictly higher; ties keep the earlier round); True if taken."""
        finite, best_finite = math.isfinite(score), math.isfinite(self.score)
        if self.round == 0 or (finite and (not best_finite or score > self.score)) or (not finite and not best_finite):
            self.round, self.score, self.monitor = rnd, float(score), monitor
            return True
        return False

    def state_dict(self) -> dict:
        return {"round": self.round, "score": self.score, "monitor": self.monitor}

    @classmethod
    def from_state_dict(cls, d: Mapping | None) -> "BestRound":
        d = d or {}
        return cls(round=int(d.get("round", 0)), score=float(d.get("score", math.nan)),
                   monitor=str(d.get("monitor", "")))
