"""Scaling-law fits: L(x) = A / x^B + C, their asymptotes with bootstrap intervals, and data efficiency.

The least-squares fit itself (the paper's objective, minimised by variable projection, vectorised over
resamples) and the lack-of-fit test of its residuals are in bench.science.least_squares; this module turns
them into laws that say how far they can be trusted.

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

Lack of fit: a bootstrap interval assumes the law holds, so every identified fit also tests its residuals
against the replicate noise; p < LACK_OF_FIT_ALPHA flags the law, and a flagged law feeds no headline.

A fit never fails silently: anything that makes its asymptote untrustworthy (too few points, C at a
bound or above the data, a degenerate exponent, lack of fit) is written into `flags`, and every report prints
them beside the number. Input that cannot be fitted at all (NaN, x <= 0, mismatched lengths) raises FitError.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import norm
from scipy.stats import t as student_t

from bench.science.least_squares import (
    N_PARAMS,
    NOT_TESTED,
    LackOfFit,
    fit_power_law_batch,
    lack_of_fit_bootstrap,
    lack_of_fit_f_test,
    power_law,
    tokens_for_loss,
)
from plumbing.console import ChorusError

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


def _sanity_flags(A: float, B: float, C: float, x: np.ndarray, y: np.ndarray, noise: float = 0.0) -> list[str]:
    """What makes a fitted law's C unreadable. `noise`: the standard error of the lowest mean (0: none known); a C
    above that mean by less than 1.96 of them is what a true law just below it gives on noisy data, not a flag."""
    flags = []
    scale = max(1e-12, float(np.abs(y).max()))
    if A / x.min() ** B <= 1e-6 * scale:  # the power-law term contributes nothing anywhere in the data
        flags.append("A = 0: the loss does not decrease with x, so C is only the mean loss")
    if C <= 1e-9 * scale:
        flags.append(f"C = {C:.3g} sits at its lower bound 0: the asymptote is not resolved")
    if C > y.min() + max(1e-9 * scale, 1.96 * noise):
        beyond = f" by more than 1.96 standard errors of that mean ({noise:.2g})" if noise > 0 else ""
        flags.append(f"C = {C:.4g} is above the lowest observed loss {y.min():.4g}{beyond}")
    if B < SANE_B[0]:
        flags.append(f"B = {B:.3g} is tiny: the curve is almost flat and C trades off against A")
    if B > SANE_B[1]:
        flags.append(f"B = {B:.3g} is huge: the curve drops to C at once, C is just the tail level")
    return flags


def _lowest_mean_noise(groups: Sequence[np.ndarray], means: np.ndarray, boot_y: np.ndarray | None) -> float:
    """The standard error of the lowest mean: the spread of its bootstrap draws where the caller gives them, else
    the seed SD pooled over the groups (as resample_seeds pools it) over sqrt(its seeds); 0 without replicates."""
    low = int(np.argmin(means))
    if boot_y is not None:
        column = np.asarray(boot_y, dtype=float)[:, low]
        column = column[np.isfinite(column)]
        return float(column.std(ddof=1)) if len(column) > 1 else 0.0
    df = sum(len(g) - 1 for g in groups)
    if df < 1:
        return 0.0
    pooled = math.sqrt(sum(float(np.sum((g - g.mean()) ** 2)) for g in groups) / df)
    return pooled / math.sqrt(len(groups[low]))


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
                           flags=(flag,), bootstrap="none", identified=False)
    flags: list[str] = []
    if np.ptp(means) == 0:
        flags.append("y is constant: there is no trend to fit")
    A, B, C, _ = (float(v[0]) for v in fit_power_law_batch(xs, means[None, :]))
    flags += _sanity_flags(A, B, C, xs, means, _lowest_mean_noise(groups, means, boot_y))

    fitted = power_law(xs, A, B, C)
    if boot_y is not None:
        boot_y = np.asarray(boot_y, dtype=float)
        if boot_y.ndim != 2 or boot_y.shape[1] != len(xs):
            raise FitError(f"boot_y must be [n_boot, {len(xs)} distinct x], got shape {boot_y.shape}")
        bootstrap, by = boot_label, boot_y
        lack_of_fit = lack_of_fit_bootstrap(xs, means, fitted, boot_y, LACK_OF_FIT_ALPHA)
    elif any(r > 1 for r in reps):  # the spread that a rerun with new seeds would give
        bootstrap, by = "seeds", resample_seeds(groups, n_boot, np.random.default_rng(seed))
        lack_of_fit = lack_of_fit_f_test(groups, fitted, LACK_OF_FIT_ALPHA)
    else:
        bootstrap, by = "points", None
        lack_of_fit = LackOfFit(math.nan, math.nan, "not testable: one value per x, no replicates")
    if lack_of_fit.rejected:
        flags.append(f"lack of fit: the law misses its points by more than seed noise "
                     f"({lack_of_fit.text()} < {LACK_OF_FIT_ALPHA})")
    if by is not None:
        bA, bB, bC, _ = fit_power_law_batch(xs, by)
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
                       reps, flags=tuple(flags), bootstrap=bootstrap, boot_params=boot,
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
        ks, losses = by_n.setdefault(float(n), ([], []))
        ks.append(k)
        losses.append(loss)
    if not by_n:
        raise FitError("no points to fit")
    return joint_limit_from_fits({n: fit_power_law(ks, ls, n_boot=n_boot, seed=seed) for n, (ks, ls) in by_n.items()})


# ---- data efficiency ----------------------------------------------------------------------------

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
    if not law.identified:
        flags.append("the standard recipe's data law is not identified: no multiplier")
        return DataEfficiency(tokens, loss, math.nan, math.nan, Interval(math.nan, math.nan), tuple(flags),
                              identified=False, law_flags=law_flags)
    d_eq = tokens_for_loss((law.A, law.B, law.C), loss)
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


def headline_efficiencies(efficiencies: Mapping[str, DataEfficiency]) -> dict[str, DataEfficiency]:
    """The multipliers a headline may quote: inside the fitted or measured range, and from no flagged law."""
    return {name: e for name, e in efficiencies.items() if e.headline}
