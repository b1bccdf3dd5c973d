"""What the study's numbers say, in words: the verdicts bench.science.report lays out in REPORT.md.

The paper's claims judged against the analysis (supported, contradicted, or cannot be resolved at this scale, with
the reason), the story's effects, what this scale cannot answer, the study's questions answered and the gate's
verdict; and the wording they share: a gain with its interval, a share kept, an asymptote or why none is quoted.
Everything here is computed from results.json's content and its analysis (bench.study.analysis.analyze); the
tables and plots are bench.science.report's.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from bench.science.fits import Interval, JointLimitFit, PowerLawFit
from bench.study.profile import recorded_profile

PAPER_SCALE = "150M-1.4B parameters on 200M tokens"  # ../shared/docs/paper-recipe.md


def percent(fraction: float) -> str:
    """A fraction as a whole percentage; a value that rounds to zero reads "0%", never "-0%"."""
    return f"{round(fraction, 2) + 0.0:.0%}"


def gain_text(g, digits: int = 4) -> str:
    """'0.1234 nats [0.0801, 0.1652]': a gain and its 95% interval over seeds (never a bare number)."""
    return f"{g.value:+.{digits}f} nats, 95% interval {g.interval.text(digits)}"


def mean_loss(rows: Sequence[dict]) -> float:
    return float(np.mean([r["val_loss"] for r in rows]))


def seed_losses(rows: Sequence[dict]) -> str:
    return " / ".join(f"{r['val_loss']:.4f}" for r in rows)


def kept_text(who: str, k, paper: str) -> str:
    lo, hi = k.interval
    return (f"- The {who} keeps {percent(k.value)} of the ensemble's gain over the best single model of its size (the "
            f"regularized recipe's seeds; 95% interval "
            f"{'n/a' if not k.interval.defined else f'{percent(lo)} to {percent(hi)}'}; {paper}"
            f"{'' if k.value <= 1 else '; above 100%: the student beats the ensemble itself'}).")


def fitted_laws(a) -> dict[str, PowerLawFit]:
    """Every law the analysis fitted, by the name the report gives it."""
    laws = {**{f"{r} over N": f for r, f in a.size_laws.items()},
            **{f"ensemble over K at {n}": f for n, f in a.per_k.items()},
            **{f"joint-recipe ensemble over K at {n}": f for n, f in getattr(a, "per_k_joint", {}).items()}}
    if a.joint is not None and a.joint.over_n is not None:
        laws["joint limit over N"] = a.joint.over_n
    if a.data_law is not None:
        laws["the standard recipe's data law"] = a.data_law
    return laws


def law_problem(laws: Mapping[str, PowerLawFit | JointLimitFit | None]) -> str | None:
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


def _claim_a(search: dict, a, top: Sequence[str]) -> list:
    """Claim (a) at the largest size whose standard optimum is certified: the baseline must be the best the search
    can find. Where the regularized optimum is certified too the gain is the difference of two optima; where it is
    not, a better regularized setting could only widen the gain, so a gain whose interval excludes 0 is a lower
    bound and supports the claim, and any other cannot decide it."""
    claim, paper = "(a) tuned wd > 0.1 beats the standard recipe", "optima wd 0.8-3.2; 3.43 vs 3.75 (asymptote vs best)"
    measured = [q for q in top if search[q]["standard"].get("certified") and "regularization" in a.gains_per_n.get(q, {})]
    if not measured:
        return [claim, "optima wd 0.8-3.2", "n/a", "cannot be resolved at this scale: no size has a measured gain over a "
                                                   "certified standard optimum (a better baseline may lie beyond the "
                                                   "search)"]
    both = [q for q in measured if search[q]["regularized"].get("certified")]
    q = (both or measured)[-1]
    g, wd = a.gains_per_n[q]["regularization"], search[q]["regularized"]["wd"]
    if wd <= 0.1:
        return [claim, paper, f"{q}: wd {wd:g}, {gain_text(g)}", "contradicted: the tuned wd is not above 0.1"]
    if both:
        return [claim, paper, f"{q} (largest size with both optima certified): wd {wd:g}, {gain_text(g)}",
                _sign_verdict(g.interval)]
    ours = f"{q} (largest size with a certified standard optimum; the regularized one not certified): wd {wd:g}, {gain_text(g)}"
    if g.interval.defined and g.interval.lo > 0:
        return [claim, paper, ours, "supported (a lower bound: a better regularized setting could only widen the gain)"]
    return [claim, paper, ours, "cannot be resolved at this scale: the regularized optimum is not certified and the "
                                "gain's interval does not exclude 0"]


def _claim_joint_members(a) -> list | None:
    """Members at the joint recipe make a better ensemble than the optimum's members, at the largest size the joint
    phase measured: the difference of the K -> inf asymptotes where neither law is flagged, else the measured K=k_max
    ensembles (no law), with the law's flag named."""
    pairs = [q for q in getattr(a, "joint_gains", {}) if q in a.per_k and q in a.per_k_joint]
    if not pairs:
        return None
    q = pairs[-1]
    claim, paper = "(b') ensembles of joint-recipe members (2x epochs, 0.5x wd) beat the optimum's", "3.27 vs 3.34 (K -> inf, 300M)"
    problem = law_problem({f"joint-recipe ensemble over K at {q}": a.per_k_joint[q], f"ensemble over K at {q}": a.per_k[q]})
    if problem is None:
        text, interval = _difference(a.per_k_joint[q], a.per_k[q])
        return [claim, paper, f"C_K(joint) - C_K(optimum) at {q}: {text}", _sign_verdict(interval, False)]
    g = a.joint_gains[q]["ensemble"]
    return [claim, paper, f"{q}, measured ensembles (no law; the K -> inf law is withheld: {problem}): optimum - "
                          f"joint {gain_text(g)}", _sign_verdict(g.interval)]


