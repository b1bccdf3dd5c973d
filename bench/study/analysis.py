"""From results.json to the report: what was measured as bench.science.analysis's rows, the fits and gains
computed from them (Analysis), and REPORT.md (bench.science.report renders it)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.study.profile import PHASES
from bench.study.results import DISTILLED_RECIPES, RECIPES, StudyResults

JOINT = "joint"  # the analysis' recipe for the joint phase's ensembles (members at 2x epochs, 0.5x wd)


def size_unit(params: float) -> tuple[float, str]:
    """N and D are fitted in billions at GPU sizes and millions at CPU sizes: the fit's p0 assumes x ~ 1."""
    return (1e9, "billions") if params >= 1e8 else (1e6, "millions")


def evaluation_rows(results: dict | StudyResults) -> list[dict]:
    """What was measured, as bench.science.analysis's rows (recipe, x, seeds, loss). Recipes: 'standard' and
    'regularized' (members at each N), 'ensemble' (every K-subset of the ensemble's members at each N), 'joint'
    (every K-subset of the joint-recipe members, at the joint phase's sizes),
    'data:standard' / 'data:regularized' (each budget D's best N, its seeds), 'student:ensemble',
    'student:self', 'control' (at the distillation size)."""
    r = StudyResults.of(results)
    n_scale, _ = size_unit(r.largest_params)
    d_scale, _ = size_unit(r.tokens)
    rows = []
    for preset in r.members_done:
        size = r.sizes[preset]
        for recipe in RECIPES:
            rows += [{"recipe": recipe, "x": size.params / n_scale, "seeds": [m.seed], "loss": m.loss}
                     for m in size.members.get(recipe, [])]
    for preset in r.ensembles_done:
        size = r.sizes[preset]
        rows += [{"recipe": "ensemble", "x": size.params / n_scale, "seeds": e.seeds, "loss": e.loss}
                 for e in size.ensembles]
    for preset, j in r.joint.items():
        rows += [{"recipe": JOINT, "x": r.params(preset) / n_scale, "seeds": e.seeds, "loss": e.loss}
                 for e in j.ensembles]
    for d, best in best_per_budget(r).items():
        for recipe, (_, losses) in best.items():
            rows += [{"recipe": f"data:{recipe}", "x": d / d_scale, "seeds": [s], "loss": v}
                     for s, v in enumerate(losses)]
    if r.distilled.preset in r.sizes:
        x = r.params(r.distilled.preset) / n_scale
        for kind, recipe in DISTILLED_RECIPES.items():
            rows += [{"recipe": recipe, "x": x, "seeds": [m.seed], "loss": m.loss}
                     for m in r.distilled.runs.get(kind, [])]
    return rows


def budget_candidates(results: dict | StudyResults) -> dict[int, dict[str, dict[str, list[float]]]]:
    """Per budget D and recipe: every size measured there -> its seeds' losses. At the main budget every size's
    members count too, so the standard baseline there is the best over all sizes, not the budget phase's one."""
    r = StudyResults.of(results)
    out: dict[int, dict] = {}
    for preset, per_d in r.budgets.items():
        for d, per_recipe in per_d.items():
            for recipe, losses in per_recipe.items():
                out.setdefault(d, {}).setdefault(recipe, {})[preset] = losses
    if out:  # the main budget joins the data law only where the study measured a data law
        main = out.setdefault(r.tokens, {})
        for preset in r.members_done:
            for recipe in RECIPES:
                if members := r.sizes[preset].members.get(recipe):
                    main.setdefault(recipe, {}).setdefault(preset, [m.loss for m in members])
    return dict(sorted(out.items()))


def best_per_budget(results: dict | StudyResults) -> dict[int, dict[str, tuple[str, list[float]]]]:
    """Per budget D and recipe: the size with the lowest seed mean (over `budget_candidates`), its seeds' losses."""
    return {d: {recipe: min(sizes.items(), key=lambda kv: np.mean(kv[1])) for recipe, sizes in per_r.items()}
            for d, per_r in budget_candidates(results).items()}


@dataclass
class Analysis:
    """Every fitted or derived number the report prints, computed from results.json alone."""

    table: object  # bench.science.analysis.EvaluationTable
    n_unit: str
    d_unit: str
    size_laws: dict  # recipe -> PowerLawFit over N
    per_k: dict  # preset -> PowerLawFit over K (member-seed bootstrap)
    joint: object  # JointLimitFit or None
    data_law: object  # PowerLawFit of the standard recipe's best loss over D, or None
    efficiencies: dict  # name -> DataEfficiency
    headline: dict  # the efficiencies a headline may quote (bench.science.fits.headline_efficiencies)
    gains: dict  # name -> Gain: each recipe's gain with its member-seed interval, at the largest N
    gains_per_n: dict  # preset -> {name: Gain} (regularization and ensemble gains at every N)
    local_efficiencies: dict = dataclasses.field(default_factory=dict)  # name -> DataEfficiency between budgets
    per_k_joint: dict = dataclasses.field(default_factory=dict)  # preset -> PowerLawFit over K, joint-recipe members
    joint_gains: dict = dataclasses.field(default_factory=dict)  # preset -> {name: Gain}: joint vs optimum members


