"""Privacy accounting for the Gaussian mechanism composed over rounds (Rényi DP), reported as (epsilon, delta).

What is accounted: a sequence of releases, each a Gaussian mechanism whose L2 sensitivity is C and whose noise has
standard deviation ``sigma * C`` (``sigma`` = noise multiplier). The adjacency is add/remove one unit (one slide
for the memory release, :mod:`.mechanism`; one site for the update noise, :mod:`.robust`). No subsampling
amplification is claimed: a site releases once in every round it takes part in, with probability 1, and every
such release is counted (``step``). Rounds a site was not sampled in cost nothing and are not counted.

Rényi DP of one release (Mironov 2017, Prop. 7): ``rdp(alpha) = alpha / (2 sigma^2)``; composition adds, so with
releases of possibly different multipliers ``rdp(alpha) = alpha * sum_t 1 / (2 sigma_t^2)`` — the accountant
keeps only ``sum_t 1 / sigma_t^2`` and the step count, exactly.

Conversion to (epsilon, delta), minimised over the order alpha > 1 (continuous: the Gaussian RDP curve is known
in closed form, so no order grid is needed):

- ``"improved"`` (default; Balle, Barthe, Gaboardi, Hsu & Sato 2020, Thm. 21; the same bound as Canonne, Kamath &
  Steinke 2020 and as Opacus/TF-Privacy's ``get_privacy_spent``)::

      epsilon = rdp(alpha) + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1)

- ``"standard"`` (Mironov 2017, Prop. 3)::

      epsilon = rdp(alpha) + log(1 / delta) / (alpha - 1)

  whose optimum for the Gaussian is closed-form: ``epsilon = rho + 2 sqrt(rho log(1/delta))`` with
  ``rho = sum_t 1 / (2 sigma_t^2)`` (i.e. ``T/(2 sigma^2) + sqrt(2 T log(1/delta)) / sigma`` for T equal steps).

:func:`gaussian_epsilon_exact` gives the exact (tight) epsilon of the same composition (a T-fold composition of
Gaussian mechanisms is one Gaussian mechanism with ``mu = sqrt(sum_t 1/sigma_t^2)``; Balle & Wang 2018, Thm. 8):
both RDP conversions are upper bounds of it, which the tests check.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigError

CONVERSIONS = ("improved", "standard")


def _check(noise_multiplier: float, delta: float) -> None:
    if not (noise_multiplier > 0.0 and math.isfinite(noise_multiplier)):
        raise ConfigError(f"privacy.noise_multiplier: must be a finite number > 0, got {noise_multiplier}")
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"privacy.delta: must be in (0, 1), got {delta}")


def epsilon_from_rho(rho: float, delta: float, conversion: str = "improved") -> float:
    """Smallest epsilon of a mechanism with RDP curve ``rdp(alpha) = rho * alpha`` at this delta.

    Parameters
    ----------
    rho : float
        ``sum_t 1 / (2 sigma_t^2)`` (0 = nothing released).
    delta : float
        In (0, 1).
    conversion : {"improved", "standard"}
        See the module docstring.

    Returns
    -------
    float
        epsilon >= 0 (0.0 when ``rho == 0``).
    """
    if conversion not in CONVERSIONS:
        raise ValueError(f"conversion must be one of {CONVERSIONS}, got {conversion!r}")
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"privacy.delta: must be in (0, 1), got {delta}")
    if rho < 0.0 or not math.isfinite(rho):
        raise ValueError(f"rho must be finite and >= 0, got {rho}")
    if rho == 0.0:
        return 0.0
    log_inv_delta = -math.log(delta)
    if conversion == "standard":
        return rho + 2.0 * math.sqrt(rho * log_inv_delta)

    def eps(alpha: float) -> float:
        return (rho * alpha + math.log((alpha - 1.0) / alpha)
                - (math.log(delta) + math.log(alpha)) / (alpha - 1.0))

    # The standard optimum alpha* = 1 + sqrt(log(1/delta)/rho) is a good centre; search a wide log bracket around
    # it (eps is smooth and unimodal in alpha > 1 for this curve).
    a0 = 1.0 + math.sqrt(log_inv_delta / rho)
    u0 = math.log(a0 - 1.0)  # search u = log(alpha - 1) within a factor e^8 of the standard optimum
    from scipy import optimize  # here, not at import: only a run with differential privacy needs it

    res = optimize.minimize_scalar(lambda u: eps(1.0 + math.exp(u)), bounds=(u0 - 8.0, min(u0 + 8.0, 16.0)),
                                   method="bounded", options={"xatol": 1e-10})
    return max(0.0, float(min(res.fun, eps(a0))))


def gaussian_epsilon_exact(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity/std ratio ``mu`` (mu-GDP) at ``delta``.

    Solves ``delta = Phi(-eps/mu + mu/2) - exp(eps) Phi(-eps/mu - mu/2)`` for eps (Balle & Wang 2018, Thm. 8;
    Dong, Roth & Su 2019, Cor. 2.13). For T releases with multipliers sigma_t, ``mu = sqrt(sum_t 1/sigma_t^2)``.
    """
    if mu <= 0.0:
        return 0.0
    from scipy import optimize, special  # here, not at import: only a run with differential privacy needs it

    def gap(e: float) -> float:
        # log-space for the second term keeps exp(eps) * Phi(..) finite for large eps
        a = special.ndtr(-e / mu + mu / 2.0)
        b = math.exp(e + special.log_ndtr(-e / mu - mu / 2.0))
        return a - b - delta

    if gap(0.0) <= 0.0:
        return 0.0
    hi = 1.0
    while gap(hi) > 0.0:
        hi *= 2.0
    return float(optimize.brentq(gap, 0.0, hi, xtol=1e-12))


