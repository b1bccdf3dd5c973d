"""The analysis over a table of evaluated models: member-seed bootstrap, K and x laws, joint limit, multipliers.

Synthetic tables follow known laws: loss(S) = A / |S|^B + C + mean_{s in S} alpha_s + noise, alpha_s the
member's own effect, so the truth is known and the intervals can be checked against it."""
import itertools

import numpy as np
import pytest

from bench.science.analysis import (
    EvaluationTable,
    efficiency_of_asymptote,
    efficiency_of_loss,
    fit_joint,
    fit_over_k,
    fit_over_x,
    k_curve,
    local_efficiency_of_loss,
    member_effects,
)
from bench.science.fits import FitError, data_efficiency
from bench.science.report import joint_limit_table

pytestmark = pytest.mark.fast


def cell_rows(rng, recipe, x, m, A, B, C, member_sd=0.02, subset_sd=0.002, kmax=None):
    alpha = rng.normal(0, member_sd, m)
    rows = []
    for k in range(1, (kmax or m) + 1):
        for sub in itertools.combinations(range(m), k):
            loss = A / k**B + C + alpha[list(sub)].mean() + rng.normal(0, subset_sd)
            rows.append({"recipe": recipe, "x": x, "seeds": list(sub), "loss": float(loss)})
    return rows


@pytest.mark.parametrize("row,message", [
    ({"x": 1.0, "seeds": [0], "loss": 3.0}, "evaluations\\[0\\]: missing field 'recipe'"),
    ({"recipe": "r", "x": -1.0, "seeds": [0], "loss": 3.0}, "field 'x' must be a positive number"),
    ({"recipe": "r", "x": 1.0, "seeds": [0, 0], "loss": 3.0}, "field 'seeds' must be a non-empty list of distinct"),
    ({"recipe": "r", "x": 1.0, "seeds": [], "loss": 3.0}, "field 'seeds'"),
    ({"recipe": "r", "x": 1.0, "seeds": [0], "loss": float("nan")}, "field 'loss' must be a finite number"),
])
def test_bad_rows_are_refused_with_the_field_named(row, message):
    with pytest.raises(FitError, match=message):
        EvaluationTable([row])


def test_a_key_given_twice_with_different_losses_is_refused():
    row = {"recipe": "r", "x": 1.0, "seeds": [1, 0], "loss": 3.0}
    EvaluationTable([row, dict(row)])  # the same measurement twice is fine
    with pytest.raises(FitError, match=r"evaluations\[1\]: recipe 'r', x=1, seeds \[0, 1\] was already given"):
        EvaluationTable([row, {**row, "seeds": [0, 1], "loss": 3.1}])


def test_member_effects_recover_the_additive_model():
    rng = np.random.default_rng(0)
    cell = EvaluationTable(cell_rows(rng, "r", 1.0, 5, 0.3, 1.0, 3.2, subset_sd=0.0)).cell("r", 1.0)
    mu, alpha = member_effects(cell)
    for subset, loss in cell.items():
        assert mu[len(subset)] + np.mean([alpha[s] for s in subset]) == pytest.approx(loss, abs=1e-9)
    assert sum(alpha.values()) == pytest.approx(0, abs=1e-12)
    # with every K-subset present and the effects centred, mu_K is the mean loss of the K-subsets, which follows
    # the law the cell was built from up to the members' mean effect (the same at every K)
    for k in range(1, 6):
        mean_k = np.mean([loss for subset, loss in cell.items() if len(subset) == k])
        assert mu[k] == pytest.approx(mean_k, abs=1e-9)
        assert mu[k] - mu[5] == pytest.approx(0.3 / k - 0.3 / 5, abs=1e-9)


def test_k_curve_is_the_mean_over_subsets_and_its_draws_move_with_the_members():
    rng = np.random.default_rng(1)
    cell = EvaluationTable(cell_rows(rng, "r", 1.0, 5, 0.3, 1.0, 3.2)).cell("r", 1.0)
    curve = k_curve(cell, 300, np.random.default_rng(2))
    assert curve.ks == (1, 2, 3, 4, 5) and curve.members == 5
    assert curve.loss[0] == pytest.approx(np.mean([v for s, v in cell.items() if len(s) == 1]))
    assert curve.loss[-1] == cell[frozenset(range(5))]
    # every K moves, the full ensemble included (it would be fixed if only evaluated subsets were used)
    assert np.all(curve.draws.std(axis=0) > 0.002)
    # the member effect is shared by every K: the draws are strongly correlated across K
    assert np.corrcoef(curve.draws[:, 0], curve.draws[:, -1])[0, 1] > 0.8
    with pytest.raises(FitError, match="seeds \\[2\\] appear only inside ensembles"):
        k_curve({frozenset([0]): 3.0, frozenset([1]): 3.1, frozenset([0, 2]): 2.9}, 10, np.random.default_rng(0))


