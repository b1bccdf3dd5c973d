"""Reports: Markdown tables and PNG plots of losses, fitted scaling laws, asymptotes and data efficiency.

A small library the study calls: each function turns fits (bench.fits) into one table or one figure.
Every number an asymptote table prints carries its bootstrap uncertainty and its flags, so a fit
that should not be trusted cannot be read without its warning.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: reports are written on headless machines
import matplotlib.pyplot as plt
import numpy as np

from bench.fits import DataEfficiency, JointLimitFit, PowerLawFit
from train.artifacts import atomic_write_text, publish_file


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.4g}")
    return str(value).replace("|", "\\|").replace("\n", " ")


def percent(fraction: float) -> str:
    """A fraction as a whole percentage; a value that rounds to zero reads "0%", never "-0%"."""
    return f"{round(fraction, 2) + 0.0:.0%}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub Markdown table; floats to 4 significant digits, NaN as n/a."""
    lines = ["| " + " | ".join(map(_cell, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _flags(flags: Sequence[str]) -> str:
    return "; ".join(flags) if flags else "ok"


def fit_table(fits: Mapping[str, PowerLawFit], x_name: str = "x") -> str:
    """One row per fitted law L = A / x^B + C: parameters, C with bootstrap spread and percentile interval, the
    range of C with B fixed over B_hat x [0.5, 2], flags. A law that is not identified shows its ordering only."""
    rows = []
    for name, fit in fits.items():
        if fit.identified:
            rows.append([name, fit.A, fit.B, fit.asymptote(), fit.C_interval.text(), fit.B_band(), len(fit.x),
                         fit.bootstrap, _flags(fit.flags)])
        else:
            rows.append([name, "", "", fit.asymptote(), f"ordering only: {fit.ordering()}", "", len(fit.x),
                         fit.bootstrap, _flags(fit.flags)])
    headers = ["", "A", "B", "C ± bootstrap std", "C 95% interval", "C with B fixed (sensitivity)",
               f"points ({x_name})", "bootstrap over", "flags"]
    return markdown_table(headers, rows)


def joint_limit_table(joint: JointLimitFit, n_name: str = "N") -> str:
    """The K-limit at each N, then the joint asymptote (the string the joint-limit plot's legend prints)."""
    rows = [[f"{n_name}={n:g}, K -> inf", fit.asymptote(), fit.C_interval.text() if fit.identified else "",
             _flags(fit.flags)] for n, fit in joint.per_n.items()]
    rows.append([f"joint ({n_name}, K -> inf)", joint.asymptote(), joint.C_interval.text() if joint.identified else "",
                 _flags(joint.over_n.flags if joint.over_n else ["no fit"])])
    return markdown_table(["limit", "C ± bootstrap std", "C 95% interval", "flags"], rows)


def efficiency_table(efficiencies: Mapping[str, DataEfficiency]) -> str:
    """Multipliers with their percentile intervals; 'quote' says whether one may be quoted (inside the data
    law's fitted range, law identified) or must stay out of a headline."""
    rows = []
    for name, e in efficiencies.items():
        eff = f"{e.efficiency:.2f}x" if e.identified and not math.isnan(e.efficiency) else "n/a"
        quote = "yes" if e.headline else ("extrapolated" if e.extrapolated and e.identified else "no")
        rows.append([name, e.tokens, e.loss, e.equivalent_tokens, eff, e.interval.text(2) if e.identified else "n/a",
                     quote, _flags(e.flags)])
    headers = ["recipe", "tokens D", "loss L", "standard recipe's D(L)", "efficiency D(L)/D", "95% interval",
               "quote", "flags"]
    return markdown_table(headers, rows)


def write_text(path: str | Path, text: str) -> Path:
    """Write a report file whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    publish_file(tmp, path)
    return path


def plot_scaling(series: Mapping[str, tuple[Sequence[float], Sequence[float], PowerLawFit | None]],
                 path: str | Path, xlabel: str, title: str, ylabel: str = "validation loss (nats/token)") -> Path:
    """Loss against x per series (a recipe over N, or an N over K): points, fitted curve, asymptote.

    Each series is (x, loss, fit): every seed's point is drawn; the fit as a line, extended 4x past
    the data toward its limit, and its asymptote C as a dashed line labelled with its uncertainty.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (name, (x, y, fit)) in enumerate(series.items()):
        color = f"C{i}"
        ax.scatter(x, y, color=color, s=18, zorder=3, label=name)
        if fit is not None and fit.identified:
            grid = np.geomspace(min(fit.x), 4 * max(fit.x), 200)
            ax.plot(grid, fit.predict(grid), color=color, lw=1.4)
            flag = " (flagged)" if fit.flags else ""
            ax.axhline(fit.C, color=color, ls="--", lw=0.9, label=f"{name}: C = {fit.asymptote()}{flag}")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_data_efficiency(data_law: PowerLawFit, efficiencies: Mapping[str, DataEfficiency], path: str | Path,
                         xlabel: str = "training tokens D") -> Path:
    """The standard recipe's data law L(D) and, per recipe, how far right on it the recipe's loss lies."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter(data_law.x, data_law.y, color="k", s=18, zorder=3, label="standard recipe (best over N)")
    top = max([*data_law.x, *(e.equivalent_tokens for e in efficiencies.values() if math.isfinite(e.equivalent_tokens))])
    if data_law.identified:
        grid = np.geomspace(min(data_law.x), 1.5 * top, 200)
        ax.plot(grid, data_law.predict(grid), color="k", lw=1.2, label=f"L(D), C = {data_law.asymptote()}")
        ax.axhline(data_law.C, color="k", ls="--", lw=0.8)
    for i, (name, e) in enumerate(efficiencies.items()):
        color = f"C{i}"
        ax.scatter([e.tokens], [e.loss], color=color, marker="s", s=30, zorder=4, label=f"{name}: {e.multiplier()}")
        if math.isfinite(e.equivalent_tokens):
            ax.annotate("", xy=(e.equivalent_tokens, e.loss), xytext=(e.tokens, e.loss),
                        arrowprops={"arrowstyle": "->", "color": color})
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("data efficiency: standard-recipe tokens needed for the same loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)
