"""Scaling-law fits: known laws are recovered; bootstrap intervals cover the truth at their stated rate;
a law on no more points than parameters gives no asymptote; degenerate input is flagged or refused."""
import math

import numpy as np
import pytest

from bench.fits import (
    FitError,
    Interval,
    data_efficiency,
    fit_joint_limit,
    fit_power_law,
    fit_power_law_batch,
    headline_efficiencies,
    resample_seeds,
    tokens_for_loss,
)


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
    assert lo < fit.C < hi and not fit.C_interval.degenerate
    assert "±" in fit.asymptote()
    b_lo, b_hi, c_lo, c_hi = fit.C_band_B  # the sensitivity band: C with B fixed over B_hat x [0.5, 2]
    assert b_lo == pytest.approx(fit.B / 2) and b_hi == pytest.approx(fit.B * 2)
    assert c_lo < fit.C < c_hi and "for B in" in fit.B_band()


def test_cpu_scale_parameter_counts_converge():
    """x in billions of parameters at CPU scale (1e-4 .. 1e-2) is far from p0 = [1, 0.5, 2]; still fits."""
    x = np.array([0.26e-3, 1.05e-3, 1.8e-3, 6.3e-3, 19e-3])
    fit = fit_power_law(x, 0.02 / x**0.35 + 4.1, n_boot=20)
    assert fit.converged and fit.C == pytest.approx(4.1, abs=0.01)


@pytest.mark.parametrize("x,y", [([1.0, 2.0], [5.4, 5.3]), ([1.0, 2.0, 3.0], [5.411, 5.284, 5.263]),
                                 (np.repeat([1.0, 2.0, 4.0], 3), np.repeat([5.4, 5.3, 5.25], 3) + np.tile([0, .01, -.01], 3))])
def test_no_more_points_than_parameters_gives_the_ordering_only(x, y):
    """3 points for 3 parameters interpolate: no asymptote, no interval, no multiplier (seeds do not add points)."""
    fit = fit_power_law(x, y, n_boot=20)
    assert not fit.identified and not fit.converged and not fit.ok
    assert math.isnan(fit.C) and not fit.C_interval.defined
    assert any("need >= 4 distinct x" in f for f in fit.flags)
    assert fit.asymptote().startswith("not identified") and "±" not in fit.asymptote()
    assert fit.ordering() in str(fit) and "FLAGGED" in str(fit)
    eff = data_efficiency(fit, 5.35, tokens=1.0)
    assert not eff.identified and not eff.headline and eff.multiplier() == "n/a"
    # the control: the same data with enough distinct x beside them identify the law
    more = fit_power_law([*x, 8.0, 16.0], [*y, 5.24, 5.235], n_boot=20)
    assert more.identified and math.isfinite(more.C)


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
    points = [(n, k, 0.4 / k + 0.05 / n + 3.2) for n in (0.15, 0.3, 0.6) for k in (1, 2, 3, 4)] + [(1.4, 1, 3.5)]
    joint = fit_joint_limit(points, n_boot=10)
    assert any("N=1.4 left out" in f for f in joint.flags)
    assert not joint.identified and joint.asymptote().startswith("not identified")  # 3 K-limits over N


def test_data_efficiency_inverts_the_data_law():
    A, B, C = 2.0, 0.25, 3.0
    d = np.array([0.2, 0.4, 0.8, 1.6, 3.2])
    law = fit_power_law(d, A / d**B + C, n_boot=20)
    loss = A / 0.9**B + C  # the standard recipe needs 0.9 (units of D) to reach this loss
    eff = data_efficiency(law, loss, tokens=0.2)
    assert eff.equivalent_tokens == pytest.approx(0.9, rel=1e-3)
    assert eff.efficiency == pytest.approx(4.5, rel=1e-3)
    assert not eff.extrapolated and eff.headline
    own = [f for f in eff.flags if not f.startswith("data law:")]
    assert own == ["interval from the data law's resamples only (no draws of the loss were given)"]
    assert tokens_for_loss((A, B, C), A / 1.6**B + C) == pytest.approx(1.6)


def test_data_efficiency_below_the_standard_asymptote_is_unbounded_and_flagged():
    d = np.array([0.2, 0.4, 0.8, 1.6])
    law = fit_power_law(d, 2.0 / d**0.25 + 3.0, n_boot=20)
    eff = data_efficiency(law, 2.95, tokens=0.2)
    assert math.isinf(eff.efficiency)
    assert any("never reaches" in f for f in eff.flags)
    far = data_efficiency(law, 3.3, tokens=0.2)
    assert any("extrapolated" in f for f in far.flags)