def _k_coverage(n_rep, interval) -> int:
    """How many of n_rep synthetic cells (5 members, all K-subsets) put the true C inside interval(table, rep)."""
    rng = np.random.default_rng(7)
    hits = 0
    for rep in range(n_rep):
        table = EvaluationTable(cell_rows(rng, "r", 1.0, 5, 0.3, 1.0, 3.2))
        lo, hi = interval(table, rep)
        hits += lo <= 3.2 <= hi
    return hits


def _member_seed_interval(table, rep):
    return tuple(fit_over_k(table, "r", 1.0, n_boot=100, seed=rep).C_interval)


def _too_narrow_interval(table, rep):
    """A method known to be wrong: the member-seed bootstrap's central 50%, quoted as a 95% interval."""
    return tuple(np.quantile(fit_over_k(table, "r", 1.0, n_boot=100, seed=rep).boot_C(), [0.25, 0.75]))


def test_member_seed_bootstrap_covers_the_true_k_limit():
    """>= 90 of 100 member-seed bootstrap 95% intervals of the K-limit cover the true C (5 members each)."""
    assert _k_coverage(100, _member_seed_interval) >= 90


def test_negative_control_a_too_narrow_interval_fails_the_coverage_check():
    assert _k_coverage(100, _too_narrow_interval) < 75


def study_table(rng):
    """5 sizes x 5 members of the regularized recipe (K = 1..5), the standard recipe's members over 5 budgets."""
    rows = []
    for n in (0.5, 1.0, 2.0, 4.0, 8.0):
        rows += cell_rows(rng, "reg", n, 5, 0.3, 1.0, 0.4 / n**0.5 + 3.0, member_sd=0.01, subset_sd=0.001)
    for d in (0.25, 0.5, 1.0, 2.0, 4.0):
        rows += cell_rows(rng, "std-data", d, 3, 1.0 / d**0.3, 0.0, 3.5, member_sd=0.01, kmax=1)
    return EvaluationTable(rows)


def test_joint_limit_recovers_the_truth_and_the_legend_prints_the_tables_number():
    table = study_table(np.random.default_rng(3))
    joint = fit_joint(table, "reg", n_boot=100)
    assert joint.identified
    assert joint.C == pytest.approx(3.0, abs=0.05)
    lo, hi = joint.C_interval
    assert lo < joint.C < hi and not joint.C_interval.degenerate
    # the plot of the joint limit labels its line with over_n.asymptote(): the table's string, character for character
    assert joint.asymptote() == joint.over_n.asymptote()
    assert f"| joint (N, K -> inf) | {joint.asymptote()} |" in joint_limit_table(joint)
    assert joint.over_n.bootstrap == "per-N bootstraps, propagated"


def test_multipliers_carry_both_uncertainties_and_are_flagged_outside_the_range():
    table = study_table(np.random.default_rng(4))
    law = fit_over_x(table, "std-data", n_boot=100)
    assert law.identified and law.C == pytest.approx(3.5, abs=0.15)
    assert law.bootstrap == "seeds" and law.replicates == (3,) * 5
    # the standard recipe's own members at D = 1, read as if reached with D = 0.25: about 4x, inside the range
    eff = efficiency_of_loss(law, table, "std-data", 1.0, 1, tokens=0.25, n_boot=100)
    assert eff.efficiency == pytest.approx(4.0, rel=0.3) and eff.headline
    assert not any("no draws of the loss" in f for f in eff.flags)
    lo, hi = eff.interval
    assert lo < eff.efficiency < hi
    narrow = data_efficiency(law, eff.loss, 0.25)  # the law's draws only: a narrower interval
    assert hi - lo > narrow.interval.hi - narrow.interval.lo
    # the joint asymptote lies far below the data law's range: its multiplier is extrapolated (or unbounded)
    joint = fit_joint(table, "reg", n_boot=100)
    far = efficiency_of_asymptote(law, joint, tokens=0.25)
    assert far.extrapolated and not far.headline
    # an asymptote that is not identified gives no multiplier at all
    few = EvaluationTable(cell_rows(np.random.default_rng(5), "reg", 1.0, 3, 0.3, 1.0, 3.2))
    none = efficiency_of_asymptote(law, fit_over_k(few, "reg", 1.0, n_boot=100), tokens=0.25)
    assert not none.identified and none.multiplier() == "n/a"


