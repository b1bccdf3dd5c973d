"""Scaling-law fits: L(x) = A / x^B + C, their asymptotes with bootstrap intervals, and data efficiency.

The objective is the paper's (../shared/docs/paper-recipe.md): unweighted least squares on the raw loss,
every parameter >= 0; x is model size, ensemble size K or token budget D. The paper minimises it with
scipy's curve_fit from p0 = [1, 0.5, 2]; here it is minimised by variable projection, which is global
and vectorised: for a fixed exponent B the law is linear in (A, C), solved in closed form with the
bounds, so the fit scans B on a log grid and refines the best cell by golden section. One call fits
hundreds of bootstrap resamples at once (`fit_power_law_batch`), and a fixed B (the sensitivity band)
is the same solve without the scan.

Identification: a law with 3 parameters fitted on 3 points interpolates them (no residual, nothing
tests the law), so an asymptote is quoted only when the fit has more distinct x than parameters. A fit
with fewer is returned with `identified = False`, NaN parameters and the ordering of its points only;
every renderer prints "not identified" in place of an asymptote and no multiplier is derived from it.

Uncertainty is a percentile bootstrap over the unit that varies: seeds. Repeated x values are seeds of
one point; the fit is to the per-x mean and the bootstrap rebuilds each mean from seed deviations
resampled with replacement, pooled over x and scaled by sqrt(r / (r - 1)) (r seeds at that x) so the
resampled mean has the unbiased variance s^2 / r (Davison & Hinkley 1997, sec. 2.2 and 6.2.3). With
2-3 seeds per point a per-x resample covers the truth ~88% of the time at 95% nominal (too few
degrees of freedom per x); the pooled one ~92%, and ~95% once its spread is widened by t_df / z
(`small_sample_widening`; `tests/bench/test_fits.py` measures the coverage). A caller with a better
model of what varies (bench.science.analysis rebuilds ensemble losses from resampled member seeds) passes the
resampled curves as `boot_y`. With one value per x the points are resampled instead and flagged.

Intervals are `Interval`s: a degenerate one (every resample gives the same value, e.g. noiseless
input) says so in words; a printed interval never reads [x, x].

Lack of fit: a bootstrap interval measures how far C moves when the seeds are redrawn, assuming the law
holds; it cannot see a law that does not (a curve that misses its own points by more than seed noise gives
tight, wrong intervals). So every identified fit tests its residuals against the replicate noise
(`lack_of_fit`): with seeds at each x, the classical F test of lack of fit against pure error (Draper &
Smith, Applied Regression Analysis, 3rd ed., sec. 2.1), F = [sum_i r_i (mean_i - L(x_i))^2 / (n_x - 3)] /
[sum_ij (y_ij - mean_i)^2 / sum_i (r_i - 1)], p from scipy.stats.f; with resampled curves given by the caller
(member seeds: no independent seeds at each K), a parametric-bootstrap version of it: the fit's residual sum
of squares against the same law refitted to its own curve plus each draw's noise. p < LACK_OF_FIT_ALPHA
flags the law, and a flagged law feeds no headline (`DataEfficiency.headline`).

A fit never fails silently: anything that makes its asymptote untrustworthy (too few points, C at a
bound or above the data, a degenerate exponent, lack of fit) is written into `flags`, and every report prints
them beside the number. Input that cannot be fitted at all (NaN, x <= 0, mismatched lengths) raises FitError.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import f as f_distribution
from scipy.stats import norm
from scipy.stats import t as student_t

from plumbing.console import ChorusError

N_PARAMS = 3
# The exponent is searched on this log grid, then refined inside the best cell. Beyond 20 the curve is a step.
B_GRID = np.geomspace(1e-3, 20.0, 161)
GOLDEN_STEPS = 48  # each shrinks the bracket by 0.618: 48 steps take one grid cell to ~1e-10 of it
# Exponents outside this range make C meaningless: a flat curve trades C against A, a cliff makes C
# just the level of the last point.
SANE_B = (0.01, 5.0)
# A point bootstrap over fewer distinct x than this mostly re-draws the same few curves.
MIN_POINTS_FOR_POINT_BOOTSTRAP = 5
# The sensitivity band: C refitted with B fixed at B_hat times each of these factors.
B_BAND = (0.5, 2.0)
B_BAND_STEPS = 9
LEVEL = 0.95
# A law whose residuals exceed the seed noise at this level is flagged. The usual 5%: each law is tested once,
# with no correction for the several laws of a study, so a correct law is flagged 1 time in 20; a false flag
# only withholds a headline number, a missed one prints a number the data contradict.
LACK_OF_FIT_ALPHA = 0.05


class FitError(ChorusError):
    """Input that no power law can be fitted to (NaN, non-positive x, mismatched lengths)."""


def power_law(x, A: float, B: float, C: float):
    return A / np.power(x, B) + C


# ---- intervals ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval over `n` usable resamples (of `n_total` drawn)."""

    lo: float
    hi: float
    n: int = 0
    n_total: int = 0
    level: float = LEVEL

    @classmethod
    def from_draws(cls, draws, level: float = LEVEL) -> Interval:
        """Percentile interval of the finite draws; inf draws (an unbounded multiplier) count as values."""
        draws = np.asarray(draws, dtype=float).ravel()
        ok = draws[~np.isnan(draws)]
        if len(ok) < 2:
            return cls(math.nan, math.nan, len(ok), len(draws), level)
        tail = (1 - level) / 2
        lo, hi = np.quantile(ok, [tail, 1 - tail], method="inverted_cdf")  # sample values: draws may be inf
        return cls(float(lo), float(hi), len(ok), len(draws), level)

    def __iter__(self) -> Iterator[float]:  # `lo, hi = interval`, as the tuples it replaces
        return iter((self.lo, self.hi))

    @property
    def defined(self) -> bool:
        return not (math.isnan(self.lo) or math.isnan(self.hi))

    @property
    def degenerate(self) -> bool:
        """Every resample gave the same value (up to float noise): there is no spread to report."""
        if not self.defined or math.isinf(self.lo) or math.isinf(self.hi):
            return False
        return self.hi - self.lo <= 1e-7 * max(1.0, abs(self.lo), abs(self.hi))

    def text(self, digits: int = 3) -> str:
        """'[3.412, 3.450]'; never '[x, x]': more digits are printed until the ends differ."""
        if not self.defined:
            return f"n/a ({self.n} of {self.n_total} resamples usable)"
        if self.degenerate:
            return f"degenerate: all {self.n} resamples give {self.lo:.{digits}f}"
        fmt = lambda v, d: "inf" if math.isinf(v) else f"{v:.{d}f}"
        d = digits
        while fmt(self.lo, d) == fmt(self.hi, d) and d < 12:
            d += 1
        return f"[{fmt(self.lo, d)}, {fmt(self.hi, d)}]"

    def __str__(self) -> str:
        return self.text()