class PrivacyAccountant:
    """Rényi-DP accountant of one party's Gaussian releases (a site's memory, or the server's update noise).

    Parameters
    ----------
    noise_multiplier : float
        Default sigma of a release (noise std / sensitivity).
    delta : float
        delta of the reported guarantee.
    conversion : {"improved", "standard"}
        RDP -> (epsilon, delta) conversion (module docstring).

    Examples
    --------
    >>> acc = PrivacyAccountant(noise_multiplier=1.0, delta=1e-5)
    >>> acc.step()            # one round's release
    >>> round_eps, total_eps = acc.epsilon(steps=1), acc.epsilon()
    """

    def __init__(self, noise_multiplier: float, delta: float, conversion: str = "improved") -> None:
        _check(noise_multiplier, delta)
        if conversion not in CONVERSIONS:
            raise ValueError(f"conversion must be one of {CONVERSIONS}, got {conversion!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.conversion = conversion
        self.steps = 0  # releases counted
        self.inv_var = 0.0  # sum over releases of 1 / sigma_t^2

    def step(self, n: int = 1, noise_multiplier: float | None = None) -> None:
        """Count ``n`` releases made with ``noise_multiplier`` (default: the accountant's)."""
        sigma = self.noise_multiplier if noise_multiplier is None else float(noise_multiplier)
        _check(sigma, self.delta)
        if n < 0:
            raise ValueError(f"step: n must be >= 0, got {n}")
        self.steps += int(n)
        self.inv_var += n / sigma ** 2

    @property
    def rho(self) -> float:
        """Slope of the composed RDP curve: ``rdp(alpha) = rho * alpha``."""
        return self.inv_var / 2.0

    def rdp(self, alpha: float) -> float:
        """Composed Rényi DP at order ``alpha`` > 1."""
        if alpha <= 1.0:
            raise ValueError(f"rdp: order alpha must be > 1, got {alpha}")
        return self.rho * alpha

    def epsilon(self, delta: float | None = None, steps: int | None = None) -> float:
        """epsilon of everything counted so far (or of ``steps`` releases at the default multiplier)."""
        d = self.delta if delta is None else float(delta)
        rho = self.rho if steps is None else steps / (2.0 * self.noise_multiplier ** 2)
        return epsilon_from_rho(rho, d, self.conversion)

    def epsilon_exact(self, delta: float | None = None) -> float:
        """The tight epsilon of the same composition (:func:`gaussian_epsilon_exact`), for comparison."""
        return gaussian_epsilon_exact(math.sqrt(self.inv_var), self.delta if delta is None else float(delta))

    def report(self) -> dict[str, float]:
        """``epsilon_round`` (one release), ``epsilon`` (cumulated), ``delta``, ``steps``, for logs."""
        return {"epsilon_round": self.epsilon(steps=1), "epsilon": self.epsilon(), "delta": self.delta,
                "steps": self.steps, "noise_multiplier": self.noise_multiplier}

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain JSON-able state."""
        return {"noise_multiplier": self.noise_multiplier, "delta": self.delta, "conversion": self.conversion,
                "steps": self.steps, "inv_var": self.inv_var}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` (the noise multiplier and delta of the state win)."""
        for key in ("noise_multiplier", "delta", "steps", "inv_var"):
            if key not in state:
                raise ValueError(f"accountant state: missing {key!r} (got {sorted(state)})")
        _check(float(state["noise_multiplier"]), float(state["delta"]))
        self.noise_multiplier = float(state["noise_multiplier"])
        self.delta = float(state["delta"])
        self.conversion = str(state.get("conversion", self.conversion))
        self.steps = int(state["steps"])
        self.inv_var = float(state["inv_var"])

    def save(self, path: str | Path) -> None:
        """Write the state as JSON, atomically (temp file + rename)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(self.state_dict(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)

    @classmethod
    def load_or_new(cls, path: str | Path, noise_multiplier: float, delta: float,
                    conversion: str = "improved") -> "PrivacyAccountant":
        """The accountant saved at ``path``, or a fresh one when there is none.

        The counted releases (steps, sum of 1/sigma^2) are restored; ``noise_multiplier`` (for future steps) and
        ``delta`` (for reports) are the current settings.
        """
        acc = cls(noise_multiplier, delta, conversion)
        p = Path(path)
        if p.is_file():
            try:
                state = json.loads(p.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}: privacy accountant state is not valid JSON ({exc}); it records the privacy "
                                 f"budget already spent, so it must not be deleted silently") from exc
            acc.load_state_dict(state)
            acc.noise_multiplier = float(noise_multiplier)
            acc.delta = float(delta)
        return acc
