"""Reports: Markdown tables and PNG plots of losses, fitted scaling laws, asymptotes and data efficiency.

A small library the studies call: each function turns fits (bench.science.fits) into one table or one figure, and
render_report lays out the study's REPORT.md from them and from the verdicts (bench.science.verdicts: what the
numbers say, in words). Every number an asymptote table prints carries its bootstrap uncertainty and its flags, so
a fit that should not be trusted cannot be read without its warning.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: reports are written on headless machines
import matplotlib.pyplot as plt
import numpy as np

from bench.science.calibration import floor_rows
from bench.science.fits import LACK_OF_FIT_ALPHA, DataEfficiency, JointLimitFit, PowerLawFit
from bench.science.verdicts import (
    answers_section,
    claim_rows,
    fitted_laws,
    gain_text,
    gate_section,
    joint_verdicts,
    law_problem,
    mean_loss,
    scale_limits,
    seed_losses,
    story_verdicts,
)
from bench.study.profile import recorded_profile
from plumbing.artifacts import atomic_write_text, publish_file


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.4g}")
    return str(value).replace("|", "\\|").replace("\n", " ")


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

def _setting(o: dict) -> str:
    return f"{o['epochs']} / {o['lr']:g} / {o['wd']:g}"


def _seed_row(model: str, how: str, runs: Sequence[dict], gain, against: str) -> list:
    """A story row: the runs' mean loss, each seed's, and their gain with its 95% interval ('n/a' where none)."""
    return [model, how, len(runs), f"{mean_loss(runs):.4f}", seed_losses(runs),
            gain_text(gain) + against if gain is not None else "n/a"]


def story_section(results: dict, a) -> list[str]:
    """The paper's story at the largest size: standard beside regularized, the ensemble, the distilled student,
    each one's gain with its interval over seeds, and whether each effect shows (bench.science.verdicts)."""
    p = recorded_profile(results)
    top = [q for q in p.runs.presets if q in results.get("members", {})]
    if not top:
        return ["## The story\n", "Not run yet.\n"]
    n = top[-1]
    m, s = results["members"][n], results["search"][n]
    g = a.gains
    ens = [r for r in results.get("ensembles", {}).get(n, []) if r["k"] == p.members.k_max]
    rows = [["standard (wd 0.1)", _setting(s["standard"]), len(m["standard"]), f"{mean_loss(m['standard']):.4f}",
             seed_losses(m["standard"]), "(reference)"],
            _seed_row("regularized", _setting(s["regularized"]), m["regularized"], g.get("regularization"),
                      " vs standard")]
    if ens:
        rows.append([f"ensemble K={p.members.k_max} (logit average)", _setting(m["ensemble_setting"]) + " members",
                     1, f"{ens[0]['loss']:.4f}", "", gain_text(g["ensemble"]) + " vs its members' mean"
                     if "ensemble" in g else "n/a"])
    d = results.get("distill", {})
    if d.get("ensemble"):
        rows.append(_seed_row(f"distilled student ({d['preset']}, w = {d['w']})",
                              f"{d['student_epochs']} real epochs / {d['student_lr']:g} / {d['student_wd']:g}",
                              d["ensemble"], g.get("student"), f" vs its teacher's members' mean ({d['preset']})"))
    if d.get("self"):
        rows.append(_seed_row("self-distilled students", "one member teaches each", d["self"], g.get("self"),
                              " vs its own teacher"))
    if d.get("control"):
        rows.append(_seed_row("control: student recipe, real data only", f"{d['control'][0]['epochs']} epochs, same steps",
                              d["control"], g.get("synthetic"), " (control - student)"))
    rows += soft_rows(d, g)
    out = [f"## The story at N = {n} ({s['params']:,} non-embedding parameters), D = {p.runs.tokens:,} tokens\n",
           markdown_table(["model", "epochs / lr / wd", "seeds", "loss (mean)", "each seed", "gain, 95% interval over seeds"],
                          rows),
           ("\nLoss: validation nats/token on the fixed held-out tokens. Intervals: percentile bootstrap over the "
            "seeds behind each number (members resampled and every K-subset ensemble rebuilt, bench.science.analysis; "
            "t-widened for few seeds). A gain whose interval includes 0 is not shown at this scale.\n")]
    return out + ["\n".join(story_verdicts(g)) + "\n"]