def claim_rows(results: dict, a) -> list[list]:
    """The paper's claims, one row each: the claim, its number, ours with a 95% interval, and a verdict computed
    from the analysis (supported, contradicted, or cannot be resolved at this scale, with the reason). A number
    derived from a flagged law is withheld: the verdict names the flag. No rows before any size has members."""
    p, search = recorded_profile(results), results.get("search", {})
    top = [q for q in p.runs.presets if q in results.get("members", {})]
    if not top:
        return []
    rows = []
    withheld = "withheld (see the laws' table)"

    rows.append(_claim_a(search, a, top))

    reg = a.size_laws.get("regularized")
    ens = a.per_k.get(top[-1])
    if reg is not None and ens is not None:
        problem = law_problem({"regularized over N": reg, f"ensemble over K at {top[-1]}": ens})
        text, interval = _difference(ens, reg) if problem is None else (withheld, None)
        rows.append(["(b) ensemble asymptote (K -> inf) below the regularized one", "3.34 vs 3.43 (-0.09)",
                     f"C_K({top[-1]}) - C_reg: {text}",
                     f"cannot be resolved at this scale: {problem}" if problem else _sign_verdict(interval, False)])
    if a.joint is not None and reg is not None and ens is not None:
        problem = law_problem({"regularized over N": reg, f"ensemble over K at {top[-1]}": ens, "joint limit": a.joint})
        lowest = reg if reg.C <= ens.C else ens
        text, interval = _difference(a.joint, lowest) if problem is None else (withheld, None)
        rows.append(["(c) the joint limit (N, K -> inf) is the lowest", "3.17 vs 3.34 and 3.43",
                     f"C_joint - the lower of the two: {text}",
                     f"cannot be resolved at this scale: {problem}" if problem else _sign_verdict(interval, False)])

    if row := _claim_joint_members(a):
        rows.append(row)

    main = f"D={p.runs.tokens:,}"
    local = next((e for n, e in getattr(a, "local_efficiencies", {}).items()
                  if n.startswith("regularized") and n.endswith(main)), None)
    law_reg = a.efficiencies.get("regularized, N -> inf (asymptote)")
    if law_reg is not None and law_reg.headline:
        rows.append(["(d) data efficiency > 1", "2.29x regularized (asymptote)", f"law: {law_reg.multiplier()}",
                     _sign_verdict(law_reg.interval, threshold=1.0)])
    elif local is not None and local.headline:
        why = law_problem({"the data law": a.data_law}) or "the law-based multiplier is extrapolated"
        rows.append(["(d) data efficiency > 1", "2.29x regularized (asymptote)",
                     f"local, best regularized at {main} (between measured budgets): {local.multiplier()}; "
                     f"law-based withheld ({why})", _sign_verdict(local.interval, threshold=1.0)])
    elif a.data_law is not None:
        rows.append(["(d) data efficiency > 1", "2.29x regularized (asymptote)", "n/a",
                     "cannot be resolved at this scale: " + (law_problem({"the data law": a.data_law})
                                                             or "no multiplier inside the measured budgets")])
    joint_eff = a.efficiencies.get("joint N, K -> inf (asymptote)")
    if joint_eff is not None and law_reg is not None:
        if joint_eff.headline and law_reg.headline:
            gap = Interval(joint_eff.interval.lo - law_reg.interval.hi, joint_eff.interval.hi - law_reg.interval.lo)
            verdict = ("supported" if gap.lo > 0 else "contradicted (the intervals are disjoint, the other way)"
                       if gap.hi < 0 else "cannot be resolved at this scale: the intervals overlap")
            ours = f"joint {joint_eff.multiplier()} vs regularized {law_reg.multiplier()}"
        else:
            problem = (law_problem({"the data law": a.data_law, "joint limit": a.joint, "regularized over N": reg})
                       or "a multiplier lies outside the data law's fitted range")
            ours, verdict = withheld, f"cannot be resolved at this scale: {problem}"
        rows.append(["(d) joint multiplier the largest", "5.17x joint vs 2.29x regularized", ours, verdict])

    g = a.gains
    for kept, who in (("kept", "the student"), ("soft_kept", "the soft-label student")):
        if kept in g:
            k, over = g[kept], g.get("ensemble_over_best")
            ours = (f"{percent(k.value)} (95% interval {percent(k.interval.lo)} to {percent(k.interval.hi)}) of "
                    f"the ensemble's gain over the best single model of its size" if k.interval.defined
                    else percent(k.value))
            if over is None or not over.interval.lo > 0:
                verdict = ("cannot be resolved at this scale: the ensemble does not beat the best single model of the "
                           f"student's size ({gain_text(over) if over else 'n/a'})")
            else:
                verdict = _sign_verdict(k.interval, threshold=0.5)
            rows.append([f"(e) {who} keeps most (> 50%) of the ensemble's gain", "83%", ours, verdict])
    for self_gain, who in (("self", "self-distillation"), ("soft_self", "soft-label self-distillation")):
        if self_gain in g:
            rows.append([f"(f) {who} beats its teacher", "3.43, below its teacher",
                         f"teacher - student {gain_text(g[self_gain])}", _sign_verdict(g[self_gain].interval)])
    down = _downstream_gain(results)
    if down is not None:
        text, interval = down
        rows.append(["downstream gain of the ensemble over a single model", "+3.7 points (64.4 vs 60.7, 1.4B)",
                     f"ensemble K={p.members.k_max} ({top[-1]}) - regularized: {text}", _sign_verdict(interval)])
    return rows


