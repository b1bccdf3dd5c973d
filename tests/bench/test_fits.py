"""Scaling-law fits: known laws are recovered; bootstrap intervals cover the truth at their stated rate;
a law on no more points than parameters gives no asymptote; degenerate input is flagged or refused."""
import math

import numpy as np
import pytest

from bench.science.analysis import equal_loss_tokens, local_data_efficiency
from bench.science.fits import (
    LACK_OF_FIT_ALPHA,
    FitError,
    Interval,
    data_efficiency,
    fit_joint_limit,
    fit_power_law,
    headline_efficiencies,
    resample_seeds,
)
from bench.science.least_squares import fit_power_law_batch, tokens_for_loss

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("A,B,C", [(0.05, 1.02, 3.43), (2.0, 0.25, 3.0), (0.3, 0.5, 5.2)])
def test_recovers_known_law_from_noiseless_points(A, B, C):
    x = np.array([0.15, 0.3, 0.6, 1.4, 2.8, 5.6])
    fit = fit_power_law(x, A / x**B + C, n_boot=20)
    assert fit.identified
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
    assert fit.identified and fit.C == pytest.approx(4.1, abs=0.01)


@pytest.mark.parametrize("x,y", [([1.0, 2.0], [5.4, 5.3]), ([1.0, 2.0, 3.0], [5.411, 5.284, 5.263]),
                                 (np.repeat([1.0, 2.0, 4.0], 3), np.repeat([5.4, 5.3, 5.25], 3) + np.tile([0, .01, -.01], 3))])
def test_no_more_points_than_parameters_gives_the_ordering_only(x, y):
    """3 points for 3 parameters interpolate: no asymptote, no interval, no multiplier (seeds do not add points)."""
    fit = fit_power_law(x, y, n_boot=20)
    assert not fit.identified and not fit.ok
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
    assert joint.over_n is not None and joint.over_n.identified


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
    assert not eff.extrapolated and eff.headline == law.ok  # a flagged law (here a rough bootstrap) gives no headline
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


# ---- lack of fit ----------------------------------------------------------------------------------

SIZES = np.array([0.25, 0.5, 1, 2, 4, 8])


def _flagged_lack_of_fit(fit) -> bool:
    return any(f.startswith("lack of fit") for f in fit.flags)


def _lack_of_fit_rate(curve, n_rep: int = 60, sd: float = 0.01) -> int:
    """How many of n_rep studies (6 sizes x 3 seeds, normal seed noise sd around `curve`) flag lack of fit."""
    rng = np.random.default_rng(11)
    x = np.repeat(SIZES, 3)
    return sum(_flagged_lack_of_fit(fit_power_law(x, curve(x) + rng.normal(0, sd, len(x)), n_boot=10))
               for _ in range(n_rep))


def test_lack_of_fit_fires_on_a_misspecified_law():
    """The truth has a step (a budget that added one long document): no power law follows it to within seed noise
    (residuals ~0.03 against sd 0.01), and the F test says so in nearly every simulated study."""
    step = lambda x: 0.3 / x**0.5 + 3.3 - 0.06 * (x >= 2)
    assert _lack_of_fit_rate(step) >= 55
    fit = fit_power_law(np.repeat(SIZES, 3), step(np.repeat(SIZES, 3)) + np.tile([0.01, 0.0, -0.01], 6), n_boot=10)
    assert fit.lack_of_fit.p < LACK_OF_FIT_ALPHA and not fit.ok
    assert "F test of lack of fit vs seed noise on (3, 12) df" in fit.lack_of_fit.text()


def test_negative_control_lack_of_fit_stays_quiet_on_the_true_law():
    """The same design on a true power law: flagged about 5% of the time (the test's level), never most."""
    assert _lack_of_fit_rate(lambda x: 0.3 / x**0.5 + 3.3) <= 8


def test_lack_of_fit_from_resampled_curves_fires_on_a_misspecified_k_curve():
    """A K-curve given with member-seed draws (no seeds at each K): the bootstrap version of the test. The draws
    share one member effect across K (correlated noise); a kink at K = 3 is caught, the true law is not."""
    rng = np.random.default_rng(12)
    ks = np.arange(1, 7.0)
    shift = rng.normal(0, 0.01, (200, 1))  # the resampled members' mean effect moves every K together
    draws = lambda curve: curve + shift + rng.normal(0, 0.002, (200, len(ks)))
    true = 0.4 / ks + 3.2
    kinked = true + 0.02 * (ks == 3)
    bad = fit_power_law(ks, kinked, boot_y=draws(kinked))
    good = fit_power_law(ks, true + rng.normal(0, 0.002, len(ks)), boot_y=draws(true))
    assert _flagged_lack_of_fit(bad) and bad.lack_of_fit.p < LACK_OF_FIT_ALPHA
    assert not _flagged_lack_of_fit(good) and good.lack_of_fit.p > LACK_OF_FIT_ALPHA
    assert "bootstrap test of lack of fit" in bad.lack_of_fit.text()