def soft_rows(d: dict, g: dict) -> list[list]:
    """The story table's soft-label rows (bench.study.analysis.soft_gains): students, self-distilled students,
    control."""
    r = d.get("soft_recipe")
    if not r:
        return []
    how = f"{r['epochs']} real epochs / {r['lr']:g} / {r['wd']:g}"
    rows = []
    if d.get("soft"):
        rows.append(_seed_row(f"soft-label student ({d['preset']}, top-{r['topk']}, blend {r['blend']:g}, w = {r['w']:g})",
                              how, d["soft"], g.get("soft_student"), " vs the best single model of its size"))
    if d.get("soft-self"):
        rows.append(_seed_row("soft-label self-distilled students", "one member teaches each, " + how, d["soft-self"],
                              g.get("soft_self"), " vs its own teacher"))
    if d.get("control-soft"):
        c = d["control-soft"]
        rows.append(_seed_row("control: soft recipe's schedule, real data only (CE)", f"{c[0]['epochs']} epochs, same steps",
                              c, g.get("soft_teacher"), " (control - soft-label student)"))
    return rows


def claims_section(results: dict, a) -> list[str]:
    """The paper's claims, one line each: its number, ours with a 95% interval, and a verdict computed from the
    analysis (bench.science.verdicts.claim_rows). A number derived from a flagged law is withheld: the verdict
    names the flag."""
    rows = claim_rows(results, a)
    if not rows:
        return []
    return ["## The paper's claims at this scale\n",
            "Computed from the analysis below (bench.science.report.claims_section): the paper's number "
            "(../shared/docs/paper-recipe.md), ours with its 95% interval, and a verdict. A number that rests on a "
            f"law failing its lack-of-fit test (p < {LACK_OF_FIT_ALPHA:g}) or otherwise flagged is withheld.\n\n",
            markdown_table(["claim", "paper", "ours (95% interval)", "verdict"], rows)]


def limits_section(results: dict, a) -> list[str]:
    """What this scale cannot answer (bench.science.verdicts.scale_limits): a reader sees every caveat in one place,
    not only beside each number."""
    lines = scale_limits(results, a)
    return ["## What this scale cannot answer\n", "\n".join(lines) + "\n"] if lines else []


def baseline_sizes_text(results: dict) -> str:
    """Which sizes the standard baseline at each budget is the best of (bench.study.analysis.budget_candidates)."""
    from bench.study.analysis import budget_candidates

    per_d = [f"D={d:,}: best of {len(c.get('standard', {}))} ({', '.join(c.get('standard', {}))})"
             for d, c in budget_candidates(results).items()]
    return "The standard baseline at each budget is its best seed mean over the sizes measured there: " + "; ".join(per_d) + "."


def _main_table(results: dict, a, out: Path) -> list[str]:
    parts = ["## Scaling laws (bench.science.fits via bench.science.analysis)\n"]
    if "regularized" not in a.size_laws or len(a.size_laws["regularized"].x) < 2:
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


PAPER_EFFICIENCY = {"regularized": 2.29, "joint": 5.17}  # ../shared/docs/paper-recipe.md, at 200M tokens


def efficiency_section(results: dict, a, out: Path) -> list[str]:
    if a.data_law is None:
        return []
    parts = ["## Data efficiency (against the standard recipe's data law)\n", baseline_sizes_text(results) + "\n\n",
             fit_table({"standard recipe, best N at each D": a.data_law}, f"D, {a.d_unit}"), "\n",
             efficiency_table(a.efficiencies)]
    paper = "Paper: " + ", ".join(f"{v:.2f}x {k}" for k, v in PAPER_EFFICIENCY.items()) + "."
    if a.headline:
        parts.append("\nHeadline (identified law, inside its fitted range): " + "; ".join(
            f"{name}: {e.multiplier()}" for name, e in a.headline.items()) + f" (none rests on a flagged law). {paper}\n")
    else:
        parts.append("\nNo law-based multiplier can be quoted as a headline: every one is extrapolated or rests on a "
                     f"law that is not identified or is flagged ({law_problem({'the data law': a.data_law}) or 'see the flags'}).\n")
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
    p = recorded_profile(results)
    rows = []
    for n in [q for q in p.runs.presets if q in results.get("search", {})]:
        for r in ("standard", "regularized"):
            o = results["search"][n][r]
            rows.append([n, r, o["epochs"], f"{o['lr']:g}", f"{o['wd']:g}", o["reason"], len(o["runs"])])
    if not rows:
        return []
    how = ("coordinate descent (train.search): certified only when all one-step neighbours ran and are worse; an "
           "optimum on a grid edge extends the grid" if p.recipes.search else "not searched: the profile fixes them")
    return ["## Recipe settings\n", f"How: {how}.\n\n",
            markdown_table(["N", "recipe", "epochs", "lr", "wd", "status", "runs"], rows)]