def test_multiplier_outside_the_fitted_range_is_flagged_extrapolated_and_kept_out_of_headlines():
    A, B, C = 2.0, 0.25, 3.0
    d = np.repeat([0.2, 0.4, 0.8, 1.6, 3.2], 2)
    rng = np.random.default_rng(3)
    law = fit_power_law(d, A / d**B + C + rng.normal(0, 0.002, len(d)), n_boot=50)
    inside = data_efficiency(law, A / 1.0**B + C, tokens=0.2)  # D(L) ~ 1.0, inside [0.2, 3.2]
    above = data_efficiency(law, A / 10.0**B + C, tokens=0.2)  # D(L) ~ 10, 3x past the largest budget
    below = data_efficiency(law, A / 0.05**B + C, tokens=0.01)  # D(L) ~ 0.05, below the smallest budget
    assert inside.headline and not inside.extrapolated and "extrapolated" not in inside.multiplier()
    assert above.extrapolated and not above.headline and "(extrapolated)" in above.multiplier()
    assert below.extrapolated and any("below the smallest budget" in f for f in below.flags)
    assert list(headline_efficiencies({"in": inside, "above": above, "below": below})) == ["in"]
    lo, hi = inside.interval
    assert lo < inside.efficiency < hi


def test_multiplier_interval_carries_the_loss_uncertainty_too():
    d = np.repeat([0.2, 0.4, 0.8, 1.6, 3.2], 3)
    rng = np.random.default_rng(4)
    law = fit_power_law(d, 2.0 / d**0.25 + 3.0 + rng.normal(0, 0.003, len(d)), n_boot=100)
    loss = 2.0 / 1.0**0.25 + 3.0
    law_only = data_efficiency(law, loss, tokens=0.2)
    both = data_efficiency(law, loss, tokens=0.2, loss_draws=loss + rng.normal(0, 0.01, 100))
    assert both.efficiency == law_only.efficiency
    width = lambda e: e.interval.hi - e.interval.lo
    assert width(both) > 1.5 * width(law_only)
    lo, hi = both.equivalent_interval
    assert lo < both.equivalent_tokens < hi
    with pytest.raises(FitError, match="loss_draws has 7 draws"):
        data_efficiency(law, loss, tokens=0.2, loss_draws=np.zeros(7))


def test_degenerate_interval_is_reported_as_such_never_as_a_point():
    x = np.array([0.15, 0.3, 0.6, 1.4, 2.8, 5.6])
    fit = fit_power_law(x, 0.05 / x + 3.43, n_boot=30)  # noiseless: every resample is the same curve
    assert fit.C_interval.degenerate
    assert "degenerate" in fit.C_interval.text() and "degenerate" in fit.asymptote()
    close = Interval(3.4301, 3.4304, 100, 100)  # a real interval narrower than the printed digits
    assert close.text() == "[3.4301, 3.4304]" and not close.degenerate
    assert "[" not in Interval(3.43, 3.43, 100, 100).text()


def test_batch_fit_agrees_with_single_fits_and_fixed_b_is_linear():
    rng = np.random.default_rng(5)
    x = np.array([0.25, 0.5, 1, 2, 4, 8.0])
    Y = 0.8 / x**0.5 + 3.3 + rng.normal(0, 0.01, (20, len(x)))
    A, B, C, sse = fit_power_law_batch(x, Y)
    for i in (0, 7, 19):
        one = fit_power_law(x, Y[i], n_boot=0)
        assert (one.A, one.B, one.C) == pytest.approx((A[i], B[i], C[i]), rel=1e-6)
    # with B fixed at the optimum the linear solve returns the same A and C; any other B fits worse
    A2, _, C2, _ = fit_power_law_batch(x, Y, B=B)
    assert A2 == pytest.approx(A, rel=1e-6) and C2 == pytest.approx(C, rel=1e-6)
    assert np.all(fit_power_law_batch(x, Y, B=B * 1.3)[3] > sse)


def _coverage(n_rep: int, n_boot: int, interval) -> int:
    """How many of n_rep synthetic studies (6 sizes x 3 seeds, known A, B, C, normal seed noise) put the true C
    inside interval(fit)."""
    A, B, C = 0.8, 0.5, 3.3
    x = np.repeat([0.25, 0.5, 1, 2, 4, 8], 3)
    rng = np.random.default_rng(2024)
    hits = 0
    for rep in range(n_rep):
        fit = fit_power_law(x, A / x**B + C + rng.normal(0, 0.01, len(x)), n_boot=n_boot, seed=rep)
        lo, hi = interval(fit)
        hits += lo <= C <= hi
    return hits


def test_bootstrap_intervals_cover_the_true_asymptote_at_their_stated_rate():
    """>= 90 of 100 bootstrap 95% intervals cover the true C (a correct method covers ~95; 90 allows for the
    binomial spread of 100 trials)."""
    assert _coverage(100, 200, lambda fit: fit.C_interval) >= 90


def test_negative_control_a_too_narrow_interval_fails_the_coverage_check():
    """The same check on an interval method known to be wrong (the bootstrap's central 50%, quoted as 95%) must
    fail it by far: the check can tell a good interval from a bad one."""
    def central_half(fit):
        return tuple(np.quantile(fit.boot_C(), [0.25, 0.75]))
    assert _coverage(100, 200, central_half) < 75


def test_pooled_seed_resample_has_the_unbiased_variance():
    rng = np.random.default_rng(6)
    groups = [rng.normal(0, 1.0, 3) for _ in range(200)]
    draws = resample_seeds(groups, 400, rng) - np.array([g.mean() for g in groups])
    # variance s^2 / r, widened by t/z at 400 degrees of freedom (~1.003)
    assert draws.var() == pytest.approx(1.0 / 3, rel=0.05)