def _shown(interval: Interval) -> str:
    lo, hi = interval
    return "shown" if lo > 0 else ("NOT shown: the interval includes 0" if hi >= 0 else
                                   "CONTRADICTED: reversed, the interval excludes 0")


def joint_verdicts(a) -> list[str]:
    """Whether the joint recipe's members make a better ensemble, and a worse single model, at each size measured."""
    lines = []
    for n, g in getattr(a, "joint_gains", {}).items():
        lines.append(f"- At {n}, the joint recipe's ensemble beats the optimum's: {_shown(g['ensemble'].interval)} "
                     f"({gain_text(g['ensemble'])}); its single members are worse than the optimum's: "
                     f"{_shown(Interval(-g['member'].interval.hi, -g['member'].interval.lo))} "
                     f"({gain_text(g['member'])}).")
    return lines


def story_verdicts(g: Mapping) -> list[str]:
    """Whether each of the story's effects shows at this scale, one line each from where its 95% interval lies,
    then the share of the ensemble's gain each student keeps."""
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
            verdicts.append(f"- {what}: {_shown(g[key].interval)} ({gain_text(g[key])}).")
    over_best = g.get("ensemble_over_best")  # the kept share is measured from the best single model of its size
    if "kept" in g and not (over_best and over_best.value > 0 and over_best.interval.lo > 0):
        verdicts.append("- The ensemble shows no gain over the best single model of the student's size here "
                        f"({gain_text(over_best) if over_best else 'n/a'}), so there is no share of it for the "
                        "student to keep.")
    elif "kept" in g:
        verdicts.append(kept_text("student", g["kept"], "the paper: 83%"))
    if "soft_kept" in g:
        verdicts.append(kept_text("soft-label student", g["soft_kept"], "the paper's sequence-level student: 83%"))
    return verdicts


def scale_limits(results: dict, a) -> list[str]:
    """What this study's scale cannot answer, collected from the analysis rather than written by hand: optima the
    search could not certify, laws not identified or flagged, multipliers read outside the data law's range,
    and effects whose interval includes 0; one Markdown list item each, none before the search has run."""
    p, search = recorded_profile(results), results.get("search", {})
    if not search:
        return []
    params = [s["params"] for s in search.values()]
    lines = [f"- Scale: {min(params):,}-{max(params):,} non-embedding parameters on {p.runs.tokens:,} tokens "
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
    return lines


def _c_text(fit) -> str:
    """An asymptote with its 95% interval, or why there is none."""
    if fit is None or not fit.identified:
        return "not identified (ordering only)"
    if fit.flags:  # answers respect every flag: the number stays in the laws' table, beside its flags
        return f"not quoted, the law is flagged ({'; '.join(fit.flags)})"
    return f"{fit.asymptote()} (95% interval {fit.C_interval.text()})"


def answers_section(results: dict, a) -> list[str]:
    """The study's six questions, each answered with an interval or with why this scale cannot answer it."""
    p = recorded_profile(results)
    top = [q for q in p.runs.presets if q in results.get("members", {})]
    if len(top) < 2:
        return []
    qa = []
    wd = ", ".join(f"{q}: wd {results['search'][q]['regularized']['wd']:g} "
                   f"({'certified' if results['search'][q]['regularized']['certified'] else 'not certified'}), gain "
                   + (gain_text(a.gains_per_n[q]["regularization"]) if "regularization" in a.gains_per_n[q] else "n/a")
                   for q in top)
    qa.append(f"**Is the tuned weight decay above 0.1, and does it beat the standard recipe?** {wd}. "
              "(Paper: optima 0.8-3.2.)")
    seq = lambda r: " -> ".join(f"{mean_loss(results['members'][q][r]):.4f}" for q in top)
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


def gate_section(results: dict) -> list[str]:
    """The gate's verdict (bench.study.training.gate_verdict), said plainly before any number the study measured."""
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
