"""Reports: Markdown tables and PNG plots of losses, fitted scaling laws, asymptotes and data efficiency.

A small library the study calls: each function turns fits (bench.science.fits) into one table or one figure.
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

from bench.science.fits import LACK_OF_FIT_ALPHA, DataEfficiency, Interval, JointLimitFit, PowerLawFit
from plumbing.artifacts import atomic_write_text, publish_file


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


def _lack_of_fit_p(fit: PowerLawFit) -> str:
    """'0.0048 (F)': the law's lack-of-fit p-value and its test; 'not testable' where there are no replicates."""
    lof = fit.lack_of_fit
    if math.isnan(lof.p):
        return "not testable"
    return f"{lof.p:.2g} ({'F' if lof.statistic_name == 'F' else 'bootstrap'})"


def fit_table(fits: Mapping[str, PowerLawFit], x_name: str = "x") -> str:
    """One row per fitted law L = A / x^B + C: parameters, C with bootstrap spread and percentile interval, the
    range of C with B fixed over B_hat x [0.5, 2], flags. A law that is not identified shows its ordering only."""
    rows = []
    for name, fit in fits.items():
        if fit.identified:
            rows.append([name, fit.A, fit.B, fit.asymptote(), fit.C_interval.text(), fit.B_band(), len(fit.x),
                         fit.bootstrap, _lack_of_fit_p(fit), _flags(fit.flags)])
        else:
            rows.append([name, "", "", fit.asymptote(), f"ordering only: {fit.ordering()}", "", len(fit.x),
                         fit.bootstrap, "", _flags(fit.flags)])
    headers = ["", "A", "B", "C ± bootstrap std", "C 95% interval", "C with B fixed (sensitivity)",
               f"points ({x_name})", "bootstrap over", f"lack of fit p (flag < {LACK_OF_FIT_ALPHA:g})", "flags"]
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
    law's fitted range or the measured budgets, no flagged law behind it) or must stay out of a headline."""
    rows = []
    for name, e in efficiencies.items():
        eff = f"{e.efficiency:.2f}x" if e.identified and not math.isnan(e.efficiency) else "n/a"
        quote = ("yes" if e.headline else "no: outside the measured budgets" if e.extrapolated and e.method == "local"
                 else "extrapolated" if e.extrapolated and e.identified else "no: law flagged" if e.law_flags else "no")
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


# ---- the study's report (bench.study writes results.json; this renders it) ------------------------------

PAPER = {  # ../shared/docs/paper-recipe.md, at 200M tokens
    "regularized": 3.43, "ensemble": 3.34, "joint": 3.17, "standard": 3.75,
    "efficiency": {"regularized": 2.29, "joint": 5.17}, "student_kept": 0.83,
}


def gain_text(g, digits: int = 4) -> str:
    """'0.1234 nats [0.0801, 0.1652]': a gain and its 95% interval over seeds (never a bare number)."""
    return f"{g.value:+.{digits}f} nats, 95% interval {g.interval.text(digits)}"


def _mean(rows: Sequence[dict]) -> float:
    return float(np.mean([r["val_loss"] for r in rows]))


def _seeds(rows: Sequence[dict]) -> str:
    return " / ".join(f"{r['val_loss']:.4f}" for r in rows)


