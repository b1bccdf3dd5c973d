"""The study's analysis as pure functions over a table of evaluated models: laws, intervals, multipliers.

The input is what was measured, nothing else: one `Evaluation` per evaluated model, keyed by
(recipe, x, member seed set), where x is the model size or the token budget and the seed set names the
members (one seed: a single member; K seeds: their logit-averaged ensemble). Everything below is
computed from such a table, so it is tested on synthetic tables with known answers.

Uncertainty comes from the unit that varies, the member seed (`k_curve`): a bootstrap draw resamples
the seeds of a cell (recipe, x) with replacement and rebuilds every K-subset ensemble's loss from the
resampled members. A drawn K-subset of distinct seeds that was evaluated keeps its measured loss. A
drawn subset with a repeated seed (an ensemble holding one member twice) was never evaluated and
cannot be: it stands for K different members that happen to resemble each other. Its loss is rebuilt
from a member-effect model fitted to every evaluated subset of the cell,

    loss(S) = mu_|S| + mean_{s in S} alpha_s,

the K-ensemble's mean loss plus the average of its members' own effects (a member that is better
alone tends to make its ensembles better, diluted 1/K by the average). A duplicate then contributes
its effect twice. Why not simpler: (a) using only the drawn subsets of distinct seeds leaves the
largest K (= every member) with no subset in most draws (5 seeds: 96%), and (b) taking the evaluated
supersets of the drawn seeds pins the largest K to the one full ensemble in every draw, so C, which
that end of the curve decides, would get no uncertainty from the members at all. Under the model the
rebuilt curve moves with the resampled members' mean effect at every K, as a fresh set of members
would move it. Its spread is scaled by sqrt(m / (m - 1)) and widened by t / z at m - 1 degrees of
freedom (bench.science.fits.small_sample_widening): with m = 5 members that is the difference between 88%
and 95% coverage.

Laws over x at one K (the size law over N, the standard recipe's data law over D) take the members'
losses at each x as seeds of one point and use bench.science.fits' seed bootstrap. Draw b of every cell comes
from its own random stream, so cells are independent and draw b of two derived numbers that share a
cell (a multiplier and the loss behind it) share that cell's draw.

A multiplier is read two ways: through the standard recipe's fitted data law (`efficiency_of_loss`,
`efficiency_of_asymptote`: the flags of every law behind it travel with it, and a flagged law keeps it out
of headlines), and without any law, between the two measured budgets that bracket the loss
(`local_efficiency_of_loss`). The local one is what remains quotable when the law fails its lack-of-fit test.
"""
from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bench.science.fits import (
    DataEfficiency,
    FitError,
    Interval,
    JointLimitFit,
    PowerLawFit,
    data_efficiency,
    fit_power_law,
    joint_limit_from_fits,
    resample_seeds,
    small_sample_widening,
)

MAX_SUBSETS_PER_K = 256  # a draw averages at most this many K-subsets (all of them for up to 8-9 members)


@dataclass(frozen=True)
class Evaluation:
    """One evaluated model: a member (one seed) or the ensemble of the members with these seeds."""

    recipe: str
    x: float  # model size or token budget, in the unit the laws are fitted in
    seeds: frozenset[int]
    loss: float  # validation loss, nats/token

    @property
    def k(self) -> int:
        return len(self.seeds)


class EvaluationTable:
    """Evaluated models keyed by (recipe, x, seed set); a key given twice with different losses is refused."""

    def __init__(self, rows: Iterable[Evaluation | Mapping], source: str = "evaluations"):
        self.cells: dict[tuple[str, float], dict[frozenset[int], float]] = {}
        for i, row in enumerate(rows):
            ev = row if isinstance(row, Evaluation) else _evaluation(row, f"{source}[{i}]")
            cell = self.cells.setdefault((ev.recipe, ev.x), {})
            if ev.seeds in cell and cell[ev.seeds] != ev.loss:
                raise FitError(f"{source}[{i}]: recipe {ev.recipe!r}, x={ev.x:g}, seeds {sorted(ev.seeds)} was "
                               f"already given with loss {cell[ev.seeds]} (now {ev.loss})")
            cell[ev.seeds] = ev.loss
        if not self.cells:
            raise FitError(f"{source}: no evaluations")

    def recipes(self) -> list[str]:
        return sorted({r for r, _ in self.cells})

    def xs(self, recipe: str) -> list[float]:
        return sorted(x for r, x in self.cells if r == recipe)

    def cell(self, recipe: str, x: float) -> dict[frozenset[int], float]:
        if (recipe, float(x)) not in self.cells:
            raise FitError(f"no evaluations of recipe {recipe!r} at x={x:g} (have x = {self.xs(recipe)})")
        return self.cells[(recipe, float(x))]


