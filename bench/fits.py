"""Scaling-law fits: L(x) = A / x^B + C, their asymptotes with bootstrap uncertainty, and data efficiency.

The recipe is the paper's (../shared/docs/paper-recipe.md): scipy's curve_fit, unweighted least squares
on the raw loss, p0 = [1, 0.5, 2], every parameter >= 0; x is model size, ensemble size K or token budget
D, in whatever unit the caller picks (the paper uses billions of parameters or tokens).

A fit never fails silently: anything that makes its asymptote untrustworthy (too few points, no
convergence, C at a bound or above the data, a degenerate exponent) is written into `flags`, and
every report prints the flags beside the number. Input that cannot be fitted at all (NaN, x <= 0,
mismatched lengths) raises FitError naming the problem.

Replicates: repeated x values are seeds of the same point. The fit is to the per-x mean loss
(identical to least squares on all points when every x has the same number of seeds) and the
bootstrap resamples seeds within each x; with one value per x it resamples the points instead.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

P0 = (1.0, 0.5, 2.0)
N_PARAMS = 3
# Exponents outside this range make C meaningless: a flat curve trades C against A, a cliff makes C
# just the level of the last point.
SANE_B = (0.01, 5.0)
# A point bootstrap over fewer distinct x than this mostly re-draws the same few curves.
MIN_POINTS_FOR_POINT_BOOTSTRAP = 5


class FitError(ValueError):
    """Input that no power law can be fitted to (NaN, non-positive x, mismatched lengths)."""


def power_law(x, A: float, B: float, C: float):
    return A / np.power(x, B) + C


@dataclass(frozen=True)
class PowerLawFit:
    A: float
    B: float
    C: float
    C_std: float  # bootstrap standard deviation of C (nan when no bootstrap was possible)
    C_interval: tuple[float, float]  # bootstrap 2.5 and 97.5 percentiles of C
    x: tuple[float, ...]  # distinct x, ascending
    y: tuple[float, ...]  # mean loss at each x
    replicates: tuple[int, ...]  # seeds averaged at each x
    converged: bool
    flags: tuple[str, ...]
    bootstrap: str  # "seeds", "points" or "none"
    boot_params: tuple[tuple[float, float, float], ...]  # (A, B, C) per resample; nan where that fit failed

    @property
    def ok(self) -> bool:
        """Converged and nothing flagged: the asymptote can be reported without a caveat."""
        return self.converged and not self.flags

    def predict(self, x) -> np.ndarray:
        return power_law(np.asarray(x, dtype=float), self.A, self.B, self.C)

    def boot_C(self) -> np.ndarray:
        return np.array([p[2] for p in self.boot_params], dtype=float)

    def asymptote(self) -> str:
        """C with its uncertainty, as printed in every table: '3.431 ± 0.012'."""
        if not math.isfinite(self.C):
            return "n/a"
        return f"{self.C:.3f} ± {self.C_std:.3f}" if math.isfinite(self.C_std) else f"{self.C:.3f} ± ?"

    def __str__(self) -> str:
        law = (f"L = {self.A:.4g}/x^{self.B:.3g} + {self.asymptote()}" if self.converged else "no fit")
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


def _fit_once(x: np.ndarray, y: np.ndarray, p0=P0) -> tuple[np.ndarray | None, bool, str]:
    """(params, covariance defined, error message); params is None when curve_fit fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizeWarning)
        try:
            params, cov = curve_fit(power_law, x, y, p0=p0, bounds=(0.0, np.inf), maxfev=20_000)
            return params, bool(np.all(np.isfinite(cov))), ""
        except OptimizeWarning:
            pass  # converged, but the covariance is undefined: fit again without turning that into an error
        except (RuntimeError, ValueError) as e:
            return None, False, str(e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        params, _ = curve_fit(power_law, x, y, p0=p0, bounds=(0.0, np.inf), maxfev=20_000)
    return params, False, ""


def _sanity_flags(A: float, B: float, C: float, x: np.ndarray, y: np.ndarray, cov_defined: bool) -> list[str]:
    flags = []
    scale = max(1e-12, float(np.abs(y).max()))
    if not cov_defined:
        flags.append("parameters not identifiable from these points (covariance undefined)")
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


def _percentiles(samples: np.ndarray) -> tuple[float, float]:
    """2.5 and 97.5 percentiles, picking sample values (no interpolation: samples may be inf)."""
    if len(samples) < 2:
        return math.nan, math.nan
    lo, hi = np.quantile(samples, [0.025, 0.975], method="inverted_cdf")
    return float(lo), float(hi)


def fit_power_law(x: Sequence[float], y: Sequence[float], n_boot: int = 200, seed: int = 0) -> PowerLawFit:
    """Fit L(x) = A / x^B + C to the points; bootstrap C over seeds (repeated x) or over points."""
    x, y = _check_points(x, y)
    xs, groups = _group(x, y)
    means = np.array([g.mean() for g in groups])
    reps = tuple(len(g) for g in groups)
    flags: list[str] = []
    nan3 = (math.nan, math.nan, math.nan)

    def result(params, converged, boot, bootstrap="none"):
        boot_c = np.array([p[2] for p in boot], dtype=float)
        ok_c = boot_c[np.isfinite(boot_c)]
        c_std = float(ok_c.std(ddof=1)) if len(ok_c) >= 2 else math.nan
        return PowerLawFit(*map(float, params), C_std=c_std, C_interval=_percentiles(ok_c), x=tuple(xs.tolist()),
                           y=tuple(means.tolist()), replicates=reps, converged=converged, flags=tuple(flags),
                           bootstrap=bootstrap, boot_params=tuple(tuple(map(float, p)) for p in boot))

    if len(xs) < N_PARAMS:
        flags.append(f"too few points: {N_PARAMS} parameters (A, B, C) need >= {N_PARAMS} distinct x, got {len(xs)}")
        return result(nan3, False, [])
    if np.ptp(means) == 0:
        flags.append("y is constant: there is no trend to fit")
    params, cov_defined, error = _fit_once(xs, means)
    if params is None:
        flags.append(f"fit did not converge: {error}")
        return result(nan3, False, [])
    if len(xs) == N_PARAMS:
        flags.append(f"exact fit: {N_PARAMS} points for {N_PARAMS} parameters leave no residual to test the law")
    flags += _sanity_flags(*params, xs, means, cov_defined)

    rng = np.random.default_rng(seed)
    with_seeds = any(r > 1 for r in reps)
    boot = []
    for _ in range(n_boot):
        if with_seeds:  # resample seeds within each x: the spread that a rerun with new seeds would give
            yb = np.array([rng.choice(g, size=len(g)).mean() for g in groups])
            xb = xs
        else:  # resample points; a draw with fewer than 3 distinct x cannot be fitted
            idx = rng.integers(0, len(xs), size=len(xs))
            xb, yb = xs[idx], means[idx]
            if len(np.unique(xb)) < N_PARAMS:
                boot.append(nan3)
                continue
        p, _, _ = _fit_once(xb, yb, p0=params)
        boot.append(tuple(p) if p is not None else nan3)
    bootstrap = "seeds" if with_seeds else "points"
    failed = sum(not math.isfinite(p[2]) for p in boot)
    if n_boot and failed > 0.5 * n_boot:
        flags.append(f"bootstrap: {failed} of {n_boot} resamples could not be fitted; the uncertainty is rough")
    if not with_seeds and len(xs) < MIN_POINTS_FOR_POINT_BOOTSTRAP:
        flags.append(f"bootstrap over only {len(xs)} points (no seeds): the spread of C understates its uncertainty")
    return result(params, True, boot, bootstrap)


# ---- the joint limit: K -> infinity at each N, then N -> infinity ------------------------------

@dataclass(frozen=True)
class JointLimitFit:
    per_n: dict[float, PowerLawFit]  # the fit over K at each model size N
    over_n: PowerLawFit | None  # the fit of the K-limits C_N over N (None when no N had a K-limit)
    C: float  # the joint asymptote
    C_std: float  # spread of C when each C_N is redrawn from its own bootstrap
    flags: tuple[str, ...]

    def asymptote(self) -> str:
        if not math.isfinite(self.C):
            return "n/a"
        return f"{self.C:.3f} ± {self.C_std:.3f}" if math.isfinite(self.C_std) else f"{self.C:.3f} ± ?"


def fit_joint_limit(points: Iterable[tuple[float, float, float]], n_boot: int = 200, seed: int = 0) -> JointLimitFit:
    """Points (N, K, loss): for each N fit the loss over K and take C_N, then fit C_N over N.

    The joint C's uncertainty propagates the per-N bootstraps: resample b refits C_N^(b) over N.
    """
    by_n: dict[float, tuple[list[float], list[float]]] = {}
    for n, k, loss in points:
        by_n.setdefault(float(n), ([], []))
        by_n[float(n)][0].append(k)
        by_n[float(n)][1].append(loss)
    if not by_n:
        raise FitError("no points to fit")
    per_n = {n: fit_power_law(ks, ls, n_boot=n_boot, seed=seed) for n, (ks, ls) in sorted(by_n.items())}
    flags = [f"N={n:g}: {f}" for n, fit in per_n.items() for f in fit.flags]
    usable = {n: fit for n, fit in per_n.items() if fit.converged}
    dropped = sorted(set(per_n) - set(usable))
    if dropped:
        flags.append(f"N={', '.join(f'{n:g}' for n in dropped)} left out: no K-limit could be fitted")
    if not usable:
        return JointLimitFit(per_n, None, math.nan, math.nan, tuple(flags))
    ns = np.array(list(usable))
    c_ns = np.array([fit.C for fit in usable.values()])
    over_n = fit_power_law(ns, c_ns, n_boot=n_boot, seed=seed)
    flags += [f"over N: {f}" for f in over_n.flags]
    joint_boot = []
    if over_n.converged and n_boot:
        draws = np.array([fit.boot_C() for fit in usable.values()])  # [N, n_boot]
        p0 = (over_n.A, over_n.B, over_n.C)
        for b in range(draws.shape[1]):
            if np.all(np.isfinite(draws[:, b])):
                p, _, _ = _fit_once(ns, draws[:, b], p0=p0)
                joint_boot.append(p[2] if p is not None else math.nan)
    joint_boot = np.array(joint_boot, dtype=float)
    joint_boot = joint_boot[np.isfinite(joint_boot)]
    c_std = float(joint_boot.std(ddof=1)) if len(joint_boot) >= 2 else math.nan
    return JointLimitFit(per_n, over_n, over_n.C, c_std, tuple(flags))


# ---- data efficiency ----------------------------------------------------------------------------

def tokens_for_loss(data_law: PowerLawFit | tuple[float, float, float], loss: float) -> float:
    """Invert L(D) = A / D^B + C: the budget at which that law reaches `loss` (inf at or below C)."""
    A, B, C = (data_law.A, data_law.B, data_law.C) if isinstance(data_law, PowerLawFit) else data_law
    if not loss > C or A <= 0 or B <= 0:
        return math.inf
    return (A / (loss - C)) ** (1.0 / B)


@dataclass(frozen=True)
class DataEfficiency:
    tokens: float  # D: the budget the recipe used
    loss: float  # L: the loss it reached
    equivalent_tokens: float  # D(L): the standard recipe's budget for that loss
    efficiency: float  # D(L) / D
    interval: tuple[float, float]  # bootstrap 2.5/97.5 percentiles of the efficiency (from the data law's resamples)
    flags: tuple[str, ...]

    def __str__(self) -> str:
        lo, hi = self.interval
        spread = f" [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) and math.isfinite(hi) else ""
        note = f"  [FLAGGED: {'; '.join(self.flags)}]" if self.flags else ""
        return f"{self.efficiency:.2f}x{spread} (loss {self.loss:.3f} at D={self.tokens:g}){note}"


def data_efficiency(standard_data_law: PowerLawFit, loss: float, tokens: float) -> DataEfficiency:
    """How many times more data the standard recipe needs to reach `loss`: D(L) / D.

    `standard_data_law` is the standard recipe's best loss fitted over budgets D (same unit as `tokens`).
    """
    if not (math.isfinite(loss) and math.isfinite(tokens) and tokens > 0):
        raise FitError(f"need a finite loss and a positive budget (got loss={loss}, tokens={tokens})")
    flags = [f"data law: {f}" for f in standard_data_law.flags]
    if not standard_data_law.converged:
        flags.append("the standard recipe's data law did not fit: no efficiency")
        return DataEfficiency(tokens, loss, math.nan, math.nan, (math.nan, math.nan), tuple(flags))
    d_eq = tokens_for_loss(standard_data_law, loss)
    if math.isinf(d_eq):
        flags.append(f"loss {loss:.4g} <= the standard recipe's asymptote C = {standard_data_law.C:.4g}: "
                     "it never reaches this loss, the efficiency is unbounded")
    elif d_eq > max(standard_data_law.x):
        flags.append(f"extrapolated: D(L) = {d_eq:.3g} is {d_eq / max(standard_data_law.x):.1f}x the largest "
                     "budget the data law was fitted on")
    boot = np.array([tokens_for_loss(p, loss) / tokens for p in standard_data_law.boot_params
                     if math.isfinite(p[2])], dtype=float)
    return DataEfficiency(tokens, loss, d_eq, d_eq / tokens, _percentiles(boot), tuple(flags))