@dataclass(frozen=True)
class Gain:
    """A difference of losses (or a share) with a bootstrap interval over the seeds behind it."""

    value: float
    interval: object  # bench.science.fits.Interval
    note: str = ""


def seed_mean_draws(losses: list[float], n_boot: int, rng: np.random.Generator,
                    pool_with: tuple[list[float], ...] = ()) -> np.ndarray:
    """Bootstrap draws of the mean of seed losses (bench.science.fits.resample_seeds: unbiased, t-widened), the seed
    deviations pooled with those of `pool_with` (models of the same size whose seed noise is taken to be the
    same: 2 students alone have 1 degree of freedom, with 3 members beside them 3)."""
    from bench.science.fits import resample_seeds

    groups = [np.asarray(g, dtype=float) for g in (losses, *pool_with) if len(g)]
    if sum(len(g) - 1 for g in groups) < 1:
        return np.full(n_boot, np.nan)
    return resample_seeds(groups, n_boot, rng)[:, 0]


def story_gains(table, k_max: int, top_x: float, distill_x: float | None, n_boot: int,
                seed: int = 0) -> dict[str, Gain]:
    """The main story's gains at one size, each with a 95% interval from its seeds:
    regularization (standard - regularized seed means), the ensemble (members' mean - K=k_max ensemble, the
    member-seed bootstrap of bench.science.analysis), the student (members' mean - students' mean) and the share of
    the ensemble's gain it keeps, self-distillation (teacher - its student, paired by teacher), and the
    synthetic tokens' worth (control - student)."""
    from bench.science.analysis import loss_with_draws
    from bench.science.fits import Interval

    rng = np.random.default_rng(seed)

    def singles(recipe, x):
        try:
            return [v for s, v in sorted(table.cell(recipe, x).items(), key=lambda kv: min(kv[0])) if len(s) == 1]
        except ValueError:
            return []

    gains = {}
    std, reg = singles("standard", top_x), singles("regularized", top_x)
    if len(std) > 1 and len(reg) > 1:
        d = seed_mean_draws(std, n_boot, rng, (reg,)) - seed_mean_draws(reg, n_boot, rng, (std,))
        gains["regularization"] = Gain(float(np.mean(std) - np.mean(reg)), Interval.from_draws(d),
                                       f"standard {len(std)} seeds - regularized {len(reg)} seeds")
    if ("ensemble", top_x) in table.cells:
        m1, d1 = loss_with_draws(table, "ensemble", top_x, 1, n_boot, seed)
        mk, dk = loss_with_draws(table, "ensemble", top_x, k_max, n_boot, seed)
        gains["ensemble"] = Gain(m1 - mk, Interval.from_draws(d1 - dk), f"members' mean - K={k_max} ensemble")
    if distill_x is not None and ("ensemble", distill_x) in table.cells:
        m1, d1 = loss_with_draws(table, "ensemble", distill_x, 1, n_boot, seed)
        mk, dk = loss_with_draws(table, "ensemble", distill_x, k_max, n_boot, seed)
        gains["teacher"] = Gain(m1 - mk, Interval.from_draws(d1 - dk), f"members' mean - K={k_max} teacher")
        students = singles("student:ensemble", distill_x)
        if students:
            members = singles("ensemble", distill_x)
            ds = seed_mean_draws(students, n_boot, rng, (members,))
            s = float(np.mean(students))
            gains["student"] = Gain(m1 - s, Interval.from_draws(d1 - ds), f"members' mean - {len(students)} students")
            # the kept share is measured from the best single model of the student's size (the regularized
            # recipe's seeds), not from the joint-recipe members, which are overfit by design (2x epochs)
            best = singles("regularized", distill_x)
            if len(best) > 1:
                b, db = float(np.mean(best)), seed_mean_draws(best, n_boot, rng, (students,))
                gains["ensemble_over_best"] = Gain(b - mk, Interval.from_draws(db - dk),
                                                   f"best single (regularized seeds' mean) - K={k_max} ensemble")
                gains["kept"] = kept_share(b, db, s, ds, mk, dk, "student")
            control = singles("control", distill_x)
            if len(control) > 1 and len(students) > 1:
                gains["synthetic"] = Gain(float(np.mean(control)) - s,
                                          Interval.from_draws(seed_mean_draws(control, n_boot, rng, (students,))
                                                              - ds),
                                          "real-data-only control - student, same steps")
        for name, gain in soft_gains(singles, distill_x, mk, dk, k_max, n_boot, rng).items():
            gains.setdefault(name, gain)  # ensemble_over_best: the sequence-level students' draws where they exist
        selfs = singles("student:self", distill_x)
        if len(selfs) > 1:
            teachers = singles("regularized", distill_x)[: len(selfs)]  # teacher i is the optimum's seed i
            diffs = [t - s for t, s in zip(teachers, selfs)]
            gains["self"] = Gain(float(np.mean(diffs)), Interval.from_draws(seed_mean_draws(diffs, n_boot, rng)),
                                 f"teacher - its self-distilled student, {len(diffs)} teachers")
    return gains