def _evaluation(row: Mapping, where: str) -> Evaluation:
    for name in ("recipe", "x", "seeds", "loss"):
        if name not in row:
            raise FitError(f"{where}: missing field {name!r} (an evaluation is recipe, x, seeds, loss)")
    recipe, x, seeds, loss = row["recipe"], row["x"], row["seeds"], row["loss"]
    if not isinstance(recipe, str) or not recipe:
        raise FitError(f"{where}: field 'recipe' must be a non-empty string, got {recipe!r}")
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not (math.isfinite(x) and x > 0):
        raise FitError(f"{where}: field 'x' must be a positive number, got {x!r}")
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, (list, tuple, set, frozenset)) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds)):
        raise FitError(f"{where}: field 'seeds' must be a non-empty list of distinct integer seeds, got {seeds!r}")
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
        raise FitError(f"{where}: field 'loss' must be a finite number, got {loss!r}")
    return Evaluation(recipe, float(x), frozenset(seeds), float(loss))


# ---- the member-seed bootstrap of one cell ---------------------------------------------------------

def member_effects(cell: Mapping[frozenset[int], float]) -> tuple[dict[int, float], dict[int, float]]:
    """Least squares of loss(S) = mu_|S| + mean_{s in S} alpha_s over the cell's evaluated subsets: (mu, alpha),
    alpha centred to sum 0 (a shared shift of every alpha is the same model with every mu shifted)."""
    seeds = sorted(set().union(*cell))
    ks = sorted({len(s) for s in cell})
    col = {s: i for i, s in enumerate(seeds)}
    X = np.zeros((len(cell), len(ks) + len(seeds)))
    y = np.empty(len(cell))
    for row, (subset, loss) in enumerate(cell.items()):
        X[row, ks.index(len(subset))] = 1.0
        for s in subset:
            X[row, len(ks) + col[s]] = 1.0 / len(subset)
        y[row] = loss
    coef = np.linalg.lstsq(X, y, rcond=None)[0]
    alpha = coef[len(ks):] - coef[len(ks):].mean()
    mu = {k: float(np.mean([loss - alpha[[col[s] for s in subset]].mean() for subset, loss in cell.items()
                            if len(subset) == k])) for k in ks}
    return mu, {s: float(alpha[col[s]]) for s in seeds}


@dataclass(frozen=True, eq=False)
class KCurve:
    """A cell's mean loss at each K over its evaluated K-subsets, and its member-seed bootstrap draws."""

    ks: tuple[int, ...]
    loss: np.ndarray  # [len(ks)]
    draws: np.ndarray  # [n_boot, len(ks)]
    members: int


def k_curve(cell: Mapping[frozenset[int], float], n_boot: int, rng: np.random.Generator) -> KCurve:
    """The cell's curve over K and n_boot resampled curves (see the module docstring for the rebuild)."""
    seeds = sorted(set().union(*cell))
    if any(frozenset([s]) not in cell for s in seeds):
        missing = [s for s in seeds if frozenset([s]) not in cell]
        raise FitError(f"seeds {missing} appear only inside ensembles: every member must be evaluated alone too")
    ks = tuple(sorted({len(s) for s in cell}))
    point = np.array([np.mean([loss for s, loss in cell.items() if len(s) == k]) for k in ks])
    m = len(seeds)
    if m < 2 or n_boot == 0:
        return KCurve(ks, point, np.full((n_boot, len(ks)), np.nan), m)
    mu, alpha = member_effects(cell)
    alpha_arr = np.array([alpha[s] for s in seeds])
    combos = {}
    for k in ks:
        all_pos = list(itertools.combinations(range(m), k))
        if len(all_pos) > MAX_SUBSETS_PER_K:
            all_pos = [all_pos[i] for i in rng.choice(len(all_pos), MAX_SUBSETS_PER_K, replace=False)]
        combos[k] = np.array(all_pos)
    draws = np.empty((n_boot, len(ks)))
    for b in range(n_boot):
        labels = rng.integers(0, m, size=m)  # resampled members, as indices into seeds
        for j, k in enumerate(ks):
            picked = labels[combos[k]]  # [subsets, k]
            rebuilt = mu[k] + alpha_arr[picked].mean(axis=1)
            for i, row in enumerate(picked):
                subset = frozenset(seeds[p] for p in row)
                if len(subset) == k and subset in cell:
                    rebuilt[i] = cell[subset]
            draws[b, j] = rebuilt.mean()
    scale = math.sqrt(m / (m - 1)) * small_sample_widening(m - 1)
    return KCurve(ks, point, point + (draws - point) * scale + _subset_noise(cell, mu, alpha, ks, n_boot, rng), m)