def test_a_multiplier_from_a_flagged_law_is_kept_out_of_the_headline():
    """The same loss and budget read on two data laws: the one that fails its lack-of-fit test gives no headline
    number; the control, a law that passes, is quoted."""
    d = np.repeat([0.2, 0.4, 0.8, 1.6, 3.2], 3)
    noise = np.tile([0.004, 0.0, -0.004], 5)
    law = lambda x: 2.0 / x**0.25 + 3.0
    good = fit_power_law(d, law(d) + noise, n_boot=50)
    bad = fit_power_law(d, law(d) + noise + 0.05 * (d == 0.8), n_boot=50)  # one budget off the law
    assert good.ok and _flagged_lack_of_fit(bad)
    quoted, withheld = (data_efficiency(f, law(1.0), tokens=0.2) for f in (good, bad))
    assert quoted.headline and not withheld.headline
    assert not withheld.extrapolated and withheld.identified  # withheld for the flag alone
    assert any(f.startswith("data law: lack of fit") for f in withheld.law_flags)
    assert list(headline_efficiencies({"good": quoted, "bad": withheld})) == ["good"]
    # a flag on the law behind the loss (an asymptote) withholds it the same way
    assert not data_efficiency(good, law(1.0), 0.2, source_flags=["asymptote: lack of fit"]).headline


# ---- local multipliers: interpolated between measured budgets -----------------------------------------

def test_local_multiplier_is_exact_where_the_baseline_is_log_linear():
    """A baseline that is exactly linear in log D between its budgets: the equal-loss budget is known in closed
    form. Loss 4.25 lies 3/4 of the way from D = 1 (4.4) to D = 2 (4.2): D_eq = 2^0.75."""
    budgets, baseline = [0.5, 1.0, 2.0, 4.0], [4.6, 4.4, 4.2, 4.0]
    assert equal_loss_tokens(budgets, baseline, 4.25) == pytest.approx(2**0.75, rel=1e-12)
    assert equal_loss_tokens(budgets, baseline, 4.4) == pytest.approx(1.0)
    draws = np.tile(baseline, (50, 1))
    eff = local_data_efficiency(budgets, baseline, draws, 4.25, tokens=0.5, loss_draws=np.full(50, 4.25))
    assert eff.efficiency == pytest.approx(2**0.75 / 0.5, rel=1e-12) and eff.headline and eff.method == "local"
    # control: a loss off the grid's own points moves D_eq (the interpolation is not just the nearest budget)
    assert equal_loss_tokens(budgets, baseline, 4.35) == pytest.approx(2**0.25, rel=1e-12)


def test_local_multiplier_outside_the_measured_budgets_is_not_quoted():
    budgets, baseline = [0.5, 1.0, 2.0, 4.0], [4.6, 4.4, 4.2, 4.0]
    draws = np.tile(baseline, (50, 1))
    for loss, where in ((3.9, "below every measured baseline loss"), (4.7, "above the baseline's loss")):
        eff = local_data_efficiency(budgets, baseline, draws, loss, tokens=0.5, loss_draws=np.full(50, loss))
        assert not eff.headline and eff.multiplier() == "n/a" and any(where in f for f in eff.flags)
    inside = local_data_efficiency(budgets, baseline, draws, 4.1, tokens=0.5, loss_draws=np.full(50, 4.1))
    assert inside.headline  # control


def test_local_multiplier_interval_carries_both_noises_and_takes_the_first_crossing():
    rng = np.random.default_rng(13)
    budgets, baseline = np.array([0.5, 1.0, 2.0, 4.0]), np.array([4.6, 4.4, 4.2, 4.0])
    draws = baseline + rng.normal(0, 0.01, (400, 4))
    eff = local_data_efficiency(budgets, baseline, draws, 4.25, 0.5, 4.25 + rng.normal(0, 0.01, 400))
    lo, hi = eff.interval
    assert lo < eff.efficiency < hi and 0.05 < np.log(hi / lo) < 0.5
    # a baseline that rises between budgets: the equal-loss budget is where it first reached the loss
    bumpy = [4.6, 4.3, 4.45, 4.0]
    assert equal_loss_tokens(budgets, bumpy, 4.35) == pytest.approx(0.5 * 2 ** (0.25 / 0.3), rel=1e-12)
    assert any("first crossing" in f for f in local_data_efficiency(budgets, bumpy, draws, 4.35, 0.5,
                                                                    np.full(400, 4.35)).flags)


def _c_above_lowest(curve, n_rep: int = 100, sd: float = 0.01) -> tuple[int, int]:
    """Of n_rep studies (6 sizes x 5 seeds, normal seed noise sd around `curve`): how many fits put C above the
    lowest seed mean at all (the rule without noise), and how many the fit flags (beyond 1.96 standard errors)."""
    rng = np.random.default_rng(7)
    x = np.repeat(SIZES, 5)
    above = flagged = 0
    for _ in range(n_rep):
        fit = fit_power_law(x, curve(x) + rng.normal(0, sd, len(x)), n_boot=10)
        above += fit.C > min(fit.y)
        flagged += any("above the lowest observed loss" in f for f in fit.flags)
    return above, flagged


def test_c_just_below_the_data_is_not_flagged_for_noise():
    """A true law that has flattened by the largest sizes (C 0.001 below the last point): the fitted C lands above
    the lowest noisy mean in many studies, which is noise, not misfit; the flag allows 1.96 standard errors."""
    above, flagged = _c_above_lowest(lambda x: 0.3 / x**3 + 3.3)
    assert above >= 20, above  # the rule without noise would flag these
    assert flagged <= 8, flagged


def test_negative_control_c_far_above_the_lowest_point_is_still_flagged():
    """The standard recipe's U (it overfits past the middle size): the law's C sits at the plateau, far above
    the dip, in every study, seeds or not."""
    above, flagged = _c_above_lowest(lambda x: 3.3 + 0.05 * np.log(x / np.sqrt(SIZES[0] * SIZES[-1])) ** 2)
    assert flagged >= 95, flagged