def story_section(results: dict, a) -> list[str]:
    """The paper's story at the largest size: standard beside regularized, the ensemble, the distilled student,
    each one's gain with its interval over seeds, and whether each effect shows."""
    p = results["profile"]
    top = [q for q in p["presets"] if q in results.get("members", {})]
    if not top:
        return ["## The story\n", "Not run yet.\n"]
    n = top[-1]
    m, s = results["members"][n], results["search"][n]
    g = a.gains
    ens = [r for r in results.get("ensembles", {}).get(n, []) if r["k"] == p["k_max"]]
    rows = [["standard (wd 0.1)", f"{s['standard']['epochs']} / {s['standard']['lr']:g} / {s['standard']['wd']:g}",
             len(m["standard"]), f"{_mean(m['standard']):.4f}", _seeds(m["standard"]), "(reference)"],
            ["regularized", f"{s['regularized']['epochs']} / {s['regularized']['lr']:g} / {s['regularized']['wd']:g}",
             len(m["regularized"]), f"{_mean(m['regularized']):.4f}", _seeds(m["regularized"]),
             gain_text(g["regularization"]) + " vs standard" if "regularization" in g else "n/a"]]
    if ens:
        es = m["ensemble_setting"]
        rows.append([f"ensemble K={p['k_max']} (logit average)", f"{es['epochs']} / {es['lr']:g} / {es['wd']:g} members",
                     1, f"{ens[0]['loss']:.4f}", "", gain_text(g["ensemble"]) + " vs its members' mean"
                     if "ensemble" in g else "n/a"])
    d = results.get("distill", {})
    if d.get("ensemble"):
        rows.append([f"distilled student ({d['preset']}, w = {d['w']})",
                     f"{d['student_epochs']} real epochs / {d['student_lr']:g} / {d['student_wd']:g}",
                     len(d["ensemble"]), f"{_mean(d['ensemble']):.4f}", _seeds(d["ensemble"]),
                     gain_text(g["student"]) + f" vs its teacher's members' mean ({d['preset']})"
                     if "student" in g else "n/a"])
    if d.get("self"):
        rows.append(["self-distilled students", "one member teaches each", len(d["self"]), f"{_mean(d['self']):.4f}",
                     _seeds(d["self"]), gain_text(g["self"]) + " vs its own teacher" if "self" in g else "n/a"])
    if d.get("control"):
        rows.append(["control: student recipe, real data only", f"{d['control'][0]['epochs']} epochs, same steps",
                     len(d["control"]), f"{_mean(d['control']):.4f}", _seeds(d["control"]),
                     gain_text(g["synthetic"]) + " (control - student)" if "synthetic" in g else "n/a"])
    rows += soft_rows(d, g)
    out = [f"## The story at N = {n} ({s['params']:,} non-embedding parameters), D = {p['tokens']:,} tokens\n",
           markdown_table(["model", "epochs / lr / wd", "seeds", "loss (mean)", "each seed", "gain, 95% interval over seeds"],
                          rows),
           ("\nLoss: validation nats/token on the fixed held-out tokens. Intervals: percentile bootstrap over the "
            "seeds behind each number (members resampled and every K-subset ensemble rebuilt, bench.science.analysis; "
            "t-widened for few seeds). A gain whose interval includes 0 is not shown at this scale.\n")]
    verdicts = []
    for key, what in (("regularization", "Regularization (wd tuned above 0.1) beats the standard recipe"),
                      ("ensemble", "The ensemble beats its members"),
                      ("student", "The distilled student beats the members it was distilled from"),
                      ("self", "Self-distillation beats its teacher"),
                      ("synthetic", "Synthetic tokens beat the same steps on real data"),
                      ("soft_student", "The soft-label student beats the best single model of its size"),
                      ("soft_vs_ensemble", "The soft-label student beats the ensemble it learned from"),
                      ("soft_teacher", "The teacher's soft labels beat the same schedule on real data alone"),
                      ("soft_self", "Soft-label self-distillation beats its teacher")):
        if key in g:
            lo, hi = g[key].interval
            shown = "shown" if lo > 0 else ("NOT shown: the interval includes 0" if hi >= 0 else
                                            "CONTRADICTED: reversed, the interval excludes 0")
            verdicts.append(f"- {what}: {shown} ({gain_text(g[key])}).")
    over_best = g.get("ensemble_over_best")  # the kept share is measured from the best single model of its size
    if "kept" in g and not (over_best and over_best.value > 0 and over_best.interval.lo > 0):
        verdicts.append("- The ensemble shows no gain over the best single model of the student's size here "
                        f"({gain_text(over_best) if over_best else 'n/a'}), so there is no share of it for the "
                        "student to keep.")
    elif "kept" in g:
        verdicts.append(kept_text("student", g["kept"], "the paper: 83%"))
    if "soft_kept" in g:
        verdicts.append(kept_text("soft-label student", g["soft_kept"], "the paper's sequence-level student: 83%"))
    return out + ["\n".join(verdicts) + "\n"]


def kept_text(who: str, k, paper: str) -> str:
    lo, hi = k.interval
    return (f"- The {who} keeps {percent(k.value)} of the ensemble's gain over the best single model of its size (the "
            f"regularized recipe's seeds; 95% interval "
            f"{'n/a' if not k.interval.defined else f'{percent(lo)} to {percent(hi)}'}; {paper}"
            f"{'' if k.value <= 1 else '; above 100%: the student beats the ensemble itself'}).")


def soft_rows(d: dict, g: dict) -> list[list]:
    """The story table's soft-label rows (bench.study.soft_gains): students, self-distilled students, control."""
    r = d.get("soft_recipe")
    if not r:
        return []
    how = f"{r['epochs']} real epochs / {r['lr']:g} / {r['wd']:g}"
    rows = []
    if d.get("soft"):
        rows.append([f"soft-label student ({d['preset']}, top-{r['topk']}, blend {r['blend']:g}, w = {r['w']:g})", how,
                     len(d["soft"]), f"{_mean(d['soft']):.4f}", _seeds(d["soft"]),
                     gain_text(g["soft_student"]) + " vs the best single model of its size"
                     if "soft_student" in g else "n/a"])
    if d.get("soft-self"):
        rows.append(["soft-label self-distilled students", "one member teaches each, " + how, len(d["soft-self"]),
                     f"{_mean(d['soft-self']):.4f}", _seeds(d["soft-self"]),
                     gain_text(g["soft_self"]) + " vs its own teacher" if "soft_self" in g else "n/a"])
    if d.get("control-soft"):
        c = d["control-soft"]
        rows.append(["control: soft recipe's schedule, real data only (CE)", f"{c[0]['epochs']} epochs, same steps",
                     len(c), f"{_mean(c):.4f}", _seeds(c),
                     gain_text(g["soft_teacher"]) + " (control - soft-label student)" if "soft_teacher" in g else "n/a"])
    return rows