def _subset_noise(cell, mu, alpha, ks, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, len(ks)]: what the member-effect model leaves (how a subset differs beyond its members' effects),
    as noise on each K's mean. A fresh set of members would redraw it too, but an evaluated subset keeps its
    measured loss in a draw, so without this the draws miss it and a law's lack-of-fit test, which compares the
    curve's residuals with the draws, would blame the law for it."""
    residuals = [loss - mu[len(s)] - np.mean([alpha[i] for i in s]) for s, loss in cell.items()]
    df = len(cell) - len(ks) - (len(alpha) - 1)
    if df < 1:
        return np.zeros((n_boot, len(ks)))
    per_k = np.array([sum(len(s) == k for s in cell) for k in ks])
    return rng.normal(0.0, 1.0, (n_boot, len(ks))) * np.sqrt(np.sum(np.square(residuals)) / df / per_k)


def _rng(seed: int, *key) -> np.random.Generator:
    """One independent, reproducible random stream per cell."""
    return np.random.default_rng([seed, zlib.crc32(repr(key).encode())])


# ---- laws ----------------------------------------------------------------------------------------

def fit_over_k(table: EvaluationTable, recipe: str, x: float, n_boot: int = 200, seed: int = 0) -> PowerLawFit:
    """The ensemble law L(K) = A / K^B + C at one (recipe, x), bootstrapped over member seeds."""
    curve = k_curve(table.cell(recipe, x), n_boot, _rng(seed, recipe, float(x)))
    return fit_power_law(curve.ks, curve.loss, boot_y=curve.draws, boot_label=f"member seeds ({curve.members})")


def singles_over_x(table: EvaluationTable, recipe: str) -> dict[float, list[float]]:
    """The recipe's single-member losses at each x (its seeds), x ascending."""
    out = {x: [loss for s, loss in table.cell(recipe, x).items() if len(s) == 1] for x in table.xs(recipe)}
    out = {x: v for x, v in out.items() if v}
    if not out:
        raise FitError(f"recipe {recipe!r} has no single-member evaluations")
    return out


def fit_over_x(table: EvaluationTable, recipe: str, n_boot: int = 200, seed: int = 0) -> PowerLawFit:
    """The law over x (size N or budget D) of the recipe's single members, each member a seed of its point."""
    points = singles_over_x(table, recipe)
    xs = [x for x, v in points.items() for _ in v]
    losses = [loss for v in points.values() for loss in v]
    return fit_power_law(xs, losses, n_boot=n_boot, seed=zlib.crc32(f"{seed}/{recipe}".encode()))


def fit_joint(table: EvaluationTable, recipe: str, n_boot: int = 200, seed: int = 0) -> JointLimitFit:
    """K -> inf at every x of the recipe, then x -> inf; draw b of the joint refits draw b of every C_x."""
    return joint_limit_from_fits({x: fit_over_k(table, recipe, x, n_boot, seed) for x in table.xs(recipe)})


def loss_with_draws(table: EvaluationTable, recipe: str, x: float, k: int, n_boot: int = 200,
                    seed: int = 0) -> tuple[float, np.ndarray]:
    """The mean loss of the recipe's K-member ensembles at x, and its member-seed bootstrap draws (the same
    draws `fit_over_k` uses for that cell)."""
    curve = k_curve(table.cell(recipe, x), n_boot, _rng(seed, recipe, float(x)))
    if k not in curve.ks:
        raise FitError(f"recipe {recipe!r} at x={x:g} has no K={k} evaluation (K = {list(curve.ks)})")
    j = curve.ks.index(k)
    return float(curve.loss[j]), curve.draws[:, j]


def efficiency_of_loss(data_law: PowerLawFit, table: EvaluationTable, recipe: str, x: float, k: int,
                       tokens: float, n_boot: int = 200, seed: int = 0) -> DataEfficiency:
    """D(L) / D for a measured loss, its interval carrying the data law's draws and the loss's."""
    loss, draws = loss_with_draws(table, recipe, x, k, n_boot, seed)
    return data_efficiency(data_law, loss, tokens, loss_draws=draws)


def efficiency_of_asymptote(data_law: PowerLawFit, limit: PowerLawFit | JointLimitFit, tokens: float) -> DataEfficiency:
    """D(C) / D for an asymptote (a law over N or K, or the joint limit). An asymptote that is not identified
    gives no multiplier."""
    fit = limit.over_n if isinstance(limit, JointLimitFit) else limit
    if fit is None or not fit.identified:
        return DataEfficiency(tokens, math.nan, math.nan, math.nan, Interval(math.nan, math.nan),
                              ("the asymptote is not identified: no multiplier",), identified=False)
    return data_efficiency(data_law, fit.C, tokens, loss_draws=fit.boot_C(),
                           source_flags=[f"asymptote: {f}" for f in limit.flags])


# ---- the multiplier without a law: equal loss between measured budgets -------------------------------

def equal_loss_tokens(budgets: Sequence[float], losses: Sequence[float], loss: float) -> float:
    """The smallest budget at which the measured baseline (mean loss at each budget, budgets ascending) reaches
    `loss`, with log D read linearly in loss between the two bracketing budgets: no law, only the measurements.
    0 when the smallest budget already does better, inf when no measured budget reaches it."""
    log_d = np.log(np.asarray(budgets, dtype=float))
    L = np.asarray(losses, dtype=float)
    if loss >= L[0]:
        return 0.0 if loss > L[0] else float(budgets[0])
    for i in range(len(L) - 1):  # the first crossing: a non-monotone baseline reached the loss there first
        if L[i] > loss >= L[i + 1]:
            return float(np.exp(log_d[i] + (L[i] - loss) / (L[i] - L[i + 1]) * (log_d[i + 1] - log_d[i])))
    return math.inf


def local_data_efficiency(budgets: Sequence[float], baseline_losses: Sequence[float], baseline_draws: np.ndarray,
                          loss: float, tokens: float, loss_draws: Sequence[float]) -> DataEfficiency:
    """D_eq / D with D_eq the equal-loss budget interpolated between the baseline's measured budgets
    (`equal_loss_tokens`): the multiplier without a law, so a law that fails its lack-of-fit test does not
    touch it. Outside the measured losses it is not quoted (no multiplier, `extrapolated`). The interval pairs
    draw b of the baseline's means [n_boot, budgets] with draw b of the loss; a draw outside the measured
    range counts as 0 or inf, so an interval that reaches past the measurements shows it."""
    if len(loss_draws) != len(baseline_draws):
        raise FitError(f"{len(loss_draws)} draws of the loss for {len(baseline_draws)} of the baseline: pair them")
    d_eq = equal_loss_tokens(budgets, baseline_losses, loss)
    flags = []
    if np.any(np.diff(baseline_losses) >= 0):
        flags.append("the baseline's loss does not fall at every budget: D_eq is its first crossing")
    outside = d_eq == 0 or math.isinf(d_eq)
    if outside:
        where = (f"above the baseline's loss {baseline_losses[0]:.4g} at its smallest budget" if d_eq == 0 else
                 f"below every measured baseline loss (lowest {min(baseline_losses):.4g})")
        flags.append(f"outside the measured budgets: loss {loss:.4g} is {where}; not quoted")
        return DataEfficiency(tokens, loss, math.nan, math.nan, Interval(math.nan, math.nan), tuple(flags),
                              extrapolated=True, method="local")
    d_boot = np.array([equal_loss_tokens(budgets, curve, draw) if np.all(np.isfinite(curve)) else math.nan
                       for curve, draw in zip(np.asarray(baseline_draws), np.asarray(loss_draws, dtype=float))])
    beyond = int(np.sum((d_boot == 0) | np.isinf(d_boot)))
    if beyond:
        flags.append(f"{beyond} of {len(d_boot)} draws fall outside the measured budgets (counted as 0 or inf): "
                     "the interval reaches past the measurements")
    return DataEfficiency(tokens, loss, d_eq, d_eq / tokens, Interval.from_draws(d_boot / tokens), tuple(flags),
                          Interval.from_draws(d_boot), method="local")


def local_efficiency_of_loss(table: EvaluationTable, baseline: str, recipe: str, x: float, k: int, tokens: float,
                             n_boot: int = 200, seed: int = 0) -> DataEfficiency:
    """D_eq / D for a measured loss with D_eq interpolated between the baseline recipe's measured budgets (its
    seed means; `local_data_efficiency`): no law. The baseline's draws resample its seeds at each
    budget, the loss's are its cell's member-seed draws."""
    points = singles_over_x(table, baseline)
    groups = [np.asarray(v, dtype=float) for v in points.values()]
    draws = (resample_seeds(groups, n_boot, _rng(seed, "baseline", baseline)) if any(len(g) > 1 for g in groups)
             else np.full((n_boot, len(groups)), np.nan))
    loss, loss_draws = loss_with_draws(table, recipe, x, k, n_boot, seed)
    return local_data_efficiency(list(points), [float(g.mean()) for g in groups], draws, loss, tokens, loss_draws)