def _spread_text(value: float, std: float, interval: Interval, digits: int = 3) -> str:
    """'3.431 ± 0.012': the one string every table and legend prints for a bootstrapped value."""
    if not math.isfinite(value):
        return "n/a"
    if interval.degenerate:
        return f"{value:.{digits}f} ± 0 (degenerate interval: all {interval.n} resamples give this value)"
    if not math.isfinite(std):
        return f"{value:.{digits}f} ± ?"
    return f"{value:.{digits}f} ± {std:.{digits}f}" if std >= 0.5 * 10**-digits else f"{value:.{digits}f} ± {std:.2g}"


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

    @property
    def rejected(self) -> bool:
        return self.p < LACK_OF_FIT_ALPHA  # False for nan

    def text(self) -> str:
        if math.isnan(self.p):
            return self.method
        return f"{self.method}: {self.statistic_name} = {self.statistic:.3g}, p = {self.p:.2g}"


NOT_TESTED = LackOfFit(math.nan, math.nan, "not tested")


def _exact(sse: float, y: np.ndarray) -> bool:
    """A residual sum of squares that is float noise: the law passes through the points."""
    return sse <= 1e-16 * float(np.sum(y**2))


def lack_of_fit_f_test(groups: Sequence[np.ndarray], fitted: np.ndarray) -> LackOfFit:
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
        return LackOfFit(0.0, 1.0, method)
    if _exact(ss_pure, means):  # seeds agree exactly, the law does not pass through them
        return LackOfFit(math.inf, 0.0, method)
    F = (ss_lof / df_lof) / (ss_pure / df_pure)
    return LackOfFit(F, float(f_distribution.sf(F, df_lof, df_pure)), method)