def baseline_sizes_text(results: dict) -> str:
    """Which sizes the standard baseline at each budget is the best of (bench.study.budget_candidates)."""
    from bench.study import budget_candidates

    per_d = [f"D={d:,}: best of {len(c.get('standard', {}))} ({', '.join(c.get('standard', {}))})"
             for d, c in budget_candidates(results).items()]
    return "The standard baseline at each budget is its best seed mean over the sizes measured there: " + "; ".join(per_d) + "."


def _law_problem(laws: Mapping[str, PowerLawFit | JointLimitFit | None]) -> str | None:
    """Why a number derived from these laws cannot be quoted ('law flagged: ... lack of fit p = ...'), or None."""
    for name, law in laws.items():
        fit = law.over_n if isinstance(law, JointLimitFit) else law
        if fit is None or not fit.identified:
            return f"{name} not identified"
        if fit.lack_of_fit.rejected:
            return f"law flagged: {name}, lack of fit p = {fit.lack_of_fit.p:.2g}"
        flags = law.flags
        if flags:
            return f"law flagged: {name}, {flags[0]}"
    return None


def _sign_verdict(interval: Interval, positive_supports: bool = True, threshold: float = 0.0) -> str:
    """supported / contradicted / cannot be resolved, from where a 95% interval lies against the threshold."""
    if not interval.defined:
        return "cannot be resolved at this scale: no interval"
    lo, hi = (interval.lo - threshold, interval.hi - threshold)
    if (lo > 0) if positive_supports else (hi < 0):
        return "supported"
    if (hi < 0) if positive_supports else (lo > 0):
        return "contradicted (the 95% interval excludes the paper's direction)"
    return f"cannot be resolved at this scale: the 95% interval includes {threshold:g}"


def _difference(a, b, digits: int = 3) -> tuple[str, Interval]:
    """C_a - C_b with the interval of paired bootstrap draws (independent cells: draw b of each)."""
    da, db = a.over_n.boot_C() if isinstance(a, JointLimitFit) else a.boot_C(), b.boot_C()
    n = min(len(da), len(db))
    interval = Interval.from_draws(da[:n] - db[:n])
    return f"{a.C - b.C:+.{digits}f} nats, 95% interval {interval.text(digits)}", interval


def _downstream_gain(results: dict) -> tuple[str, Interval] | None:
    """Mean accuracy over the tasks: the ensemble's minus the regularized single model's, +-1.96 standard errors
    (per-task errors combined as independent: the models answer the same items, so this is conservative)."""
    models = results.get("downstream", {}).get("models", {})
    ens = next((m for n, m in models.items() if n.startswith("ensemble")), None)
    reg = next((m for n, m in models.items() if n.startswith("regularized")), None)
    if not ens or not reg:
        return None
    tasks = sorted(set(ens) & set(reg))
    diff = float(np.mean([ens[t]["acc"] - reg[t]["acc"] for t in tasks]))
    se = math.sqrt(sum(ens[t]["acc_stderr"] ** 2 + reg[t]["acc_stderr"] ** 2 for t in tasks)) / len(tasks)
    interval = Interval(diff - 1.96 * se, diff + 1.96 * se, len(tasks), len(tasks))
    return f"{100 * diff:+.1f} points over {len(tasks)} tasks, 95% interval [{100 * interval.lo:+.1f}, {100 * interval.hi:+.1f}]", interval


