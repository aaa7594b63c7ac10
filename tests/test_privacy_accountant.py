"""The Rényi-DP accountant: closed forms, a published test vector, the exact Gaussian bound, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from momkd_fed.errors import ConfigError
from momkd_fed.privacy import PrivacyAccountant, epsilon_from_rho, gaussian_epsilon_exact


@pytest.mark.parametrize("sigma,steps,delta", [(1.0, 1, 1e-5), (1.0, 10, 1e-5), (0.7, 50, 1e-6), (3.0, 200, 1e-5)])
def test_standard_conversion_equals_the_closed_form_optimum(sigma, steps, delta):
    # eps(alpha) = T alpha / (2 sigma^2) + log(1/delta) / (alpha - 1); d/dalpha = 0 at alpha* = 1 + sqrt(L/c), with
    # c = T/(2 sigma^2), L = log(1/delta), giving eps* = c + 2 sqrt(c L) = T/(2 sigma^2) + sqrt(2 T L) / sigma
    acc = PrivacyAccountant(sigma, delta, conversion="standard")
    acc.step(steps)
    closed = steps / (2 * sigma ** 2) + math.sqrt(2 * steps * math.log(1 / delta)) / sigma
    assert acc.epsilon() == pytest.approx(closed, rel=1e-12)
    # ...and a brute-force minimum over a fine order grid approaches it from above
    orders = 1 + np.geomspace(1e-4, 1e4, 200_001)
    grid = np.min(steps * orders / (2 * sigma ** 2) + math.log(1 / delta) / (orders - 1))
    assert closed <= grid <= closed * (1 + 1e-6)


def test_improved_conversion_matches_dp_accounting_published_vector():
    # google/differential-privacy, python/dp_accounting/rdp/rdp_privacy_accountant_test.py,
    # test_compute_epsilon_delta_gaussian: "noise multiplier is chosen to obtain exactly (1, 1e-6)-DP" for one
    # unsampled Gaussian release with sigma = 4.530877117 (their orders: 1.001 ... 99.999 in steps of 0.001)
    acc = PrivacyAccountant(4.530877117, 1e-6)
    acc.step()
    assert acc.epsilon() == pytest.approx(1.0, abs=1e-6)


def test_improved_conversion_matches_a_fine_grid_and_bounds_the_exact_epsilon_from_above():
    for sigma, steps in [(1.0, 1), (1.0, 10), (0.5, 3), (2.0, 100)]:
        acc = PrivacyAccountant(sigma, 1e-5)
        acc.step(steps)
        orders = 1 + np.geomspace(1e-4, 1e4, 200_001)
        rdp = steps * orders / (2 * sigma ** 2)
        grid = np.min(rdp + np.log((orders - 1) / orders) - (math.log(1e-5) + np.log(orders)) / (orders - 1))
        eps = acc.epsilon()
        assert eps == pytest.approx(grid, rel=1e-6)
        exact = acc.epsilon_exact()
        std = epsilon_from_rho(acc.rho, 1e-5, "standard")
        assert exact < eps < std  # exact <= improved RDP <= standard RDP
        assert eps < 1.15 * exact


def test_exact_gaussian_epsilon_solves_the_balle_wang_equation():
    # delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), evaluated independently with scipy.stats
    for mu, delta in [(1.0, 1e-5), (0.3, 1e-3), (3.0, 1e-6)]:
        eps = gaussian_epsilon_exact(mu, delta)
        back = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
        assert back == pytest.approx(delta, rel=1e-6)
    # mu = 1 at eps = 1: delta = Phi(-0.5) - e Phi(-1.5) = 0.12693...
    assert gaussian_epsilon_exact(1.0, 0.126936) == pytest.approx(1.0, abs=1e-4)


def test_composition_adds_rdp_and_mixed_multipliers_compose_like_one_gaussian():
    a = PrivacyAccountant(1.0, 1e-5)
    a.step(4)
    b = PrivacyAccountant(2.0, 1e-5)
    b.step(16)  # 16 releases at sigma 2 = 4 releases at sigma 1 (1/sigma^2 adds)
    assert a.epsilon() == pytest.approx(b.epsilon(), rel=1e-9)
    c = PrivacyAccountant(1.0, 1e-5)
    c.step(2)
    c.step(8, noise_multiplier=2.0)
    assert c.epsilon() == pytest.approx(a.epsilon(), rel=1e-9) and c.steps == 10
    assert a.rdp(3.0) == pytest.approx(4 * 3.0 / 2)
    r = a.report()
    assert r["epsilon_round"] < r["epsilon"] and r["steps"] == 4
    assert PrivacyAccountant(1.0, 1e-5).epsilon() == 0.0  # nothing released yet


def test_state_round_trips_through_a_checkpoint_file(tmp_path):
    path = tmp_path / "site" / "accountant.json"
    a = PrivacyAccountant.load_or_new(path, 1.3, 1e-5)
    assert a.steps == 0
    a.step(3)
    a.save(path)
    b = PrivacyAccountant.load_or_new(path, 1.3, 1e-5)
    assert b.state_dict() == a.state_dict() and b.epsilon() == a.epsilon()
    b.step()
    assert b.epsilon() > a.epsilon()
    path.write_text("{not json")
    with pytest.raises(ValueError, match="must not be deleted silently"):
        PrivacyAccountant.load_or_new(path, 1.3, 1e-5)


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="privacy.noise_multiplier"):
        PrivacyAccountant(0.0, 1e-5)
    with pytest.raises(ConfigError, match="privacy.delta"):
        PrivacyAccountant(1.0, 1.5)