def joint_section(results: dict, a) -> list[str]:
    """The joint phase: at each size it measured, the joint recipe's members and K=k_max ensemble beside the
    optimum's, the differences with their member-seed intervals, and both laws over K."""
    joint = results.get("joint", {})
    if not joint:
        return []
    p = recorded_profile(results)
    k, rows, laws = p.members.k_max, [], {}
    for n, j in joint.items():
        opt = results["members"][n]["ensemble"]
        ens = {"optimum": [r for r in results["ensembles"].get(n, []) if r["k"] == k],
               "joint": [r for r in j["ensembles"] if r["k"] == k]}
        g = a.joint_gains.get(n, {})
        for who, setting, members in (("optimum", results["members"][n]["ensemble_setting"], opt),
                                      ("joint", j["setting"], j["members"])):
            rows.append([n, who, _setting(setting), f"{mean_loss(members):.4f}", seed_losses(members),
                         f"{ens[who][0]['loss']:.4f}" if ens[who] else "n/a"])
        rows.append([n, "optimum - joint", "", gain_text(g["member"]) if "member" in g else "n/a", "",
                     gain_text(g["ensemble"]) if "ensemble" in g else "n/a"])
        laws.update({f"optimum members over K at {n}": a.per_k[n]} if n in a.per_k else {})
        laws[f"joint-recipe members over K at {n}"] = a.per_k_joint[n]
    return ["## Members trained for the ensemble (the joint recipe)\n",
            f"The joint recipe's members (2x the regularized optimum's epochs, 0.5x its wd, same lr; "
            f"{k} seeds) beside the optimum's members at the same size: alone they are expected to be worse (overfit "
            f"by design), as an ensemble better (the paper at 300M: K -> inf 3.27 vs 3.34). Differences: optimum - "
            f"joint, with the member-seed bootstrap interval.\n\n",
            markdown_table(["N", "members", "epochs / lr / wd", "members' mean loss", "each seed",
                            f"K={k} ensemble loss"], rows),
            "\n" + fit_table(laws, "K"), "\n".join(joint_verdicts(a)) + "\n"]


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


def calibration_section(results: dict, a) -> list[str]:
    """The calibration arm: every fitted asymptote beside the source's Bayes floor (bench.science.calibration)."""
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
    """REPORT.md's text from results.json's content and its analysis (bench.study.analysis.analyze); writes the plots."""
    p = recorded_profile(results)
    done = results.get("phases_done", [])
    # the gate and the joint phase are phases only where the profile asks for them (a study begun before they
    # existed never ran them)
    phases = [ph for ph in phases if (ph != "gate" or p.gate.gate_epochs) and (ph != "joint" or p.joint.joint_presets)]
    status = "complete" if all(ph in done for ph in phases) else (
        f"**PARTIAL**: phases done {', '.join(done) or 'none'}; still to run "
        f"{', '.join(ph for ph in phases if ph not in done)}")
    ds = results.get("dataset", {})
    parts = [f"# Chorus: profile `{p.name}`\n", f"{p.description}\n",
             (f"- Status: {status}\n- Command: `{results.get('command', '')}` (the same command continues a killed run)\n"
             f"- Corpus: {', '.join(ds.get('corpus', []))}; {ds.get('train_tokens', 0):,} training tokens available, "
             f"{ds.get('val_tokens', 0):,} fixed validation tokens, vocabulary {ds.get('vocab_size', p.data.vocab_size)}; "
             f"context {p.runs.context}, batch {p.runs.batch_size}\n{dataset_text(ds)}")]
    parts += gate_section(results)
    parts += calibration_section(results, a)
    parts += claims_section(results, a)
    parts += answers_section(results, a)
    parts += story_section(results, a)
    parts += limits_section(results, a)
    parts += search_section(results)
    parts += _main_table(results, a, out)
    parts += joint_section(results, a)
    parts += efficiency_section(results, a, out)
    parts += distill_section(results)
    parts += downstream_section(results)
    parts += serve_section(results)
    secs = results.get("seconds", {})
    if secs:
        parts += ["## Time\n", "Wall time of the invocation that finished each phase (a phase killed and resumed counts "
                  "only its last part).\n", " | ".join(f"{k} {v:.0f} s" for k, v in secs.items())
                  + f" | total {sum(secs.values()):.0f} s\n"]
    return "\n".join(parts)