def claims_section(results: dict, a) -> list[str]:
    """The paper's claims, one line each: its number, ours with a 95% interval, and a verdict computed from the
    analysis (supported, contradicted, or cannot be resolved at this scale, with the reason). A number derived
    from a flagged law is withheld: the verdict names the flag."""
    p, search = results["profile"], results.get("search", {})
    top = [q for q in p["presets"] if q in results.get("members", {})]
    if not top:
        return []
    rows = []
    withheld = "withheld (see the laws' table)"

    certified = [q for q in top if search[q]["standard"].get("certified") and search[q]["regularized"].get("certified")
                 and "regularization" in a.gains_per_n.get(q, {})]
    if certified:
        q = certified[-1]
        g, wd = a.gains_per_n[q]["regularization"], search[q]["regularized"]["wd"]
        verdict = _sign_verdict(g.interval) if wd > 0.1 else "contradicted: the tuned wd is not above 0.1"
        rows.append(["(a) tuned wd > 0.1 beats the standard recipe", "optima wd 0.8-3.2; 3.43 vs 3.75 (asymptote vs best)",
                     f"{q} (largest size with both optima certified): wd {wd:g}, {gain_text(g)}", verdict])
    else:
        rows.append(["(a) tuned wd > 0.1 beats the standard recipe", "optima wd 0.8-3.2", "n/a",
                     "cannot be resolved at this scale: no size has both optima certified"])

    reg = a.size_laws.get("regularized")
    ens = a.per_k.get(top[-1])
    if reg is not None and ens is not None:
        problem = _law_problem({"regularized over N": reg, f"ensemble over K at {top[-1]}": ens})
        text, interval = _difference(ens, reg) if problem is None else (withheld, None)
        rows.append(["(b) ensemble asymptote (K -> inf) below the regularized one", "3.34 vs 3.43 (-0.09)",
                     f"C_K({top[-1]}) - C_reg: {text}",
                     f"cannot be resolved at this scale: {problem}" if problem else _sign_verdict(interval, False)])
    if a.joint is not None and reg is not None and ens is not None:
        problem = _law_problem({"regularized over N": reg, f"ensemble over K at {top[-1]}": ens, "joint limit": a.joint})
        lowest = reg if reg.C <= ens.C else ens
        text, interval = _difference(a.joint, lowest) if problem is None else (withheld, None)
        rows.append(["(c) the joint limit (N, K -> inf) is the lowest", "3.17 vs 3.34 and 3.43",
                     f"C_joint - the lower of the two: {text}",
                     f"cannot be resolved at this scale: {problem}" if problem else _sign_verdict(interval, False)])

    main = f"D={p['tokens']:,}"
    local = next((e for n, e in getattr(a, "local_efficiencies", {}).items()
                  if n.startswith("regularized") and n.endswith(main)), None)
    law_reg = a.efficiencies.get("regularized, N -> inf (asymptote)")
    if law_reg is not None and law_reg.headline:
        rows.append(["(d) data efficiency > 1", "2.29x regularized (asymptote)", f"law: {law_reg.multiplier()}",
                     _sign_verdict(law_reg.interval, threshold=1.0)])
    elif local is not None and local.headline:
        why = _law_problem({"the data law": a.data_law}) or "the law-based multiplier is extrapolated"
        rows.append(["(d) data efficiency > 1", "2.29x regularized (asymptote)",
                     f"local, best regularized at {main} (between measured budgets): {local.multiplier()}; "
                     f"law-based withheld ({why})", _sign_verdict(local.interval, threshold=1.0)])
    elif a.data_law is not None:
        rows.append(["(d) data efficiency > 1", "2.29x regularized (asymptote)", "n/a",
                     "cannot be resolved at this scale: " + (_law_problem({"the data law": a.data_law})
                                                             or "no multiplier inside the measured budgets")])
    joint_eff = a.efficiencies.get("joint N, K -> inf (asymptote)")
    if joint_eff is not None and law_reg is not None:
        if joint_eff.headline and law_reg.headline:
            gap = Interval(joint_eff.interval.lo - law_reg.interval.hi, joint_eff.interval.hi - law_reg.interval.lo)
            verdict = ("supported" if gap.lo > 0 else "contradicted (the intervals are disjoint, the other way)"
                       if gap.hi < 0 else "cannot be resolved at this scale: the intervals overlap")
            ours = f"joint {joint_eff.multiplier()} vs regularized {law_reg.multiplier()}"
        else:
            problem = (_law_problem({"the data law": a.data_law, "joint limit": a.joint, "regularized over N": reg})
                       or "a multiplier lies outside the data law's fitted range")
            ours, verdict = withheld, f"cannot be resolved at this scale: {problem}"
        rows.append(["(d) joint multiplier the largest", "5.17x joint vs 2.29x regularized", ours, verdict])

    g = a.gains
    if "kept" in g:
        k, over = g["kept"], g.get("ensemble_over_best")
        ours = (f"{percent(k.value)} (95% interval {percent(k.interval.lo)} to {percent(k.interval.hi)}) of "
                f"the ensemble's gain over the best single model of its size" if k.interval.defined else percent(k.value))
        if over is None or not over.interval.lo > 0:
            verdict = ("cannot be resolved at this scale: the ensemble does not beat the best single model of the "
                       f"student's size ({gain_text(over) if over else 'n/a'})")
        else:
            verdict = _sign_verdict(k.interval, threshold=0.5)
        rows.append(["(e) the student keeps most (> 50%) of the ensemble's gain", "83%", ours, verdict])
    if "self" in g:
        rows.append(["(f) self-distillation beats its teacher", "3.43, below its teacher",
                     f"teacher - student {gain_text(g['self'])}", _sign_verdict(g["self"].interval)])
    down = _downstream_gain(results)
    if down is not None:
        text, interval = down
        rows.append(["downstream gain of the ensemble over a single model", "+3.7 points (64.4 vs 60.7, 1.4B)",
                     f"ensemble K={p['k_max']} ({top[-1]}) - regularized: {text}", _sign_verdict(interval)])
    return ["## The paper's claims at this scale\n",
            "Computed from the analysis below (bench.science.report.claims_section): the paper's number "
            "(../shared/docs/paper-recipe.md), ours with its 95% interval, and a verdict. A number that rests on a "
            f"law failing its lack-of-fit test (p < {LACK_OF_FIT_ALPHA:g}) or otherwise flagged is withheld.\n\n",
            markdown_table(["claim", "paper", "ours (95% interval)", "verdict"], rows)]