def lack_of_fit_bootstrap(x: np.ndarray, means: np.ndarray, fitted: np.ndarray, boot_y: np.ndarray) -> LackOfFit:
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
        return LackOfFit(observed, 1.0, method, "residual SS")
    null = fit_power_law_batch(x, fitted + noise)[3]
    return LackOfFit(observed, float((1 + np.sum(null >= observed)) / (1 + len(null))), method, "residual SS")


# ---- one law --------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class PowerLawFit:
    A: float
    B: float
    C: float  # NaN unless identified
    C_std: float  # bootstrap standard deviation of C (nan when no bootstrap was possible)
    C_interval: Interval  # bootstrap percentile interval of C
    x: tuple[float, ...]  # distinct x, ascending
    y: tuple[float, ...]  # mean loss at each x
    replicates: tuple[int, ...]  # seeds averaged at each x
    converged: bool  # a law was fitted (False when not identified)
    flags: tuple[str, ...]
    bootstrap: str  # what was resampled: "seeds", "member seeds", "points" or "none"
    boot_params: np.ndarray = field(default_factory=lambda: np.empty((0, 3)))  # [n_boot, 3] (A, B, C); NaN rows failed
    identified: bool = False  # more distinct x than parameters: an asymptote may be quoted
    C_band_B: tuple[float, float, float, float] = (math.nan,) * 4  # (B_lo, B_hi, C_min, C_max) with B fixed in the band
    lack_of_fit: LackOfFit = NOT_TESTED  # residuals vs replicate noise; rejected => a flag

    @property
    def ok(self) -> bool:
        """Identified and nothing flagged: the asymptote can be reported without a caveat."""
        return self.identified and not self.flags

    def predict(self, x) -> np.ndarray:
        return power_law(np.asarray(x, dtype=float), self.A, self.B, self.C)

    def boot_C(self) -> np.ndarray:
        return np.asarray(self.boot_params, dtype=float).reshape(-1, 3)[:, 2]

    def ordering(self) -> str:
        """What a fit that is not identified can still say: the mean loss at each x, in order of x."""
        return " -> ".join(f"{v:.4f}" for v in self.y)

    def asymptote(self) -> str:
        """C with its uncertainty, as printed in every table and legend: '3.431 ± 0.012'."""
        if not self.identified:
            return f"not identified ({len(self.x)} points for {N_PARAMS} parameters): ordering only"
        return _spread_text(self.C, self.C_std, self.C_interval)

    def B_band(self) -> str:
        """The sensitivity band: the range of C when B is fixed over B_hat x [0.5, 2]."""
        b_lo, b_hi, c_lo, c_hi = self.C_band_B
        if not self.identified or math.isnan(c_lo):
            return "n/a"
        return f"C in {Interval(c_lo, c_hi, B_BAND_STEPS, B_BAND_STEPS).text()} for B in [{b_lo:.3g}, {b_hi:.3g}]"

    def __str__(self) -> str:
        law = (f"L = {self.A:.4g}/x^{self.B:.3g} + {self.asymptote()}" if self.identified
               else f"{self.asymptote()}: {self.ordering()}")
        note = f"  [FLAGGED: {'; '.join(self.flags)}]" if self.flags else ""
        return f"{law} ({len(self.x)} points, bootstrap over {self.bootstrap}){note}"


def _check_points(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if len(x) != len(y):
        raise FitError(f"x and y differ in length ({len(x)} vs {len(y)})")
    if len(x) == 0:
        raise FitError("no points to fit")
    if not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)):
        bad = [i for i in range(len(x)) if not (math.isfinite(x[i]) and math.isfinite(y[i]))]
        raise FitError(f"non-finite value (NaN or inf) at point(s) {bad}: drop failed runs before fitting")
    if np.any(x <= 0):
        raise FitError(f"x must be > 0 for x^B (got {x[x <= 0].tolist()})")
    return x, y


