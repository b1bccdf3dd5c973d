"""The main job's own pieces: the held-out next-word task it builds, its profile, and the verdicts its report prints."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from serve.downstream import MultipleChoiceItem, _parse_item
from bench.science.report import story_section
from bench.study.analysis import analyze
from bench.study.distillation import heldout_next_word
from bench.study.profile import load_profile


def test_heldout_next_word_is_a_valid_four_way_task(tiny_dataset):
    items = heldout_next_word(tiny_dataset, 50)
    assert len(items) == 50
    parsed = [_parse_item(item, f"item {i}") for i, item in enumerate(items)]
    assert all(isinstance(p, MultipleChoiceItem) and len(p.choices) == 4 for p in parsed)
    for p in parsed:
        assert len({c.lower() for c in p.choices}) == 4, p.choices  # the answer is never also a distractor
        assert p.query and not p.query.endswith(" ")
    golds = [p.gold for p in parsed]
    assert len(set(golds)) > 1  # the answer is not always in the same place
    assert heldout_next_word(tiny_dataset, 50) == items  # seeded: every run of the job scores the same items


@pytest.mark.fast
def test_main_profile_is_the_smallest_and_serves():
    main = load_profile("main")
    assert main.runs.context >= 256  # lm-evaluation-harness's multiple-choice items fit
    assert main.serve.serve_check and main.members.seeds >= 3 and main.members.k_max >= 3
    assert main.distill.student_seeds >= 2 and len(main.runs.presets) == 1 and not main.recipes.search


def main_results(std, reg, students, ensemble_gain=0.08) -> dict:
    """A finished main job with given member and student losses (the ensemble of the regularized members)."""
    import itertools

    profile = load_profile("main").recorded()
    rows = lambda losses: [{"seed": i, "val_loss": v, "model_dir": "m"} for i, v in enumerate(losses)]
    subsets = [{"k": k, "seeds": list(s), "loss": float(np.mean([reg[i] for i in s])) - ensemble_gain * (k - 1) / 2}
               for k in (1, 2, 3) for s in itertools.combinations(range(3), k)]
    fixed = {"epochs": 16, "lr": 3e-3, "certified": False, "reason": "fixed by the profile, not searched", "runs": []}
    return {"profile": profile, "phases_done": [], "dataset": {},
            "search": {"cpu-xs": {"params": 262720, "standard": {**fixed, "wd": 0.1},
                                  "regularized": {**fixed, "wd": 3.2}}},
            "members": {"cpu-xs": {"standard": rows(std), "regularized": rows(reg), "ensemble": rows(reg),
                                   "ensemble_setting": {"epochs": 16, "lr": 3e-3, "wd": 3.2}}},
            "ensembles": {"cpu-xs": subsets},
            "distill": {"preset": "cpu-xs", "w": 0.75, "student_epochs": 4, "student_lr": 3e-3, "student_wd": 0.1,
                        "ensemble": [{"seed": 1000 + i, "val_loss": v} for i, v in enumerate(students)]}}


def test_story_shows_standard_regularized_ensemble_student_side_by_side():
    results = main_results([5.50, 5.52, 5.49], [5.30, 5.32, 5.28], [5.20, 5.21])
    text = "\n".join(story_section(results, analyze(results, 200)))
    for row in ("| standard (wd 0.1) |", "| regularized |", "| ensemble K=3", "| distilled student"):
        assert row in text, row
    assert "beats the standard recipe: shown" in text and "The ensemble beats its members: shown" in text
    assert "The distilled student beats the members it was distilled from: shown" in text
    assert "above 100%: the student beats the ensemble itself" in text  # 5.205 < the ensemble's 5.22


@pytest.mark.fast
def test_story_says_not_shown_when_seeds_overlap():
    # negative control: standard and regularized seeds interleave, students sit among the members
    results = main_results([5.30, 5.34, 5.29], [5.31, 5.33, 5.28], [5.33, 5.29])
    text = "\n".join(story_section(results, analyze(results, 200)))
    assert "beats the standard recipe: NOT shown" in text
    assert "The distilled student beats the members it was distilled from: NOT shown" in text


def soft_results(reg, softs, control) -> dict:
    results = main_results([5.50, 5.52, 5.49], reg, [5.40, 5.41])
    results["distill"].update({
        "soft_recipe": {"epochs": 32, "w": 0.25, "blend": 0.5, "wd": 0.8, "lr": 3e-3, "topk": 32,
                        "synthetic_tokens": 1000},
        "soft": [{"seed": 4000 + i, "val_loss": v} for i, v in enumerate(softs)],
        "control-soft": [{"seed": 6000 + i, "epochs": 32, "steps": 320, "val_loss": v} for i, v in enumerate(control)]})
    return results


def test_story_puts_the_soft_label_student_beside_the_best_single_model_and_its_control():
    results = soft_results([5.30, 5.32, 5.28], [5.20, 5.21], [5.60, 5.62])
    text = "\n".join(story_section(results, analyze(results, 200)))
    assert "| soft-label student (cpu-xs, top-32, blend 0.5, w = 0.25) |" in text
    assert "| control: soft recipe's schedule, real data only (CE) |" in text
    assert "The soft-label student beats the best single model of its size: shown" in text
    assert "The teacher's soft labels beat the same schedule on real data alone: shown" in text
    assert "The soft-label student keeps" in text
    # negative control: soft students among the single models, the control among the students
    results = soft_results([5.30, 5.32, 5.28], [5.29, 5.33], [5.28, 5.34])
    text = "\n".join(story_section(results, analyze(results, 200)))
    assert "The soft-label student beats the best single model of its size: NOT shown" in text
    assert "The teacher's soft labels beat the same schedule on real data alone: NOT shown" in text


@pytest.mark.fast
@pytest.mark.parametrize("section, bad, message", [
    ("members", {"seeds": 1}, "field 'members.seeds'"), ("runs", {"presets": ["cpu-nope"]}, "field 'runs.presets'"),
    ("distill", {"distill_preset": "cpu-s"}, "field 'distill.distill_preset'"),
    ("distill", {"colour": 1}, "unknown field(s) distill.colour"), (None, {"colour": 1}, "unknown field(s) colour"),
])
def test_a_bad_profile_is_named_with_its_field(tmp_path, section, bad, message):
    from bench.study.profile import PROFILE_DIR, StudyError

    record = json.loads((PROFILE_DIR / "main.json").read_text())
    if section:
        record[section].update(bad)
    else:
        record.update(bad)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(record))
    with pytest.raises(StudyError, match="bad.json") as e:
        load_profile(str(path))
    assert message in str(e.value)


# ---- the main job's command line: one flag per profile field, defaults from the selected profile ---------------

def run_pipeline(argv, tmp_path, monkeypatch) -> list:
    """bench.pipeline.main with the study replaced by a recorder of the StudyConfig it would run."""
    import bench.pipeline

    ran = []

    def record(cfg):
        ran.append(cfg)
        (Path(cfg.out)).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "REPORT.md").write_text("# report\n")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench.pipeline, "run_study", record)
    bench.pipeline.main(argv)
    return ran


def test_the_main_job_without_flags_runs_the_main_profile_unchanged(tmp_path, monkeypatch):
    [cfg] = run_pipeline([], tmp_path, monkeypatch)
    assert cfg.profile == load_profile("main") and cfg.out == "runs/main"  # so runs/main resumes
    assert cfg.command == "bash scripts/demo.sh"


def test_flags_set_profile_fields_and_start_sets_a_fixed_recipe(tmp_path, monkeypatch):
    [cfg] = run_pipeline(["--start", "8", "0.001", "1.6", "--k-max", "2", "--presets", "cpu-xxs", "--distill-preset",
                          "cpu-xxs", "--serve-check", "false", "--eval-limit", "null", "--out", "o"],
                         tmp_path, monkeypatch)
    p = cfg.profile
    assert (p.recipes.start, p.recipes.epochs, p.recipes.lrs, p.recipes.wds) == ((8, 0.001, 1.6), (8,), (0.001,),
                                                                                  (1.6,))
    assert (p.members.k_max, p.runs.presets, p.distill.distill_preset, p.serve.serve_check,
            p.downstream.eval_limit) == (2, ("cpu-xxs",), "cpu-xxs", False, None)
    assert p.runs.tokens == load_profile("main").runs.tokens  # the rest is the profile's


@pytest.mark.fast
@pytest.mark.parametrize("argv, message", [
    (["--epochs", "8"], "does not search: --epochs"),  # a grid of a profile that trains at `start`
    (["--presets", "cpu-s"], "field 'distill.distill_preset'"),  # validated like a profile file
    (["--seeds", "1"], "field 'members.seeds'"),
    (["--profile", "nope"], "no study profile 'nope'"),
])
def test_bad_flags_are_refused_naming_the_field(argv, message, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        run_pipeline(argv, tmp_path, monkeypatch)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.fast
def test_help_shows_the_selected_profiles_values(capsys):
    import bench.pipeline

    for name in ("main", "wiki-100k"):
        with pytest.raises(SystemExit):
            bench.pipeline.main(["--profile", name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"the main budget D (default {load_profile(name).runs.tokens})" in text
        assert "--k-max" in text and "--soft-blend" in text and "--name" not in text