def _c_text(fit) -> str:
    """An asymptote with its 95% interval, or why there is none."""
    if fit is None or not fit.identified:
        return "not identified (ordering only)"
    if fit.flags:  # answers respect every flag: the number stays in the laws' table, beside its flags
        return f"not quoted, the law is flagged ({'; '.join(fit.flags)})"
    return f"{fit.asymptote()} (95% interval {fit.C_interval.text()})"


def answers_section(results: dict, a) -> list[str]:
    """The study's six questions, each answered with an interval or with why this scale cannot answer it."""
    p = results["profile"]
    top = [q for q in p["presets"] if q in results.get("members", {})]
    if len(top) < 2:
        return []
    qa = []
    wd = ", ".join(f"{q}: wd {results['search'][q]['regularized']['wd']:g} "
                   f"({'certified' if results['search'][q]['regularized']['certified'] else 'not certified'}), gain "
                   + (gain_text(a.gains_per_n[q]["regularization"]) if "regularization" in a.gains_per_n[q] else "n/a")
                   for q in top)
    qa.append(f"**Is the tuned weight decay above 0.1, and does it beat the standard recipe?** {wd}. "
              "(Paper: optima 0.8-3.2.)")
    seq = lambda r: " -> ".join(f"{_mean(results['members'][q][r]):.4f}" for q in top)
    qa.append(f"**Does the regularized recipe improve monotonically in N while the standard one overfits?** "
              f"Regularized seed means {seq('regularized')}; standard {seq('standard')}. Asymptotes: regularized "
              f"{_c_text(a.size_laws.get('regularized'))}; standard {_c_text(a.size_laws.get('standard'))}.")
    if a.per_k:
        qa.append(f"**Is the ensemble's asymptote (K -> inf) below the regularized one?** At {top[-1]}: "
                  f"{_c_text(a.per_k.get(top[-1]))} vs regularized N -> inf {_c_text(a.size_laws.get('regularized'))}. "
                  "(Paper: 3.34 vs 3.43.)")
    if a.joint is not None:
        qa.append(f"**Is the joint limit (N, K -> inf) the lowest?** {_c_text(a.joint.over_n)}. (Paper: 3.17.)")
    if a.efficiencies:
        head = "; ".join(f"{n}: {e.multiplier()}" for n, e in a.headline.items()) or \
            "none from the data law: every one is extrapolated or rests on an unidentified or flagged law"
        local = "; ".join(f"{n}: {e.multiplier()}" for n, e in getattr(a, "local_efficiencies", {}).items()
                          if e.headline) or "none"
        qa.append(f"**What data-efficiency multipliers result (inside the data law's range)?** {head}. Interpolated "
                  f"between measured budgets (no law): {local}. (Paper: 2.29x regularized, 5.17x joint.)")
    g = a.gains
    if "kept" in g:
        k = g["kept"]
        q = "**How much of the ensemble's gain over the best single model of its size does the student keep?**"
        text = (f"{q} {percent(k.value)} (95% interval {percent(k.interval.lo)} to {percent(k.interval.hi)})"
                if k.interval.defined else f"{q} {percent(k.value)} (no interval)")
        if "self" in g:
            text += f"; self-distillation gain over its teacher {gain_text(g['self'])}"
        if "synthetic" in g:
            text += f"; against the real-data-only control at the same steps {gain_text(g['synthetic'])}"
        qa.append(text + ". (Paper: 83% kept; the self-distilled student beats its teacher.)")
    return ["## Answers\n", "\n".join(f"{i}. {t}" for i, t in enumerate(qa, 1)) + "\n"]