def kept_share(best: float, best_draws: np.ndarray, student: float, student_draws: np.ndarray, ensemble: float,
               ensemble_draws: np.ndarray, who: str) -> Gain:
    """The share of the ensemble's gain over the best single model that a student keeps, with its interval."""
    from bench.science.fits import Interval

    with np.errstate(divide="ignore", invalid="ignore"):
        draws = (best_draws - student_draws) / (best_draws - ensemble_draws)
    return Gain((best - student) / (best - ensemble) if best != ensemble else math.nan, Interval.from_draws(draws),
                f"(best single - {who}) / (best single - ensemble)")


def soft_gains(singles, x: float, mk: float, dk: np.ndarray, k_max: int, n_boot: int,
               rng: np.random.Generator) -> dict[str, Gain]:
    """The soft-label students against the paper's baselines: the best single model of their size (the regularized
    recipe's seeds), the K=k_max ensemble they learned from (mean mk, draws dk), and the real-data-only control at
    the same steps; the share of the ensemble's gain kept; self-distillation with soft labels (teacher - student)."""
    from bench.science.fits import Interval

    gains = {}
    softs, best = singles("student:soft", x), singles("regularized", x)
    if softs and len(best) > 1:
        sv, ds = float(np.mean(softs)), seed_mean_draws(softs, n_boot, rng, (best,))
        b, db = float(np.mean(best)), seed_mean_draws(best, n_boot, rng, (softs,))
        gains["soft_student"] = Gain(b - sv, Interval.from_draws(db - ds),
                                     f"best single (regularized seeds' mean) - {len(softs)} soft-label students")
        gains["ensemble_over_best"] = Gain(b - mk, Interval.from_draws(db - dk),
                                           f"best single (regularized seeds' mean) - K={k_max} ensemble")
        gains["soft_kept"] = kept_share(b, db, sv, ds, mk, dk, "soft-label student")
        gains["soft_vs_ensemble"] = Gain(mk - sv, Interval.from_draws(dk - ds),
                                         f"K={k_max} ensemble - soft-label students")
        control = singles("control:soft", x)
        if len(control) > 1:
            gains["soft_teacher"] = Gain(float(np.mean(control)) - sv,
                                         Interval.from_draws(seed_mean_draws(control, n_boot, rng, (softs,)) - ds),
                                         "real-data-only control (same schedule, CE) - soft-label students")
    selfs = singles("student:soft-self", x)
    if len(selfs) > 1:
        diffs = [t - s for t, s in zip(best, selfs)]  # teacher i is the optimum's seed i
        gains["soft_self"] = Gain(float(np.mean(diffs)), Interval.from_draws(seed_mean_draws(diffs, n_boot, rng)),
                                  f"teacher - its soft-label self-distilled student, {len(diffs)} teachers")
    return gains


def joint_gains(table, k_max: int, x: float, n_boot: int, seed: int = 0) -> dict[str, Gain]:
    """At one size, the joint-recipe members against the optimum's: their K=k_max ensembles (the optimum's minus the
    joint's: > 0 when members trained for an ensemble make a better one) and their single members (the same
    difference at K=1: < 0 when the joint members are worse alone, as the paper's are), each with the member-seed
    bootstrap of bench.science.analysis (the two member sets are independent)."""
    from bench.science.analysis import loss_with_draws
    from bench.science.fits import Interval

    gains = {}
    for k, name in ((k_max, "ensemble"), (1, "member")):
        mo, do = loss_with_draws(table, "ensemble", x, k, n_boot, seed)
        mj, dj = loss_with_draws(table, JOINT, x, k, n_boot, seed)
        gains[name] = Gain(mo - mj, Interval.from_draws(do - dj),
                           f"optimum members' K={k} {'ensemble' if k > 1 else 'mean'} - the joint recipe's")
    return gains