def test_a_multiplier_of_a_flagged_asymptote_is_kept_out_of_the_headline():
    """The joint limit's multiplier derives from the joint law too: flag that law (a size whose K-limit is off
    the power law in N) and the multiplier leaves the headline; the control, the same table unflagged, is read
    inside the data law's range."""
    table = study_table(np.random.default_rng(4))
    law = fit_over_x(table, "std-data", n_boot=100)
    joint = fit_joint(table, "reg", n_boot=100)
    tokens = 0.25  # any budget: only the flags matter here
    clean = efficiency_of_asymptote(law, joint, tokens)
    rng = np.random.default_rng(4)
    rows = [row for n in (0.5, 1.0, 2.0, 4.0, 8.0)
            for row in cell_rows(rng, "reg", n, 5, 0.3, 1.0, 0.4 / n**0.5 + 3.0 + 0.2 * (n == 2.0), member_sd=0.01,
                                 subset_sd=0.001)]
    kinked = fit_joint(EvaluationTable(rows), "reg", n_boot=100)
    assert not any("lack of fit" in f for f in joint.flags)
    assert any("over N: lack of fit" in f for f in kinked.flags)
    flagged = efficiency_of_asymptote(law, kinked, tokens)
    assert any(f.startswith("asymptote: over N: lack of fit") for f in flagged.law_flags) and not flagged.headline
    assert clean.law_flags == tuple(f"data law: {f}" for f in law.flags)


def test_local_multiplier_from_a_table_matches_the_interpolation_of_its_seed_means():
    """The baseline's seed means at each budget, interpolated in log D: a recipe that reaches the baseline's
    own loss at D = 1 with a quarter of the tokens is 4x data efficient exactly, with no law involved."""
    rows = []
    for d, mean in ((0.25, 4.0), (0.5, 3.8), (1.0, 3.6), (2.0, 3.5)):
        rows += [{"recipe": "base", "x": d, "seeds": [s], "loss": mean + e} for s, e in enumerate((-0.01, 0, 0.01))]
    rows += [{"recipe": "new", "x": 0.25, "seeds": [s], "loss": 3.6 + e} for s, e in enumerate((-0.01, 0, 0.01))]
    rows += [{"recipe": "new", "x": 0.25, "seeds": [0, 1, 2], "loss": 3.55}]
    table = EvaluationTable(rows)
    single = local_efficiency_of_loss(table, "base", "new", 0.25, 1, tokens=0.25, n_boot=200)
    assert single.efficiency == pytest.approx(4.0, rel=1e-9) and single.headline
    lo, hi = single.interval
    assert lo < 4.0 < hi
    # control: the K=3 ensemble's loss 3.55 is half way (in loss) from D = 1 to D = 2, so 2^0.5 x 4
    ensemble = local_efficiency_of_loss(table, "base", "new", 0.25, 3, tokens=0.25, n_boot=200)
    assert ensemble.efficiency == pytest.approx(4 * 2**0.5, rel=1e-9)


def _k_law_flag_rate(n_rep: int, bump: float) -> int:
    """How many of n_rep synthetic cells (5 members, all K-subsets, subset noise beside the member effects) flag
    the K-law for lack of fit; `bump` lifts every 3-member ensemble off the law."""
    rng = np.random.default_rng(21)
    flagged = 0
    for rep in range(n_rep):
        rows = cell_rows(rng, "r", 1.0, 5, 0.3, 1.0, 3.2, member_sd=0.02, subset_sd=0.002)
        rows = [{**r, "loss": r["loss"] + bump * (len(r["seeds"]) == 3)} for r in rows]
        flagged += fit_over_k(EvaluationTable(rows), "r", 1.0, n_boot=200, seed=rep).lack_of_fit.rejected
    return flagged


def test_k_law_lack_of_fit_fires_on_a_bent_curve_and_rarely_on_the_true_law():
    """The member-seed bootstrap test: a curve bent at K = 3 by 0.01 (5x the subset noise) is flagged in most
    cells; the true law (negative control) at about the test's 5% level (2 of 40 expected; the draws without the
    subset noise flag 5 of these 40, 10 of another 40)."""
    assert _k_law_flag_rate(30, bump=0.01) >= 24
    assert _k_law_flag_rate(40, bump=0.0) <= 4