def _main_table(results: dict, a, out: Path) -> list[str]:
    parts = ["## Scaling laws (bench.science.fits via bench.science.analysis)\n"]
    if len(a.size_laws.get("regularized", _NoFit()).x) < 2:
        return parts + ["One model size: no law over N at this profile.\n"]
    parts.append(fit_table({f"{r} over N": f for r, f in a.size_laws.items()}, f"N, {a.n_unit}"))
    plot_scaling({r: (list(f.x), list(f.y), f) for r, f in a.size_laws.items()}, out / "loss_vs_n.png",
                 f"non-embedding parameters N ({a.n_unit})", "standard vs regularized recipe (seed means)")
    parts.append("\n![loss vs N](loss_vs_n.png)\n")
    if a.per_k:
        parts.append("\n" + fit_table({f"ensemble over K at {n}": f for n, f in a.per_k.items()}, "K"))
        plot_scaling({n: (list(f.x), list(f.y), f) for n, f in a.per_k.items()}, out / "loss_vs_k.png",
                     "ensemble members K", "ensembles over K at each N (mean over K-subsets)")
        parts.append("\n![loss vs K](loss_vs_k.png)\n")
    if a.joint is not None:
        parts += ["\n### Joint limit (K -> inf at each N, then N -> inf)\n", joint_limit_table(a.joint, "N")]
        if a.joint.over_n is not None and a.joint.over_n.identified:
            o = a.joint.over_n
            plot_scaling({"K-limit C_N": (list(o.x), list(o.y), o)}, out / "joint_limit.png",
                         f"non-embedding parameters N ({a.n_unit})", "joint limit: K -> inf at each N, then N -> inf")
            parts.append("\n![joint limit](joint_limit.png)\n")
    return parts


class _NoFit:
    x = ()


def efficiency_section(results: dict, a, out: Path) -> list[str]:
    if a.data_law is None:
        return []
    parts = ["## Data efficiency (against the standard recipe's data law)\n", baseline_sizes_text(results) + "\n\n",
             fit_table({"standard recipe, best N at each D": a.data_law}, f"D, {a.d_unit}"), "\n",
             efficiency_table(a.efficiencies)]
    paper = "Paper: " + ", ".join(f"{v:.2f}x {k}" for k, v in PAPER["efficiency"].items()) + "."
    if a.headline:
        parts.append("\nHeadline (identified law, inside its fitted range): " + "; ".join(
            f"{name}: {e.multiplier()}" for name, e in a.headline.items()) + f" (none rests on a flagged law). {paper}\n")
    else:
        parts.append("\nNo law-based multiplier can be quoted as a headline: every one is extrapolated or rests on a "
                     f"law that is not identified or is flagged ({_law_problem({'the data law': a.data_law}) or 'see the flags'}).\n")
    local = getattr(a, "local_efficiencies", {})
    if local:
        quoted = "; ".join(f"{n}: {e.multiplier()}" for n, e in local.items() if e.headline) or "none"
        parts += ["\n### Local multipliers: equal-loss D between measured budgets (no law)\n",
                  "The standard recipe's seed-mean loss at the two measured budgets that bracket L, log D read linearly "
                  "in loss between them (bench.science.analysis.equal_loss_tokens); outside the measured losses nothing is quoted. "
                  "The interval pairs resampled baseline seeds with the loss's own draws.\n\n",
                  efficiency_table(local), f"\nLocal multipliers inside the measured budgets: {quoted}. {paper}\n"]
    plot_data_efficiency(a.data_law, {n: e for n, e in a.efficiencies.items() if math.isfinite(e.loss)},
                         out / "data_efficiency.png", xlabel=f"training tokens D ({a.d_unit})")
    return parts + ["\n![data efficiency](data_efficiency.png)\n"]


def search_section(results: dict) -> list[str]:
    p = results["profile"]
    rows = []
    for n in [q for q in p["presets"] if q in results.get("search", {})]:
        for r in ("standard", "regularized"):
            o = results["search"][n][r]
            rows.append([n, r, o["epochs"], f"{o['lr']:g}", f"{o['wd']:g}", o["reason"], len(o["runs"])])
    if not rows:
        return []
    how = ("coordinate descent (train.search): certified only when all one-step neighbours ran and are worse; an "
           "optimum on a grid edge extends the grid" if p["search"] else "not searched: the profile fixes them")
    return ["## Recipe settings\n", f"How: {how}.\n\n",
            markdown_table(["N", "recipe", "epochs", "lr", "wd", "status", "runs"], rows)]


def distill_section(results: dict) -> list[str]:
    d = results.get("distill")
    kinds = ("ensemble", "self", "soft", "soft-self")
    if not d or not any(d.get(k) for k in kinds):
        return []
    rows = [[recipe, r["seed"], r["teacher_members"], r["synthetic_generated"], f"{r['synthetic_passes']:.2f}",
             r["steps"], f"{r['val_loss']:.4f}"] for recipe in kinds for r in d.get(recipe, [])]
    soft = d.get("soft_recipe")
    how = [] if not soft else [
        f"Soft-label students (distill --blend): loss = {1 - soft['blend']:g} x CE + {soft['blend']:g} x KL(teacher "
        f"top-{soft['topk']} + tail || student) on real rows (the teacher's annotations of the training windows, "
        "synthdata annotate)" + (f" and synthetic rows (synthdata generate --topk), synthetic share w = {soft['w']:g} "
                                 f"(synthetic budget by the same rule: {soft['synthetic_tokens']:,} tokens)"
                                 if soft["w"] else ", no synthetic rows (w = 0)") +
        f"; {soft['epochs']} real epochs, lr {soft['lr']:g}, wd {soft['wd']:g}.\n\n"]
    return ["## Distillation (synthdata + distill)\n",
            f"Synthetic budget rule: {d['synthetic_tokens_rule']}.\n\n", *how,
            markdown_table(["recipe", "student seed", "teacher members", "synthetic tokens", "passes over them",
                            "steps", "val loss"], rows)]