def analyze(results: dict, n_boot: int = 200) -> Analysis:
    from bench.science.analysis import (
        EvaluationTable,
        efficiency_of_asymptote,
        efficiency_of_loss,
        fit_joint,
        fit_over_k,
        fit_over_x,
        local_efficiency_of_loss,
    )
    from bench.science.fits import headline_efficiencies

    r = StudyResults.of(results)
    rows = evaluation_rows(r)
    n_scale, n_unit = size_unit(r.largest_params)
    d_scale, d_unit = size_unit(r.tokens)
    if not rows:
        return Analysis(None, n_unit, d_unit, {}, {}, None, None, {}, {}, {}, {})
    table = EvaluationTable(rows, "results.json")
    recipes = set(table.recipes())
    size_laws = {recipe: fit_over_x(table, recipe, n_boot) for recipe in RECIPES if recipe in recipes}
    per_k, joint = {}, None
    if "ensemble" in recipes:
        per_k = {preset: fit_over_k(table, "ensemble", r.params(preset) / n_scale, n_boot)
                 for preset in r.ensembles_done}
        joint = fit_joint(table, "ensemble", n_boot)
    per_k_joint = {preset: fit_over_k(table, JOINT, r.params(preset) / n_scale, n_boot) for preset in r.joint}
    pair = [q for q in r.joint if q in r.ensembles_done]
    gains_joint = {q: joint_gains(table, r.k_max, r.params(q) / n_scale, n_boot) for q in pair}
    data_law, effs, local = None, {}, {}
    main_d = r.tokens / d_scale
    top = [q for q in r.presets if q in r.members_done]
    if "data:standard" in recipes:
        data_law = fit_over_x(table, "data:standard", n_boot)
    if r.floor is not None:  # a limit below the source's Bayes floor is flagged, so no headline is derived from it
        from bench.science.calibration import flag_below_floor

        size_laws = {recipe: flag_below_floor(f, r.floor) for recipe, f in size_laws.items()}
        per_k = {q: flag_below_floor(f, r.floor) for q, f in per_k.items()}
        per_k_joint = {q: flag_below_floor(f, r.floor) for q, f in per_k_joint.items()}
        joint, data_law = flag_below_floor(joint, r.floor), flag_below_floor(data_law, r.floor)
    if data_law is not None:
        for d, best in best_per_budget(r).items():
            if "regularized" in best:
                name = f"regularized, best N ({best['regularized'][0]}), D={d:,}"
                effs[name] = efficiency_of_loss(data_law, table, "data:regularized", d / d_scale, 1, d / d_scale, n_boot)
                local[name] = local_efficiency_of_loss(table, "data:standard", "data:regularized", d / d_scale, 1,
                                                       d / d_scale, n_boot)
        if top and "ensemble" in recipes:
            x = r.params(top[-1]) / n_scale
            name = f"ensemble K={r.k_max} ({top[-1]}), D={r.tokens:,}"
            effs[name] = efficiency_of_loss(data_law, table, "ensemble", x, r.k_max, main_d, n_boot)
            local[name] = local_efficiency_of_loss(table, "data:standard", "ensemble", x, r.k_max, main_d, n_boot)
        if r.distilled.runs.get("ensemble"):
            x = r.params(r.distilled.preset) / n_scale
            name = f"student ({r.distilled.preset}), D={r.tokens:,}"
            effs[name] = efficiency_of_loss(data_law, table, "student:ensemble", x, 1, main_d, n_boot)
            local[name] = local_efficiency_of_loss(table, "data:standard", "student:ensemble", x, 1, main_d, n_boot)
        if "regularized" in size_laws:
            effs["regularized, N -> inf (asymptote)"] = efficiency_of_asymptote(data_law, size_laws["regularized"], main_d)
        if joint is not None:
            effs["joint N, K -> inf (asymptote)"] = efficiency_of_asymptote(data_law, joint, main_d)
    top_x = r.params(top[-1]) / n_scale if top else math.nan
    dp = r.distilled.preset
    distill_x = r.params(dp) / n_scale if dp in r.sizes else None
    gains = story_gains(table, r.k_max, top_x, distill_x, n_boot) if top else {}
    per_n = {q: story_gains(table, r.k_max, r.params(q) / n_scale, None, n_boot) for q in top}
    return Analysis(table, n_unit, d_unit, size_laws, per_k, joint, data_law, effs, headline_efficiencies(effs), gains,
                    per_n, local, per_k_joint, gains_joint)


def write_report(results: dict, out: str | Path, n_boot: int = 200) -> Path:
    """Analyse results.json's content and write OUT/REPORT.md and its plots (bench.science.report renders)."""
    from bench.science.report import render_report, write_text

    out = Path(out)
    return write_text(out / "REPORT.md", render_report(results, analyze(results, n_boot), out, PHASES))
