"""The law L(x) = A / x^B + C: its least-squares fit, vectorised over resamples, and the test of its residuals.

The objective is the paper's (../shared/docs/paper-recipe.md): unweighted least squares on the raw loss,
every parameter >= 0; x is model size, ensemble size K or token budget D. The paper minimises it with
scipy's curve_fit from p0 = [1, 0.5, 2]; here it is minimised by variable projection, which is global
and vectorised: for a fixed exponent B the law is linear in (A, C), solved in closed form with the
bounds, so the fit scans B on a log grid and refines the best cell by golden section. One call fits
hundreds of bootstrap resamples at once (`fit_power_law_batch`), and a fixed B (the sensitivity band)
is the same solve without the scan.

Lack of fit: a bootstrap interval measures how far C moves when the seeds are redrawn, assuming the law
holds; it cannot see a law that does not (a curve that misses its own points by more than seed noise gives
tight, wrong intervals). So every identified fit tests its residuals against the replicate noise: with seeds
at each x, the classical F test of lack of fit against pure error (Draper & Smith, Applied Regression
Analysis, 3rd ed., sec. 2.1), F = [sum_i r_i (mean_i - L(x_i))^2 / (n_x - 3)] / [sum_ij (y_ij - mean_i)^2 /
sum_i (r_i - 1)], p from scipy.stats.f (`lack_of_fit_f_test`); with resampled curves given by the caller
(member seeds: no independent seeds at each K), a parametric-bootstrap version of it
(`lack_of_fit_bootstrap`): the fit's residual sum of squares against the same law refitted to its own curve
plus each draw's noise. bench.science.fits judges the p-value at its LACK_OF_FIT_ALPHA and flags the law.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import f as f_distribution

N_PARAMS = 3
# The exponent is searched on this log grid, then refined inside the best cell. Beyond 20 the curve is a step.
B_GRID = np.geomspace(1e-3, 20.0, 161)
GOLDEN_STEPS = 48  # each shrinks the bracket by 0.618: 48 steps take one grid cell to ~1e-10 of it


def power_law(x, A: float, B: float, C: float):
    return A / np.power(x, B) + C


def tokens_for_loss(law: tuple[float, float, float], loss):
    """Invert L(D) = A / D^B + C, law = (A, B, C): the budget at which it reaches `loss` (inf at or below C).

    Works elementwise on arrays of parameters and losses (the bootstrap's draws)."""
    A, B, C, loss = (np.asarray(v, dtype=float) for v in (*law, loss))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = (A / (loss - C)) ** (1.0 / B)
    d = np.where((loss > C) & (A > 0) & (B > 0), d, np.inf)
    d = np.where(np.isnan(A) | np.isnan(B) | np.isnan(C) | np.isnan(loss), np.nan, d)
    return float(d) if d.ndim == 0 else d


# ---- the vectorised least-squares fit -------------------------------------------------------------

def _solve_linear(u: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For y ~ A u + C with A, C >= 0 (u = x^-B fixed): A, C and the residual sum of squares, per row.

    Least squares on a convex problem: the unconstrained optimum when it is feasible, else the best point
    on the active bound (A = 0: a flat line at the mean; C = 0: a line through the origin).
    """
    ub, yb = u.mean(-1), y.mean(-1)
    du, dy = u - ub[..., None], y - yb[..., None]
    suu, suy, syy = (du * du).sum(-1), (du * dy).sum(-1), (dy * dy).sum(-1)
    has_spread = suu > 0
    A = np.where(has_spread, suy / np.where(has_spread, suu, 1.0), 0.0)
    sse = np.where(has_spread, syy - suy * A, syy)
    C = yb - A * ub
    flat = A < 0
    A, C, sse = np.where(flat, 0.0, A), np.where(flat, yb, C), np.where(flat, syy, sse)
    low = C < 0
    if np.any(low):
        a0 = np.maximum((u * y).sum(-1) / (u * u).sum(-1), 0.0)
        sse0 = ((y - a0[..., None] * u) ** 2).sum(-1)
        A, C, sse = np.where(low, a0, A), np.where(low, 0.0, C), np.where(low, sse0, sse)
    return A, C, np.maximum(sse, 0.0)


def fit_power_law_batch(x, Y, B: float | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares L = A / x^B + C (A, B, C >= 0) for every row of Y at once: arrays A, B, C, SSE.

    x: [n] distinct or repeated positive values; Y: [S, n] (rows with a NaN give NaN parameters). With B
    given (a scalar or one per row) only A and C are fitted. x is divided by its geometric mean inside,
    so x in billions or in tokens fits alike.
    """
    x = np.asarray(x, dtype=float)
    Y = np.atleast_2d(np.asarray(Y, dtype=float))
    good = np.all(np.isfinite(Y), axis=1)
    Yg = np.where(good[:, None], Y, 0.0)
    x0 = float(np.exp(np.log(x).mean()))
    t = np.log(x / x0)
    if B is not None:
        b = np.broadcast_to(np.asarray(B, dtype=float), (len(Y),))
        A, C, sse = _solve_linear(np.exp(-b[:, None] * t), Yg)
    else:
        log_grid = np.log(B_GRID)
        u = np.exp(-B_GRID[:, None] * t)  # [G, n]
        _, _, sse_grid = _solve_linear(u[None, :, :], Yg[:, None, :])  # [S, G]
        best = sse_grid.argmin(axis=1)
        lo = log_grid[np.maximum(best - 1, 0)]
        hi = log_grid[np.minimum(best + 1, len(B_GRID) - 1)]

        def sse_at(logb):
            return _solve_linear(np.exp(-np.exp(logb)[:, None] * t), Yg)[2]

        g = (math.sqrt(5) - 1) / 2
        c, d = hi - g * (hi - lo), lo + g * (hi - lo)
        fc, fd = sse_at(c), sse_at(d)
        for _ in range(GOLDEN_STEPS):
            left = fc <= fd  # the minimum lies in [lo, d], else in [c, hi]
            hi, lo = np.where(left, d, hi), np.where(left, lo, c)
            c, d = hi - g * (hi - lo), lo + g * (hi - lo)
            fc, fd = sse_at(c), sse_at(d)
        b = np.exp((lo + hi) / 2)
        A, C, sse = _solve_linear(np.exp(-b[:, None] * t), Yg)
        # the grid's best point guards against a bracket that closed on a worse value
        grid_better = sse_grid[np.arange(len(Y)), best] < sse
        if np.any(grid_better):
            gb = B_GRID[best]
            Ag, Cg, sg = _solve_linear(np.exp(-gb[:, None] * t), Yg)
            A, C, sse, b = (np.where(grid_better, Ag, A), np.where(grid_better, Cg, C),
                            np.where(grid_better, sg, sse), np.where(grid_better, gb, b))
    A = A * x0**b  # back to the caller's unit of x
    nan = np.full(len(Y), np.nan)
    return (np.where(good, A, nan), np.where(good, b, nan), np.where(good, C, nan), np.where(good, sse, nan))


# ---- lack of fit: the law's residuals against the replicate noise -------------------------------------

@dataclass(frozen=True)
class LackOfFit:
    """The test of a law against its replicates: statistic, p-value and how it was computed."""

    statistic: float  # F (seeds at each x) or the residual sum of squares (resampled curves)
    p: float  # nan: not testable
    method: str
    statistic_name: str = "F"
    alpha: float = math.nan  # the level the law is judged at (bench.science.fits.LACK_OF_FIT_ALPHA)

    @property
    def rejected(self) -> bool:
        return self.p < self.alpha  # False for nan

    def text(self) -> str:
        if math.isnan(self.p):
            return self.method
        return f"{self.method}: {self.statistic_name} = {self.statistic:.3g}, p = {self.p:.2g}"


NOT_TESTED = LackOfFit(math.nan, math.nan, "not tested")


def _exact(sse: float, y: np.ndarray) -> bool:
    """A residual sum of squares that is float noise: the law passes through the points."""
    return sse <= 1e-16 * float(np.sum(y**2))


def lack_of_fit_f_test(groups: Sequence[np.ndarray], fitted: np.ndarray, alpha: float) -> LackOfFit:
    """Lack of fit against pure error: the per-x means' residuals (weighted by their seeds r_i, n_x - 3 df)
    against the seeds' scatter within each x (sum(r_i - 1) df), an F test (scipy.stats.f)."""
    reps = np.array([len(g) for g in groups])
    means = np.array([np.mean(g) for g in groups])
    df_lof, df_pure = len(groups) - N_PARAMS, int((reps - 1).sum())
    if df_lof < 1 or df_pure < 1:
        return LackOfFit(math.nan, math.nan, f"not testable ({df_lof} df of lack of fit, {df_pure} of pure error)")
    ss_lof = float((reps * (means - fitted) ** 2).sum())
    ss_pure = float(sum(((np.asarray(g) - np.mean(g)) ** 2).sum() for g in groups))
    method = f"F test of lack of fit vs seed noise on ({df_lof}, {df_pure}) df"
    if _exact(ss_lof, means):
        return LackOfFit(0.0, 1.0, method, alpha=alpha)
    if _exact(ss_pure, means):  # seeds agree exactly, the law does not pass through them
        return LackOfFit(math.inf, 0.0, method, alpha=alpha)
    F = (ss_lof / df_lof) / (ss_pure / df_pure)
    return LackOfFit(F, float(f_distribution.sf(F, df_lof, df_pure)), method, alpha=alpha)


def lack_of_fit_bootstrap(x: np.ndarray, means: np.ndarray, fitted: np.ndarray, boot_y: np.ndarray,
                          alpha: float) -> LackOfFit:
    """Lack of fit where the noise is given as resampled curves (member seeds), not as seeds at each x: the
    law's residual sum of squares against its distribution when the law holds exactly, the sums of squares of
    the law refitted to its own curve plus each draw's noise (boot_y - means, which keeps the noise's
    correlation across x). p = (1 + #{null >= observed}) / (1 + draws): at 200 draws the smallest is 0.005."""
    noise = boot_y - means
    noise = noise[np.all(np.isfinite(noise), axis=1)]
    if len(noise) < 20:
        return LackOfFit(math.nan, math.nan, f"not testable ({len(noise)} usable resampled curves)")
    observed = float(((means - fitted) ** 2).sum())
    method = f"bootstrap test of lack of fit vs resampled-seed noise ({len(noise)} draws)"
    if _exact(observed, means):
        return LackOfFit(observed, 1.0, method, "residual SS", alpha)
    null = fit_power_law_batch(x, fitted + noise)[3]
    return LackOfFit(observed, float((1 + np.sum(null >= observed)) / (1 + len(null))), method, "residual SS", alpha)