def downstream_section(results: dict) -> list[str]:
    down = results.get("downstream", {})
    if "models" not in down:
        return [f"## Downstream\n\nSkipped: {results['downstream_skipped']}.\n"] if "downstream_skipped" in results else []
    tasks = sorted({t for r in down["models"].values() for t in r})
    rows = [[name, *[f"{r[t]['acc']:.3f} ± {r[t]['acc_stderr']:.3f}" if t in r else "" for t in tasks]]
            for name, r in down["models"].items()]
    return ["## Downstream (zero-shot accuracy ± standard error)\n", markdown_table(["model", *tasks], rows),
            "\nChance: 0.25 on 4-way tasks (the held-out next-word task, ARC, OpenBookQA), 0.5 on PIQA and COPA.\n"]


def serve_section(results: dict) -> list[str]:
    e = results.get("serve")
    if not e:
        return []
    return ["## Serving\n", (f"Ray Serve endpoint {e['url']} served {e['models']} ({e['ensemble_dir']}): completion "
                             f"{e['completion'][:50]!r}, {e['stream_chunks']} streamed chunks, "
                             f"{e['prompt_tokens_scored']} prompt tokens scored (echo + logprobs); then stopped.\n")]


PAPER_SCALE = "150M-1.4B parameters on 200M tokens"


def fitted_laws(a) -> dict[str, PowerLawFit]:
    """Every law the analysis fitted, by the name the report gives it."""
    laws = {**{f"{r} over N": f for r, f in a.size_laws.items()},
            **{f"ensemble over K at {n}": f for n, f in a.per_k.items()}}
    if a.joint is not None and a.joint.over_n is not None:
        laws["joint limit over N"] = a.joint.over_n
    if a.data_law is not None:
        laws["the standard recipe's data law"] = a.data_law
    return laws


def gate_section(results: dict) -> list[str]:
    """The gate's verdict (bench.study.gate_verdict), said plainly before any number the study measured."""
    g = results.get("gate")
    if not g:
        return []
    lines = [f"- {c['name']}: **{'passed' if c['passed'] else 'FAILED'}** ({c['detail']})" for c in g["checks"]]
    verdict = ("The regime shows the effects the study measures." if g["passed"] else
               "**This regime cannot show the effects the study measures**: the numbers below (if any) come from a "
               "study run past a failed gate, and a claim they do not support is no evidence against the paper.")
    return ["## Gate\n", f"One seed per run at D = {g['tokens']:,} tokens, regularized recipe (epochs, lr, wd) = "
            f"{tuple(g['recipe'])} at {g['small']} and {g['large']}, the standard recipe (wd 0.1) at {g['large']}.\n",
            "\n".join(lines) + "\n", verdict + "\n"]


def calibration_section(results: dict, a) -> list[str]:
    """The calibration arm: every fitted asymptote beside the source's Bayes floor (bench.science.calibration)."""
    from bench.science.calibration import floor_rows

    c = results.get("calibration")
    if not c:
        return []
    rows = floor_rows(fitted_laws(a), c["floor"])
    below = [r[0] for r in rows if r[-1].startswith("**below")]
    text = [f"The corpus is generated by an order-2 Markov source (bench/science/calibration.py) whose best possible loss on "
            f"these {c['targets']:,} validation targets is known: **{c['floor']:.4f} nats/token** (entropy rate "
            f"{c['entropy_rate']:.4f} per symbol, {c['order1_entropy']:.4f} from one symbol back, "
            f"{c['unigram_entropy']:.4f} unigram; the source itself scores {c['oracle_loss']:.4f} on these targets). "
            "No model reaches below it at any N or D, so a fitted limit C below it is an extrapolation artifact."]
    if rows:
        text.append(markdown_table(["law", "C", "95% interval", "C - floor", "verdict"], rows))
    text.append(f"**Fitted limits below the floor (artifacts, flagged and kept out of the headline): "
                f"{', '.join(below)}.**" if below else "No fitted limit lies below the floor.")
    return ["## Calibration: fitted limits against the Bayes floor\n", "\n\n".join(text) + "\n"]


