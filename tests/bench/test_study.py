"""The orchestrator: the micro profile runs every phase for real (train/ ledgers, stacked members, vLLM teachers,
students, control, downstream) and a second run trains and evaluates nothing; the analysis is right on results
drawn from known laws (intervals cover the truth at their stated rate; a too-narrow control does not); the
synthetic budget rule gives every student one pass; bad input is refused with exit code 2."""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.study.analysis import analyze, seed_mean_draws, story_gains, write_report
from bench.study.profile import PHASES, load_profile, profile_names
from distill.budget import synthetic_budget

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_cli(*args, timeout=2400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.study", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout, check=False)


def finished_files(out: Path) -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file that marks finished work: training runs' results (students included),
    ledgers, synthetic-data manifests, the evaluation cache."""
    def done(p: Path) -> bool:
        if p.name == "result.json":
            return (p.parent / "run.json").exists()
        return p.name in ("ledger.jsonl", "manifest.json", "evals.jsonl")
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if done(p)}


# ---- end to end (slow) ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro_study(tiny_dataset, generated_eval_dir, tmp_path_factory) -> dict:
    """The micro profile run twice; its downstream tasks (piqa, arc_easy) come from the generated eval directory."""
    out = tmp_path_factory.mktemp("study") / "micro"
    cmd = ["--profile", "micro", "--data-dir", str(tiny_dataset), "--out", str(out), "--eval-dir",
           str(generated_eval_dir), "--n-boot", "50"]
    first = run_cli(*cmd)
    assert first.returncode == 0, first.stderr[-4000:]
    before = finished_files(out)
    second = run_cli(*cmd)
    assert second.returncode == 0, second.stderr[-4000:]
    return {"out": out, "first": json.loads(first.stdout.strip().splitlines()[-1]),
            "second": json.loads(second.stdout.strip().splitlines()[-1]), "before": before,
            "after": finished_files(out)}


@pytest.mark.slow
def test_micro_study_runs_every_phase_and_reports(micro_study):
    out = micro_study["out"]
    assert micro_study["first"]["phases_done"] == list(PHASES) and micro_study["first"]["trained"] > 0
    report = (out / "REPORT.md").read_text()
    assert "Status: complete" in report
    for section in ("## The story", "## Recipe settings", "## Scaling laws", "## Data efficiency",
                    "## Distillation", "## Downstream"):
        assert section in report, section
    assert (out / "data_efficiency.png").read_bytes()[:8] == PNG_MAGIC
    assert not re.search(r"\[(-?[0-9.]+), \1\]", report)  # no zero-width interval anywhere
    results = json.loads((out / "results.json").read_text())
    profile = load_profile("micro")
    assert results["profile"] == profile.recorded()  # recorded nested, by section
    for preset in profile.runs.presets:
        m = results["members"][preset]
        assert len(m["standard"]) == len(m["regularized"]) == profile.members.seeds  # seeds at both optima
        assert {r["epochs"] for r in [m["ensemble_setting"]]} == {2 * results["search"][preset]["regularized"]["epochs"]}
        assert len(results["ensembles"][preset]) == 2 ** profile.members.k_max - 1
    d, students = results["distill"], profile.distill
    assert len(d["ensemble"]) == students.student_seeds and len(d["self"]) == students.self_teachers
    assert len({r["teacher"] for r in d["self"]}) == students.self_teachers  # a different teacher each
    assert all(r["synthetic_passes"] <= 1 for r in d["ensemble"] + d["self"])  # no synthetic window used twice
    assert {r["steps"] for r in d["control"]} == {d["ensemble"][0]["steps"]}  # control: same optimizer steps
    assert len(d["soft"]) == students.soft_students and {r["steps"] for r in d["control-soft"]} == {d["soft"][0]["steps"]}
    assert all(r["synthetic_passes"] <= 1 for r in d["soft"])  # the shared job was sized for the soft students too
    synthetic = json.loads((out / "distill" / "synthetic-ensemble" / "manifest.json").read_text())["job"]
    assert synthetic["soft_targets"]["k"] == students.topk
    assert "| soft-label student" in report and "| control: soft recipe's schedule" in report
    # every model scored on the profile's eval tasks (a missing task file would only log and skip them)
    assert "downstream_skipped" not in results and "## Downstream (zero-shot" in report
    for model, scores in results["downstream"]["models"].items():
        for task in profile.downstream.eval_tasks:
            assert scores[task]["items"] == profile.downstream.eval_limit, (model, task, scores.get(task))


@pytest.mark.slow
def test_second_run_trains_and_evaluates_nothing(micro_study):
    assert micro_study["second"]["phases_done"] == list(PHASES)
    assert micro_study["second"]["trained"] == 0 and micro_study["second"]["evaluated"] == 0
    assert micro_study["after"] == micro_study["before"]
    assert len(micro_study["before"]) > 20


@pytest.mark.slow
def test_profile_mismatch_and_missing_corpus_are_refused(micro_study, tmp_path):
    other = run_cli("--profile", "main", "--data-dir", "unused", "--out", str(micro_study["out"]))
    assert other.returncode == 2 and "another profile" in other.stderr
    missing = run_cli("--profile", "micro", "--corpus", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "s"))
    assert missing.returncode == 2 and "nope.jsonl does not exist" in missing.stderr


@pytest.mark.fast
def test_unknown_profile_is_refused_naming_the_choices(tmp_path):
    r = run_cli("--profile", "nope", "--out", str(tmp_path / "s"), timeout=120)
    assert r.returncode == 2 and "no study profile 'nope'" in r.stderr and "main" in r.stderr


@pytest.mark.fast
def test_every_shipped_profile_loads():
    names = set(profile_names())
    assert {"main", "micro", "wiki", "wiki-25k"} <= names
    for name in names:
        load_profile(name)  # every file shipped is validated
    for study in ("wiki", "wiki-25k"):  # the committed-study design: more points than parameters everywhere
        p = load_profile(study)
        assert len(p.runs.presets) >= 5 and p.members.k_max >= 5 and len(p.data_law.budgets) + 1 >= 5, study
        assert p.recipes.search and p.members.seeds >= 3 and p.distill.student_seeds >= 3, study
        assert p.distill.self_teachers >= 3 and p.distill.distill_control and p.members.joint_members, study
        assert set(p.data_law.budget_presets) <= set(p.runs.presets), study


def flat(record: dict) -> dict:
    """A nested profile record as results.json recorded profiles before the sections: every field at the top."""
    from bench.study.profile import SECTIONS

    return {k: v for key, value in record.items()
            for k, v in (value.items() if key in SECTIONS else [(key, value)])}


@pytest.mark.fast
def test_a_flat_recorded_profile_and_its_nested_file_load_to_the_same_model():
    from bench.study.profile import PROFILE_DIR, StudyError, validate_profile

    for name in profile_names():
        nested = json.loads((PROFILE_DIR / f"{name}.json").read_text())
        assert "runs" in nested and "presets" not in nested, name  # the shipped files are nested
        legacy = flat(nested)
        assert "presets" in legacy and "runs" not in legacy, name
        assert validate_profile(legacy, "flat") == load_profile(name), name
    # the legacy records of the committed studies (flat, and without the fields added since) read too
    for results in ("studies/wiki-25k/results.json", "studies/calibration/results.json"):
        path = Path(__file__).resolve().parents[2] / results
        if path.exists():
            record = json.loads(path.read_text())["profile"]
            assert flat(validate_profile(record, results).recorded()).items() >= record.items(), results
    # controls: a flat field unknown to every section is refused by name; so is a flat field beside sections
    legacy = flat(load_profile("main").recorded())
    with pytest.raises(StudyError, match=r"unknown field\(s\) colour$"):
        validate_profile({**legacy, "colour": 1}, "flat")
    with pytest.raises(StudyError, match="field 'k_max' is a flat field beside the section"):
        validate_profile({**load_profile("main").recorded(), "k_max": 2}, "mixed")


# ---- the synthetic budget rule -----------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("tokens, context, batch, epochs, w", [(40_000, 256, 16, 4, 0.75), (6_000, 64, 16, 1, 0.5),
                                                               (200_000, 256, 16, 4, 0.75)])
def test_synthetic_budget_gives_every_student_one_pass(tokens, context, batch, epochs, w):
    from distill.mixture import MixtureBatches
    from train.data import windows

    budget = synthetic_budget(tokens, context, batch, epochs, w)
    real = windows(np.arange(tokens) % 100, context)
    for fraction, ok in ((1.0, True), (0.5, False)):  # negative control: half the budget repeats windows
        syn = windows(np.arange(int(budget * fraction)) % 100, context)
        passes = [MixtureBatches(real, syn, batch, epochs, w, seed).consumed()["synthetic_passes"]
                  for seed in range(5)]
        assert all(p <= 1 for p in passes) == ok, (fraction, passes)


# ---- the analysis on results drawn from known laws ------------------------------------------------------

def law(x, a, b, c):
    return a / x**b + c


PRESETS = ("cpu-xxs", "cpu-xxs2", "cpu-xs", "cpu-xs2", "cpu-s")


def known_results(rng, sd=0.01, reg_c=5.0, joint_c=4.6, k_max=5, seeds=3) -> dict:
    """A finished study whose losses follow known laws: regularized L(N) = 0.5/N^0.5 + reg_c (N in millions);
    the K-limit at each N 0.4/N^0.5 + joint_c; the standard recipe's data law 1/D^0.3 + 5.5 (D in millions)."""
    from train.model import get_shape

    profile = {**load_profile("wiki").recorded(), "name": "known"}
    profile["runs"] = {**profile["runs"], "presets": list(PRESETS), "tokens": 200_000}
    profile["members"] = {**profile["members"], "k_max": k_max, "seeds": seeds}
    search, members, ensembles = {}, {}, {}
    for p in PRESETS:
        params = get_shape(p).non_embedding_params()
        n = params / 1e6
        reg, c_n = law(n, 0.5, 0.5, reg_c), law(n, 0.4, 0.5, joint_c)
        # the standard recipe overfits on both sides of cpu-xs, where it meets its data law at the main budget
        # (the data law's point at the main budget is the best standard model over every size)
        std = law(0.2, 1.0, 0.3, 5.5) + 0.3 * abs(math.log(n / (get_shape("cpu-xs").non_embedding_params() / 1e6)))
        o = {"epochs": 16, "lr": 3e-3, "certified": True, "reason": "certified", "runs": []}
        search[p] = {"params": params, "regularized": {**o, "wd": 1.6}, "standard": {**o, "wd": 0.1}}
        alpha = rng.normal(0, sd, k_max)
        rows = lambda mean: [{"seed": s, "val_loss": float(mean + rng.normal(0, sd)), "model_dir": "m"}
                             for s in range(seeds)]
        members[p] = {"standard": rows(std), "regularized": rows(reg),
                      "ensemble": [{"seed": s, "val_loss": 0.0, "model_dir": "m"} for s in range(k_max)],
                      "ensemble_setting": {"epochs": 32, "lr": 3e-3, "wd": 0.8}}
        ensembles[p] = [{"k": k, "seeds": list(s), "loss": float(law(k, reg - c_n, 1.0, c_n) + alpha[list(s)].mean()
                                                                  + rng.normal(0, sd / 5))}
                        for k in range(1, k_max + 1) for s in itertools.combinations(range(k_max), k)]
    budgets = {"cpu-xs": {str(d): {"standard": {"seeds": [law(d / 1e6, 1.0, 0.3, 5.5) + rng.normal(0, sd)
                                                          for _ in range(seeds)]},
                                   "regularized": {"seeds": [law(d / 1e6, 0.8, 0.3, 5.2) + rng.normal(0, sd)
                                                             for _ in range(seeds)]}}
                          for d in (25_000, 50_000, 100_000, 200_000, 400_000)}}
    return {"profile": profile, "search": search, "members": members, "ensembles": ensembles, "budgets": budgets,
            "phases_done": list(PHASES), "dataset": {}}


def test_analysis_recovers_known_laws_and_keeps_extrapolations_out_of_the_headline(tmp_path):
    results = known_results(np.random.default_rng(0))
    a = analyze(results, n_boot=200)
    reg = a.size_laws["regularized"]
    assert reg.identified and reg.C_interval.lo < 5.0 < reg.C_interval.hi
    assert a.joint.identified and a.joint.C == pytest.approx(4.6, abs=0.1)
    assert a.data_law.identified and a.data_law.C == pytest.approx(5.5, abs=0.1)
    assert a.efficiencies and all(e.headline == (e.identified and not e.extrapolated and np.isfinite(e.efficiency)
                                                 and not e.law_flags) for e in a.efficiencies.values())
    assert set(a.headline) == {n for n, e in a.efficiencies.items() if e.headline}
    assert any(not e.headline for e in a.efficiencies.values())  # the asymptotes lie beyond the fitted budgets
    report = write_report(results, tmp_path, 200).read_text()
    assert not re.search(r"\[(-?[0-9.]+x?), \1\]", report)
    headline = report.split("Headline (identified law, inside its fitted range): ")[1].split("\n")[0]
    for name, e in a.efficiencies.items():
        assert (name in headline) == e.headline, name


def test_too_few_sizes_give_the_ordering_only(tmp_path):
    results = known_results(np.random.default_rng(1))
    for key in ("search", "members", "ensembles"):
        results[key] = {p: v for p, v in results[key].items() if p in PRESETS[:3]}
    a = analyze(results, n_boot=50)
    assert not a.size_laws["regularized"].identified  # 3 sizes for 3 parameters: no asymptote
    assert all("regularized, N -> inf" not in n for n in a.headline)
    assert "not identified" in write_report(results, tmp_path, 50).read_text()


@pytest.mark.fast
def test_gain_intervals_cover_the_truth_at_their_stated_rate():
    """100 synthetic main jobs (3 seeds each, true regularization gain 0.2, seed sd 0.02): the 95% interval of
    the gain covers 0.2 at least 88 times; a naive interval (bootstrap of 3 seeds, no rescaling or pooling)
    is the negative control and covers markedly less."""
    from bench.science.analysis import EvaluationTable
    from bench.science.fits import Interval

    covered = naive = 0
    for i in range(100):
        rng = np.random.default_rng(100 + i)
        std, reg = 5.5 + rng.normal(0, 0.02, 3), 5.3 + rng.normal(0, 0.02, 3)
        rows = [{"recipe": r, "x": 1.0, "seeds": [s], "loss": float(v)}
                for r, vs in (("standard", std), ("regularized", reg)) for s, v in enumerate(vs)]
        g = story_gains(EvaluationTable(rows), 3, 1.0, None, 400, seed=i)["regularization"]
        covered += g.interval.lo <= 0.2 <= g.interval.hi
        boot = lambda v, rng=rng: rng.choice(v, (400, 3)).mean(axis=1)
        lo, hi = Interval.from_draws(boot(std) - boot(reg))
        naive += lo <= 0.2 <= hi
    assert covered >= 88, covered
    assert naive < covered - 8, (naive, covered)


@pytest.mark.fast
def test_seed_mean_draws_pool_seed_noise_and_refuse_one_seed():
    rng = np.random.default_rng(0)
    assert np.isnan(seed_mean_draws([5.0], 10, rng)).all()
    alone = np.std(seed_mean_draws([5.0, 5.02], 2000, rng))
    pooled = np.std(seed_mean_draws([5.0, 5.02], 2000, rng, ([5.1, 5.12, 5.08],)))
    assert pooled < alone  # 3 more degrees of freedom: a smaller t-widening


def test_eval_cache_keys_change_when_a_model_is_retrained_in_place(tmp_path):
    from bench.study.training import model_ids

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (model / "chorus_run.json").write_text(json.dumps({"weights_sha256": "a" * 64}))
    before = model_ids([str(model)])
    (model / "chorus_run.json").write_text(json.dumps({"weights_sha256": "b" * 64}))
    assert model_ids([str(model)]) != before
    assert model_ids([str(model)]) == [[str(model), "b" * 64]]
    (model / "chorus_run.json").unlink()
    (model / "model.safetensors").write_bytes(b"weights v1")
    first = model_ids([str(model)])
    (model / "model.safetensors").write_bytes(b"weights v2")
    assert model_ids([str(model)]) != first and first[0][1] == hashlib.sha256(b"weights v1").hexdigest()


@pytest.mark.fast
def test_self_distillation_gain_pairs_each_student_with_its_own_teacher():
    from bench.science.analysis import EvaluationTable

    teachers, students = [5.30, 5.36, 5.24], [5.25, 5.31, 5.20]  # each student ~0.05 below its own teacher
    rows = [{"recipe": "regularized", "x": 1.0, "seeds": [s], "loss": v} for s, v in enumerate(teachers)]
    rows += [{"recipe": "ensemble", "x": 1.0, "seeds": [s], "loss": v} for s, v in enumerate(teachers)]
    rows += [{"recipe": "ensemble", "x": 1.0, "seeds": [0, 1, 2], "loss": 5.2}]
    rows += [{"recipe": "student:ensemble", "x": 1.0, "seeds": [1000], "loss": 5.25}]
    rows += [{"recipe": "student:self", "x": 1.0, "seeds": [2000 + s], "loss": v} for s, v in enumerate(students)]
    g = story_gains(EvaluationTable(rows), 3, 1.0, 1.0, 400)["self"]
    assert g.value == pytest.approx(0.0467, abs=1e-3) and g.interval.lo > 0  # paired: the teachers' spread cancels
    unpaired = np.mean(teachers) - np.mean(students)
    assert g.value == pytest.approx(unpaired)  # same point value, but only pairing gives an interval above 0


def test_the_limits_section_lists_every_caveat_and_only_those(tmp_path):
    from bench.science.report import limits_section

    results = known_results(np.random.default_rng(2))
    a = analyze(results, n_boot=50)
    text = "".join(limits_section(results, a))
    assert text.startswith("## What this scale cannot answer")
    assert "Optima not certified" not in text  # control: every optimum of known_results is certified
    for name, e in a.efficiencies.items():  # exactly the multipliers kept out of the headline are listed
        assert (f"{name}: {e.multiplier()}" in text) == (not e.headline), name
    results["search"]["cpu-xs"]["standard"] = {**results["search"]["cpu-xs"]["standard"], "certified": False,
                                               "reason": "at the limit of the epochs grid"}
    text = "".join(limits_section(results, analyze(results, n_boot=50)))
    assert "Optima not certified" in text and "cpu-xs standard (at the limit of the epochs grid)" in text
    assert "## What this scale cannot answer" in write_report(results, tmp_path, 50).read_text()


# ---- the joint phase: members trained for the ensemble ------------------------------------------------

def with_joint(results: dict, rng, shift: float, member_cost: float = 0.03, presets=("cpu-xs", "cpu-s")) -> dict:
    """known_results plus a joint phase at `presets`: its members are each `member_cost` worse than the optimum's
    and their K-limit `shift` lower (the paper: worse alone, better together)."""
    k_max = results["profile"]["members"]["k_max"]
    results["profile"] = {**results["profile"], "joint": {"joint_presets": list(presets)},
                          "members": {**results["profile"]["members"], "joint_members": False}}
    results["joint"] = {}
    for p in presets:
        singles = np.mean([e["loss"] for e in results["ensembles"][p] if e["k"] == 1])
        c_n = results["ensembles"][p][-1]["loss"] - (singles - results["ensembles"][p][-1]["loss"]) / (k_max - 1)
        one, limit = singles + member_cost, c_n - shift
        alpha = rng.normal(0, 0.01, k_max)
        ensembles = [{"k": k, "seeds": list(s), "loss": float(law(k, one - limit, 1.0, limit) + alpha[list(s)].mean()
                                                               + rng.normal(0, 0.002))}
                     for k in range(1, k_max + 1) for s in itertools.combinations(range(k_max), k)]
        results["joint"][p] = {"setting": {"epochs": 32, "lr": 3e-3, "wd": 0.8}, "ensembles": ensembles,
                               "members": [{"seed": e["seeds"][0], "val_loss": e["loss"], "model_dir": "m"}
                                           for e in ensembles if e["k"] == 1]}
    return results


def _joint_claim(results) -> str:
    from bench.science.verdicts import claim_rows

    return next(r for r in claim_rows(results, analyze(results, n_boot=100)) if r[0].startswith("(b')"))[-1]


def test_joint_recipe_members_are_judged_against_the_optimum_members_at_the_same_size(tmp_path):
    results = with_joint(known_results(np.random.default_rng(3)), np.random.default_rng(4), shift=0.05)
    a = analyze(results, n_boot=100)
    assert set(a.joint_gains) == set(a.per_k_joint) == {"cpu-xs", "cpu-s"}
    g = a.joint_gains["cpu-s"]
    assert g["ensemble"].interval.lo > 0 and g["member"].interval.hi < 0  # better together, worse alone
    assert _joint_claim(results) == "supported"
    report = write_report(results, tmp_path, 100).read_text()
    assert "## Members trained for the ensemble (the joint recipe)" in report
    assert "joint-recipe members over K at cpu-s" in report and "- Status: complete" in report
    # negative control: joint members whose ensemble is worse than the optimum's contradict the claim
    worse = with_joint(known_results(np.random.default_rng(3)), np.random.default_rng(4), shift=-0.05)
    assert _joint_claim(worse).startswith("contradicted")


@pytest.mark.fast
def test_a_resumed_study_may_gain_a_phase_it_has_not_run_but_not_change_one_it_has(tmp_path):
    from bench.study.job import Study, StudyConfig
    from bench.study.profile import StudyError, StudyProfile

    before = load_profile("main")
    record = before.recorded()
    grown = StudyProfile.model_validate({**record, "joint": {"joint_presets": [before.runs.presets[-1]]}})

    def resume(profile: StudyProfile, done: list[str]) -> None:
        (tmp_path / "results.json").write_text(json.dumps({"profile": record, "phases_done": done}))
        Study(StudyConfig(profile, str(tmp_path)))

    finished = [ph for ph in PHASES if ph != "joint"]  # a study finished before the joint phase existed
    resume(grown, finished)  # gains the phase: accepted
    with pytest.raises(StudyError, match=r"differs in: joint\.joint_presets"):
        resume(grown, list(PHASES))  # control: the same change once the joint phase has run
    changed = StudyProfile.model_validate({**record, "members": {**record["members"], "k_max": record["members"]["k_max"] + 1}})
    with pytest.raises(StudyError, match=r"differs in: members\.k_max"):
        resume(changed, finished)  # control: a phase that ran cannot change


@pytest.mark.fast
@pytest.mark.parametrize("joint, members, message", [
    (["cpu-l"], {}, "'joint.joint_presets' must be among presets"),
    (None, {"joint_members": True}, "'joint.joint_presets' cannot go with members.joint_members"),
])
def test_joint_presets_are_checked_against_the_ladder_and_the_members(joint, members, message):
    from bench.study.profile import StudyError, validate_profile

    record = load_profile("main").recorded()
    joint = joint or [record["runs"]["presets"][-1]]
    with pytest.raises(StudyError, match=re.escape(message)):
        validate_profile({**record, "joint": {"joint_presets": joint}, "members": {**record["members"], **members}},
                         "test")