def _sanity_flags(A: float, B: float, C: float, x: np.ndarray, y: np.ndarray) -> list[str]:
    flags = []
    scale = max(1e-12, float(np.abs(y).max()))
    if A / x.min() ** B <= 1e-6 * scale:  # the power-law term contributes nothing anywhere in the data
        flags.append("A = 0: the loss does not decrease with x, so C is only the mean loss")
    if C <= 1e-9 * scale:
        flags.append(f"C = {C:.3g} sits at its lower bound 0: the asymptote is not resolved")
    if C > y.min() + 1e-9 * scale:
        flags.append(f"C = {C:.4g} is above the lowest observed loss {y.min():.4g}")
    if B < SANE_B[0]:
        flags.append(f"B = {B:.3g} is tiny: the curve is almost flat and C trades off against A")
    if B > SANE_B[1]:
        flags.append(f"B = {B:.3g} is huge: the curve drops to C at once, C is just the tail level")
    return flags


def _group(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    xs = np.unique(x)
    return xs, [y[x == v] for v in xs]


def small_sample_widening(df: int, level: float = LEVEL) -> float:
    """t_df / z at the interval's level: the factor by which a spread estimated from df degrees of freedom
    is widened so a percentile interval covers at its stated rate (what a t interval does to a normal one).

    A bootstrap estimates the spread of seeds from the seeds it has; with few of them (3 seeds at 6 points:
    12 df; 5 members: 4 df) its 95% intervals cover ~92% or ~88% of the time on normal noise. 1.04 at 30 df.
    """
    if df < 1:
        return math.nan
    tail = (1 + level) / 2
    return float(student_t.ppf(tail, df) / norm.ppf(tail))


def resample_seeds(groups: Sequence[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, len(groups)]: each group's mean rebuilt from seed deviations resampled with replacement.

    The deviations of every seed from its group's mean are pooled over the groups (seed noise is taken to
    be the same at every x: the pool then has sum(r) - groups degrees of freedom instead of r - 1 per x,
    which is what keeps 95% intervals near 95% with 2-3 seeds per point) and scaled by sqrt(r / (r - 1))
    so a resampled group mean has variance s^2 / r, times `small_sample_widening` of the pool's degrees of
    freedom. Groups with one seed draw from the pool as well.
    """
    means = np.array([np.mean(g) for g in groups])
    pool = np.concatenate([(np.asarray(g, dtype=float) - np.mean(g)) * math.sqrt(len(g) / (len(g) - 1))
                           for g in groups if len(g) > 1])
    pool = pool * small_sample_widening(sum(len(g) - 1 for g in groups if len(g) > 1))
    out = np.empty((n_boot, len(groups)))
    for j, g in enumerate(groups):
        out[:, j] = means[j] + pool[rng.integers(0, len(pool), size=(n_boot, len(g)))].mean(axis=1)
    return out


def _b_band(xs: np.ndarray, means: np.ndarray, B: float) -> tuple[float, float, float, float]:
    bs = B * np.geomspace(*B_BAND, B_BAND_STEPS)
    _, _, c, _ = fit_power_law_batch(xs, np.tile(means, (len(bs), 1)), B=bs)
    return float(bs[0]), float(bs[-1]), float(np.nanmin(c)), float(np.nanmax(c))


def fit_power_law(x: Sequence[float], y: Sequence[float], n_boot: int = 200, seed: int = 0,
                  boot_y: np.ndarray | None = None, boot_label: str = "member seeds") -> PowerLawFit:
    """Fit L(x) = A / x^B + C to the points, with a percentile bootstrap interval of C.

    The bootstrap resamples seeds within each x (repeated x), or the points (one value per x, flagged),
    or is given: `boot_y` [n_boot, distinct x] holds resampled per-x means built by the caller (recorded
    as `boot_label`); then `n_boot` and `seed` are not used.
    """
    x, y = _check_points(x, y)
    xs, groups = _group(x, y)
    means = np.array([g.mean() for g in groups])
    reps = tuple(len(g) for g in groups)
    nan = math.nan

    if len(xs) <= N_PARAMS:
        flag = (f"too few points: {N_PARAMS} parameters (A, B, C) need >= {N_PARAMS + 1} distinct x (more points than "
                f"parameters), got {len(xs)}; ordering only")
        return PowerLawFit(nan, nan, nan, nan, Interval(nan, nan), tuple(xs.tolist()), tuple(means.tolist()), reps,
                           converged=False, flags=(flag,), bootstrap="none", identified=False)
    flags: list[str] = []
    if np.ptp(means) == 0:
        flags.append("y is constant: there is no trend to fit")
    A, B, C, _ = (float(v[0]) for v in fit_power_law_batch(xs, means[None, :]))
    flags += _sanity_flags(A, B, C, xs, means)

    if boot_y is not None:
        boot_y = np.asarray(boot_y, dtype=float)
        if boot_y.ndim != 2 or boot_y.shape[1] != len(xs):
            raise FitError(f"boot_y must be [n_boot, {len(xs)} distinct x], got shape {boot_y.shape}")
        bootstrap, bx, by = boot_label, xs, boot_y
    elif any(r > 1 for r in reps):  # the spread that a rerun with new seeds would give
        bootstrap, bx, by = "seeds", xs, resample_seeds(groups, n_boot, np.random.default_rng(seed))
    else:
        bootstrap, bx, by = "points", xs, None
    fitted = power_law(xs, A, B, C)
    if boot_y is not None:
        lack_of_fit = lack_of_fit_bootstrap(xs, means, fitted, boot_y)
    elif any(r > 1 for r in reps):
        lack_of_fit = lack_of_fit_f_test(groups, fitted)
    else:
        lack_of_fit = LackOfFit(math.nan, math.nan, "not testable: one value per x, no replicates")
    if lack_of_fit.rejected:
        flags.append(f"lack of fit: the law misses its points by more than seed noise "
                     f"({lack_of_fit.text()} < {LACK_OF_FIT_ALPHA})")
    if by is not None:
        bA, bB, bC, _ = fit_power_law_batch(bx, by)
        boot = np.stack([bA, bB, bC], axis=1) if len(by) else np.empty((0, 3))
    else:  # resample points; a draw with no more distinct x than parameters is not identified
        rng = np.random.default_rng(seed)
        boot = np.full((n_boot, 3), nan)
        for i in range(n_boot):
            idx = rng.integers(0, len(xs), size=len(xs))
            if len(np.unique(idx)) > N_PARAMS:
                boot[i] = [float(v[0]) for v in fit_power_law_batch(xs[idx], means[idx][None, :])[:3]]
        if len(xs) < MIN_POINTS_FOR_POINT_BOOTSTRAP:
            flags.append(f"bootstrap over only {len(xs)} points (no seeds): the spread of C understates its uncertainty")
    n_total = len(boot)
    failed = int(np.isnan(boot[:, 2]).sum())
    if n_total and failed > 0.5 * n_total:
        flags.append(f"bootstrap: {failed} of {n_total} resamples could not be fitted; the uncertainty is rough")
    ok_c = boot[:, 2][np.isfinite(boot[:, 2])]
    c_std = float(ok_c.std(ddof=1)) if len(ok_c) >= 2 else nan
    return PowerLawFit(A, B, C, c_std, Interval.from_draws(boot[:, 2]), tuple(xs.tolist()), tuple(means.tolist()),
                       reps, converged=True, flags=tuple(flags), bootstrap=bootstrap, boot_params=boot,
                       identified=True, C_band_B=_b_band(xs, means, B), lack_of_fit=lack_of_fit)


# ---- the joint limit: K -> infinity at each N, then N -> infinity ------------------------------

@dataclass(frozen=True, eq=False)
class JointLimitFit:
    per_n: dict[float, PowerLawFit]  # the fit over K at each model size N
    over_n: PowerLawFit | None  # the fit of the K-limits C_N over N; its bootstrap is the propagated one
    flags: tuple[str, ...]

    @property
    def C(self) -> float:
        return self.over_n.C if self.over_n is not None else math.nan

    @property
    def C_std(self) -> float:
        return self.over_n.C_std if self.over_n is not None else math.nan

    @property
    def C_interval(self) -> Interval:
        return self.over_n.C_interval if self.over_n is not None else Interval(math.nan, math.nan)

    @property
    def identified(self) -> bool:
        return self.over_n is not None and self.over_n.identified

    def asymptote(self) -> str:
        """The same string as over_n.asymptote(): the table and the plot's legend cannot disagree."""
        return self.over_n.asymptote() if self.over_n is not None else "n/a"


def joint_limit_from_fits(per_n: Mapping[float, PowerLawFit]) -> JointLimitFit:
    """Fit the identified K-limits C_N over N; resample b refits C_N^(b) over N (the per-N bootstraps must be
    draws of one resampling scheme with the same count, so draw b of every N comes from one simulated study)."""
    per_n = dict(sorted(per_n.items()))
    flags = [f"N={n:g}: {f}" for n, fit in per_n.items() for f in fit.flags]
    usable = {n: fit for n, fit in per_n.items() if fit.identified}
    dropped = sorted(set(per_n) - set(usable))
    if dropped:
        flags.append(f"N={', '.join(f'{n:g}' for n in dropped)} left out: no K-limit could be fitted")
    if not usable:
        return JointLimitFit(per_n, None, tuple(flags))
    counts = {len(fit.boot_C()) for fit in usable.values()}
    draws = np.array([fit.boot_C() for fit in usable.values()]).T if len(counts) == 1 else np.empty((0, len(usable)))
    ns = np.array(list(usable))
    c_ns = np.array([fit.C for fit in usable.values()])
    over_n = fit_power_law(ns, c_ns, boot_y=draws, boot_label="per-N bootstraps, propagated")
    flags += [f"over N: {f}" for f in over_n.flags]
    return JointLimitFit(per_n, over_n, tuple(flags))


def fit_joint_limit(points: Iterable[tuple[float, float, float]], n_boot: int = 200, seed: int = 0) -> JointLimitFit:
    """Points (N, K, loss): for each N fit the loss over K and take C_N, then fit C_N over N.

    Repeated (N, K) losses (the K-subsets) are bootstrapped as replicates; bench.science.analysis builds the same fit
    from a member-seed bootstrap instead, which is the unit that varies.
    """
    by_n: dict[float, tuple[list[float], list[float]]] = {}
    for n, k, loss in points:
        by_n.setdefault(float(n), ([], []))
        by_n[float(n)][0].append(k)
        by_n[float(n)][1].append(loss)
    if not by_n:
        raise FitError("no points to fit")
    return joint_limit_from_fits({n: fit_power_law(ks, ls, n_boot=n_boot, seed=seed) for n, (ks, ls) in by_n.items()})


# ---- data efficiency ----------------------------------------------------------------------------

def tokens_for_loss(data_law: PowerLawFit | tuple[float, float, float], loss):
    """Invert L(D) = A / D^B + C: the budget at which that law reaches `loss` (inf at or below C).

    Works elementwise on arrays of parameters and losses (the bootstrap's draws)."""
    A, B, C = (data_law.A, data_law.B, data_law.C) if isinstance(data_law, PowerLawFit) else data_law
    A, B, C, loss = (np.asarray(v, dtype=float) for v in (A, B, C, loss))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = (A / (loss - C)) ** (1.0 / B)
    d = np.where((loss > C) & (A > 0) & (B > 0), d, np.inf)
    d = np.where(np.isnan(A) | np.isnan(B) | np.isnan(C) | np.isnan(loss), np.nan, d)
    return float(d) if d.ndim == 0 else d


@dataclass(frozen=True)
class DataEfficiency:
    tokens: float  # D: the budget the recipe used
    loss: float  # L: the loss it reached
    equivalent_tokens: float  # D(L): the standard recipe's budget for that loss
    efficiency: float  # D(L) / D
    interval: Interval  # percentile interval of the efficiency (the data law's draws paired with the loss's)
    flags: tuple[str, ...]
    equivalent_interval: Interval = Interval(math.nan, math.nan)  # percentile interval of D(L)
    extrapolated: bool = False  # D(L) lies outside the budgets the data law was fitted on (or measured)
    identified: bool = True  # the data law is identified (else there is no multiplier at all)
    law_flags: tuple[str, ...] = ()  # the flags of every law the number derives from (data law, asymptote)
    method: str = "law"  # "law": through the fitted data law; "local": interpolated between measured budgets

    @property
    def headline(self) -> bool:
        """A multiplier fit to quote: read inside the measured or fitted range, finite, and derived from no
        flagged law (a law that fails its lack-of-fit test, or has C at a bound, gives no headline number)."""
        return (self.identified and not self.extrapolated and math.isfinite(self.efficiency)
                and not self.law_flags)

    def multiplier(self) -> str:
        """'2.29x [1.80, 2.95]' as every table and legend prints it; 'n/a' without an identified law."""
        if not self.identified or math.isnan(self.efficiency):
            return "n/a"
        return f"{self.efficiency:.2f}x {self.interval.text(2)}" + (" (extrapolated)" if self.extrapolated else "")

    def __str__(self) -> str:
        note = f"  [FLAGGED: {'; '.join(self.flags)}]" if self.flags else ""
        return f"{self.multiplier()} (loss {self.loss:.3f} at D={self.tokens:g}){note}"


def data_efficiency(standard_data_law: PowerLawFit, loss: float, tokens: float,
                    loss_draws: Sequence[float] | None = None, source_flags: Sequence[str] = ()) -> DataEfficiency:
    """How many times more data the standard recipe needs to reach `loss`: D(L) / D.

    `standard_data_law` is the standard recipe's best loss fitted over budgets D (same unit as `tokens`).
    `loss_draws` are bootstrap draws of `loss` (one per draw of the law, from the same resampling, so draw b
    of both comes from one simulated study): the interval then carries the loss's uncertainty as well as the
    law's. Without them only the law's is carried, and a flag says so. A D(L) outside the budgets the law
    was fitted on is flagged extrapolated and kept out of headlines (`headline`), and so is one derived from a
    flagged law: the data law's flags and `source_flags` (those of the law whose asymptote `loss` is).
    """
    if not (math.isfinite(loss) and math.isfinite(tokens) and tokens > 0):
        raise FitError(f"need a finite loss and a positive budget (got loss={loss}, tokens={tokens})")
    law = standard_data_law
    law_flags = (*(f"data law: {f}" for f in law.flags), *source_flags)
    flags = list(law_flags)
    nan_interval = Interval(math.nan, math.nan)
    if not law.identified:
        flags.append("the standard recipe's data law is not identified: no multiplier")
        return DataEfficiency(tokens, loss, math.nan, math.nan, nan_interval, tuple(flags), identified=False,
                              law_flags=law_flags)
    d_eq = tokens_for_loss(law, loss)
    lo_x, hi_x = min(law.x), max(law.x)
    extrapolated = not (lo_x <= d_eq <= hi_x)
    if math.isinf(d_eq):
        flags.append(f"loss {loss:.4g} <= the standard recipe's asymptote C = {law.C:.4g}: "
                     "it never reaches this loss, the efficiency is unbounded")
    elif d_eq > hi_x:
        flags.append(f"extrapolated: D(L) = {d_eq:.3g} is {d_eq / hi_x:.1f}x the largest budget the data law was "
                     "fitted on")
    elif d_eq < lo_x:
        flags.append(f"extrapolated: D(L) = {d_eq:.3g} is below the smallest budget {lo_x:.3g} the data law was "
                     "fitted on")
    boot = np.asarray(law.boot_params, dtype=float).reshape(-1, 3)
    if loss_draws is None:
        draws = np.full(len(boot), loss)
        flags.append("interval from the data law's resamples only (no draws of the loss were given)")
    else:
        draws = np.asarray(loss_draws, dtype=float).ravel()
        if len(draws) != len(boot):
            raise FitError(f"loss_draws has {len(draws)} draws but the data law has {len(boot)} resamples: "
                           "pass one draw of the loss per resample of the law")
    d_boot = tokens_for_loss((boot[:, 0], boot[:, 1], boot[:, 2]), draws) if len(boot) else np.empty(0)
    return DataEfficiency(tokens, loss, d_eq, d_eq / tokens, Interval.from_draws(np.asarray(d_boot) / tokens),
                          tuple(flags), Interval.from_draws(d_boot), extrapolated, True, law_flags)


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


def headline_efficiencies(efficiencies: Mapping[str, DataEfficiency]) -> dict[str, DataEfficiency]:
    """The multipliers a headline may quote: inside the fitted or measured range, and from no flagged law."""
    return {name: e for name, e in efficiencies.items() if e.headline}