def limits_section(results: dict, a) -> list[str]:
    """What this study's scale cannot answer, collected from the analysis rather than written by hand: optima the
    search could not certify, laws not identified or flagged, multipliers read outside the data law's range,
    and effects whose interval includes 0. A reader sees every caveat in one place, not only beside each number."""
    p, search = results["profile"], results.get("search", {})
    if not search:
        return []
    params = [s["params"] for s in search.values()]
    lines = [f"- Scale: {min(params):,}-{max(params):,} non-embedding parameters on {p['tokens']:,} tokens "
             f"(the paper: {PAPER_SCALE}). The orderings are the findings that may carry over; the sizes of "
             "asymptotes and multipliers at this scale are not the paper's numbers."]

    def why(reason: str) -> str:
        return reason.removeprefix("not certified: ")  # the line's heading says it already

    uncertified = [f"{n} {r} ({why(o['reason'])})" for n, s in search.items() for r in ("standard", "regularized")
                   if (o := s[r]) and not o.get("certified")]
    for preset, per_d in results.get("budgets", {}).items():
        uncertified += [f"{preset} {r} at D={int(d):,} ({why(row[r]['reason'])})" for d, row in per_d.items()
                        for r in ("standard", "regularized") if "certified" in row[r] and not row[r]["certified"]]
    if uncertified:
        lines.append("- Optima not certified (a better setting may lie beyond them): " + "; ".join(uncertified) + ".")
    laws = fitted_laws(a)
    unidentified = [n for n, f in laws.items() if not f.identified]
    flagged = [f"{n} ({'; '.join(f.flags)})" for n, f in laws.items() if f.identified and f.flags]
    if unidentified:
        lines.append("- Laws not identified (no more points than parameters): ordering only for "
                     + ", ".join(unidentified) + ".")
    if flagged:
        lines.append("- Laws fitted but flagged, so their asymptotes are rough: " + "; ".join(flagged) + ".")
    outside = [f"{n}: {e.multiplier()}" for n, e in a.efficiencies.items() if not e.headline]
    if outside:
        lines.append("- Multipliers kept out of the headline (extrapolated past the budgets the data law was fitted "
                     "on, no identified law, or a flagged law behind them): " + "; ".join(outside) + ".")
    effects = {name: g for name, g in a.gains.items() if name != "kept" and g.interval.defined}
    unresolved = [name for name, g in effects.items() if g.interval.lo <= 0 <= g.interval.hi]
    contradicted = [name for name, g in effects.items() if g.interval.hi < 0]
    if unresolved:
        lines.append("- Effects this study cannot resolve (95% interval includes 0): " + ", ".join(unresolved) + ".")
    if contradicted:
        lines.append("- Effects contradicted here (reversed, the 95% interval excludes 0): "
                     + ", ".join(contradicted) + ".")
    return ["## What this scale cannot answer\n", "\n".join(lines) + "\n"]


def dataset_text(ds: dict) -> str:
    """How the budgets and the validation set were drawn (train.data: whole documents, or shuffled chunks)."""
    if ds.get("chunk_tokens"):
        return (f"- Budgets: nested prefixes of one stream of {ds['chunk_tokens']}-token chunks of the training "
                f"documents, shuffled across documents (seeded); validation: one {ds['chunk_tokens']}-token chunk from "
                f"each of {ds.get('val_documents', 0):,} held-out documents\n")
    if "val_documents" in ds:
        return (f"- Budgets: nested prefixes of the training documents in hash order (whole documents); validation: "
                f"{ds['val_documents']:,} held-out documents\n")
    return ""


def render_report(results: dict, a, out: Path, phases: Sequence[str]) -> str:
    """REPORT.md's text from results.json's content and its analysis (bench.study.analyze); writes the plots."""
    p = results["profile"]
    done = results.get("phases_done", [])
    status = "complete" if all(ph in done for ph in phases) else (
        f"**PARTIAL**: phases done {', '.join(done) or 'none'}; still to run "
        f"{', '.join(ph for ph in phases if ph not in done)}")
    ds = results.get("dataset", {})
    parts = [f"# Chorus: profile `{p['name']}`\n", f"{p['description']}\n",
             (f"- Status: {status}\n- Command: `{results.get('command', '')}` (the same command continues a killed run)\n"
             f"- Corpus: {', '.join(ds.get('corpus', []))}; {ds.get('train_tokens', 0):,} training tokens available, "
             f"{ds.get('val_tokens', 0):,} fixed validation tokens, vocabulary {ds.get('vocab_size', p['vocab_size'])}; "
             f"context {p['context']}, batch {p['batch_size']}\n{dataset_text(ds)}")]
    parts += gate_section(results)
    parts += calibration_section(results, a)
    parts += claims_section(results, a)
    parts += answers_section(results, a)
    parts += story_section(results, a)
    parts += limits_section(results, a)
    parts += search_section(results)
    parts += _main_table(results, a, out)
    parts += efficiency_section(results, a, out)
    parts += distill_section(results)
    parts += downstream_section(results)
    parts += serve_section(results)
    secs = results.get("seconds", {})
    if secs:
        parts += ["## Time\n", " | ".join(f"{k} {v:.0f} s" for k, v in secs.items())
                  + f" | total {sum(secs.values()):.0f} s\n"]
    return "\n".join(parts)


