"""Scaling-law fits: known laws are recovered; degenerate input is flagged or refused, never fitted silently."""
import math

import numpy as np
import pytest

from bench.fits import FitError, data_efficiency, fit_joint_limit, fit_power_law, tokens_for_loss


@pytest.mark.parametrize("A,B,C", [(0.05, 1.02, 3.43), (2.0, 0.25, 3.0), (0.3, 0.5, 5.2)])
def test_recovers_known_law_from_noiseless_points(A, B, C):
    x = np.array([0.15, 0.3, 0.6, 1.4, 2.8, 5.6])
    fit = fit_power_law(x, A / x**B + C, n_boot=20)
    assert fit.converged
    assert fit.A == pytest.approx(A, rel=1e-3)
    assert fit.B == pytest.approx(B, rel=1e-3)
    assert fit.C == pytest.approx(C, abs=1e-3)
    assert fit.ok, fit.flags


def test_recovers_law_from_noisy_seeds_and_bootstrap_covers_truth():
    rng = np.random.default_rng(1)
    A, B, C = 0.8, 0.5, 3.3
    n = np.repeat([0.25, 0.5, 1.0, 2.0, 4.0, 8.0], 3)  # three seeds per size
    loss = A / n**B + C + rng.normal(0, 0.003, len(n))
    fit = fit_power_law(n, loss, n_boot=100)
    assert fit.bootstrap == "seeds"
    assert fit.replicates == (3,) * 6
    assert fit.C == pytest.approx(C, abs=0.05)
    assert 0 < fit.C_std < 0.1
    lo, hi = fit.C_interval
    assert lo - 3 * fit.C_std <= C <= hi + 3 * fit.C_std
    assert "±" in fit.asymptote()


def test_cpu_scale_parameter_counts_converge():
    """x in billions of parameters at CPU scale (1e-4 .. 1e-2) is far from p0 = [1, 0.5, 2]; still fits."""
    x = np.array([0.26e-3, 1.05e-3, 1.8e-3, 6.3e-3, 19e-3])
    fit = fit_power_law(x, 0.02 / x**0.35 + 4.1, n_boot=20)
    assert fit.converged and fit.C == pytest.approx(4.1, abs=0.01)


def test_two_points_are_flagged_not_fitted():
    fit = fit_power_law([1.0, 2.0], [5.4, 5.3])
    assert not fit.converged and not fit.ok
    assert math.isnan(fit.C)
    assert any("need >= 3" in f for f in fit.flags)
    assert "FLAGGED" in str(fit)


def test_three_points_fit_exactly_and_say_so():
    fit = fit_power_law([1.0, 2.0, 3.0], [5.411, 5.284, 5.263], n_boot=20)
    assert fit.converged
    assert any("exact fit" in f for f in fit.flags)


def test_constant_loss_is_flagged():
    fit = fit_power_law([1.0, 2.0, 4.0, 8.0], [5.0] * 4, n_boot=20)
    assert any("constant" in f for f in fit.flags)
    assert any("A = 0" in f for f in fit.flags)


def test_rising_loss_overfitting_is_flagged():
    """The standard recipe overfits at large N: the law does not hold and the fit must say so."""
    fit = fit_power_law([0.15, 0.3, 0.6, 1.4], [3.838, 3.785, 3.750, 3.764], n_boot=20)
    assert not fit.ok
    assert fit.flags


@pytest.mark.parametrize("x,y,message", [
    ([1.0, 2.0, float("nan")], [1.0, 2.0, 3.0], "non-finite"),
    ([1.0, 2.0, 3.0], [1.0, float("inf"), 3.0], "non-finite"),
    ([-1.0, 2.0, 3.0], [1.0, 2.0, 3.0], "x must be > 0"),
    ([0.0, 2.0, 3.0], [1.0, 2.0, 3.0], "x must be > 0"),
    ([1.0, 2.0], [1.0, 2.0, 3.0], "differ in length"),
    ([], [], "no points"),
])
def test_invalid_input_raises_with_the_problem_named(x, y, message):
    with pytest.raises(FitError, match=message):
        fit_power_law(x, y)


def test_joint_limit_recovers_known_asymptote():
    ns, ks = [0.15, 0.3, 0.6, 1.4], [1, 2, 3, 4, 5]
    c_n = {n: 0.05 / n**1.0 + 3.17 for n in ns}
    points = [(n, k, 0.4 / k**0.8 + c_n[n]) for n in ns for k in ks]
    joint = fit_joint_limit(points, n_boot=20)
    for n, fit in joint.per_n.items():
        assert fit.C == pytest.approx(c_n[n], abs=1e-3)
    assert joint.C == pytest.approx(3.17, abs=1e-3)
    assert joint.over_n is not None and joint.over_n.converged


def test_joint_limit_flags_sizes_with_too_few_k():
    points = [(n, k, 0.4 / k + 0.05 / n + 3.2) for n in (0.15, 0.3, 0.6) for k in (1, 2, 3)] + [(1.4, 1, 3.5)]
    joint = fit_joint_limit(points, n_boot=10)
    assert any("N=1.4" in f and "left out" in f for f in joint.flags)


def test_data_efficiency_inverts_the_data_law():
    A, B, C = 2.0, 0.25, 3.0
    d = np.array([0.2, 0.4, 0.8, 1.6, 3.2])
    law = fit_power_law(d, A / d**B + C, n_boot=20)
    loss = A / 0.9**B + C  # the standard recipe needs 0.9 (units of D) to reach this loss
    eff = data_efficiency(law, loss, tokens=0.2)
    assert eff.equivalent_tokens == pytest.approx(0.9, rel=1e-3)
    assert eff.efficiency == pytest.approx(4.5, rel=1e-3)
    assert not eff.flags
    assert tokens_for_loss((A, B, C), A / 1.6**B + C) == pytest.approx(1.6)


def test_data_efficiency_below_the_standard_asymptote_is_unbounded_and_flagged():
    d = np.array([0.2, 0.4, 0.8, 1.6])
    law = fit_power_law(d, 2.0 / d**0.25 + 3.0, n_boot=20)
    eff = data_efficiency(law, 2.95, tokens=0.2)
    assert math.isinf(eff.efficiency)
    assert any("never reaches" in f for f in eff.flags)
    far = data_efficiency(law, 3.3, tokens=0.2)
    assert any("extrapolated" in f for f in far.flags)
