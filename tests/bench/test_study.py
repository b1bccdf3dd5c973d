"""The study: the micro profile runs every phase for real (train/ ledgers, Ray, vLLM teachers, students,
downstream) and writes a report with every section; a second run trains and evaluates nothing; the answers
are right on points drawn from known laws; bad input is refused with exit code 2."""
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.study import PHASES, PROFILES, StudyConfig, analyze, answers, build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("## Answers", "## Main table", "## Recipe search", "## Standard vs regularized recipe over N",
            "## Ensembles over K at each N", "## Joint limit", "## Data efficiency at several budgets D",
            "## Distillation", "## Downstream", "## Where this disagrees with the paper")
QUESTIONS = ("Is the tuned weight decay above 0.1?", "Does the regularized recipe decrease monotonically in N",
             "Is the ensemble asymptote below the regularized one?", "Is the joint asymptote lowest?",
             "What data-efficiency multipliers result?", "How much of the ensemble gain does the student keep?")
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_cli(*args, timeout=1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.study", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def finished_files(out: Path) -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file that marks finished work: training runs' results (students included),
    ledgers, synthetic-data manifests, the evaluation cache."""
    def done(p: Path) -> bool:
        if p.name == "result.json":
            return (p.parent / "run.json").exists()  # a run's, not a search's summary (rewritten by each search)
        return p.name in ("ledger.jsonl", "manifest.json", "evals.jsonl")
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if done(p)}


@pytest.fixture(scope="module")
def micro_study(tiny_dataset, eval_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("study") / "micro"
    cmd = ["--profile", "micro", "--data-dir", str(tiny_dataset), "--out", str(out), "--eval-dir", str(eval_dir),
           "--n-boot", "20"]
    first = run_cli(*cmd)
    assert first.returncode == 0, first.stderr[-4000:]
    before = finished_files(out)
    start = time.perf_counter()
    second = run_cli(*cmd)
    assert second.returncode == 0, second.stderr[-4000:]
    return {"out": out, "first": json.loads(first.stdout.strip().splitlines()[-1]),
            "second": json.loads(second.stdout.strip().splitlines()[-1]), "second_s": time.perf_counter() - start,
            "before": before, "after": finished_files(out)}


def test_report_has_every_section_and_plot(micro_study):
    out = micro_study["out"]
    assert micro_study["first"]["phases_done"] == list(PHASES)
    assert micro_study["first"]["trained"] > 0
    report = (out / "REPORT.md").read_text()
    assert "Status: complete" in report
    for section in SECTIONS:
        assert section in report, section
    for question in QUESTIONS:
        assert question in report, question
    assert "Not run yet" not in report
    for png in ("loss_vs_n.png", "loss_vs_k.png", "joint_limit.png", "data_efficiency.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png
        assert f"]({png})" in report
    results = json.loads((out / "results.json").read_text())
    assert set(results["search"]) == {"cpu-xs", "cpu-s", "cpu-m"}
    assert all(len(rows) == 7 for rows in results["ensembles"].values())  # 3 + 3 + 1 subsets of 3 members
    assert {"ensemble", "self"} <= set(results["distill"])
    assert set(next(iter(results["downstream"]["models"].values()))) == {"piqa", "arc_easy", "lambada_openai"}


def test_second_run_trains_and_evaluates_nothing(micro_study):
    assert micro_study["second"]["phases_done"] == list(PHASES)
    assert micro_study["second"]["trained"] == 0
    assert micro_study["second"]["evaluated"] == 0
    assert micro_study["after"] == micro_study["before"]  # no run, ledger, shard manifest or cache rewritten
    assert len(micro_study["before"]) > 20


def test_profile_mismatch_and_missing_corpus_are_refused(micro_study, tmp_path):
    other = run_cli("--profile", "tiny", "--data-dir", "unused", "--out", str(micro_study["out"]))
    assert other.returncode == 2 and "another profile" in other.stderr
    missing = run_cli("--profile", "micro", "--corpus", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "s"))
    assert missing.returncode == 2 and "nope.jsonl does not exist" in missing.stderr


# ---- the analysis, on points drawn from known laws -----------------------------------------------

def law(x, a, b, c):
    return a / x**b + c


def known_results() -> dict:
    """A finished study whose losses follow laws with known asymptotes (N in millions, D in millions)."""
    from train.model import get_shape

    presets = ("cpu-xs", "cpu-s", "cpu-m", "cpu-l", "cpu-xl")
    params = {p: get_shape(p).non_embedding_params() for p in presets}
    noise = (0.004, -0.003, 0.0)
    search, members, ensembles = {}, {}, {}
    for p in presets:
        n = params[p] / 1e6
        reg = law(n, 0.5, 0.5, 5.0)
        # the standard recipe overfits: best at cpu-m, worse beyond
        std = {"cpu-xs": 6.40, "cpu-s": 5.95, "cpu-m": 5.85, "cpu-l": 5.90, "cpu-xl": 5.98}[p]
        search[p] = {"params": params[p],
                     "regularized": {"epochs": 16, "lr": 3e-3, "wd": 0.8, "val_loss": reg + noise[0], "certified": True,
                                     "model_dir": "m", "runs": []},
                     "standard": {"epochs": 8, "lr": 3e-3, "wd": 0.1, "val_loss": std, "certified": True,
                                  "model_dir": "m", "runs": []}}
        members[p] = [{"seed": s, "val_loss": reg + noise[s], "model_dir": "m"} for s in range(3)]
        c_n = law(n, 0.4, 0.5, 4.6)  # the K-limit at N; the joint limit is 4.6
        ensembles[p] = [{"k": k, "seeds": [], "loss": law(k, reg - c_n, 1.0, c_n) + noise[i]}
                        for k in (1, 2, 3, 4) for i in range(3)]
    # the standard recipe's best loss over D (D in millions): L = 1/D^0.3 + 5.5, at budgets 0.05 .. 0.8
    budgets = {"cpu-s": {str(d): {"standard": law(d / 1e6, 1.0, 0.3, 5.5), "regularized": law(d / 1e6, 0.8, 0.3, 5.0)}
                         for d in (50_000, 100_000, 200_000, 400_000, 800_000)}}
    profile = {**json.loads(json.dumps(dataclasses.asdict(PROFILES["tiny"]))), "name": "known",
               "presets": list(presets), "tokens": 800_000, "k_max": 4}
    distill = {"preset": "cpu-s", "ensemble": {"teacher_members": 4, "teacher_loss": ensembles["cpu-s"][-1]["loss"],
                                               "student_loss": members["cpu-s"][0]["val_loss"] - 0.1}}
    return {"profile": profile, "search": search, "members": members, "ensembles": ensembles, "budgets": budgets,
            "distill": distill}


def test_analysis_recovers_known_asymptotes_and_answers():
    results = known_results()
    a = analyze(results, n_boot=30)
    assert a.n_unit == "millions"
    assert a.reg_n[2].C == pytest.approx(5.0, abs=0.02)
    assert a.joint.C == pytest.approx(4.6, abs=0.05)
    assert a.data_law.C == pytest.approx(5.5, abs=1e-3)
    text = "\n".join(answers(results, a))
    assert "tuned weight decay above 0.1?** Yes" in text
    assert ": monotone; standard" in text and "a larger model is worse (overfits)" in text
    assert "regularized one?** Yes at N=cpu-xl" in text
    assert "asymptote lowest?** Yes: joint 4.6" in text
    # the regularized recipe's loss at each budget, on the standard recipe's data law: D(L) / D > 1
    regularized = [e for name, e in a.efficiencies.items() if name.startswith("regularized, best N")]
    assert len(regularized) == 5 and all(e.efficiency > 1 for e in regularized)
    member, teacher = results["members"]["cpu-s"][0]["val_loss"], results["distill"]["ensemble"]["teacher_loss"]
    kept = 0.1 / (member - teacher)
    assert f"keep?** {kept:.0%}" in text


def test_partial_report_says_what_is_missing_and_lists_finished_runs(tmp_path):
    results = known_results()
    results["phases_done"] = ["data", "search", "members", "ensembles"]
    for key in ("budgets", "distill"):
        del results[key]
    run = tmp_path / "runs" / "cpu-s" / "d800000" / "runs" / "e8-lr0.003-wd0.1-s0"
    run.mkdir(parents=True)
    config = {"preset": "cpu-s", "tokens": 800_000, "epochs": 8, "lr": 3e-3, "weight_decay": 0.1, "seed": 0}
    (run / "result.json").write_text(json.dumps({"val_loss": 5.4321, "config": config}))
    cfg = StudyConfig(profile=PROFILES["tiny"], corpus=("corpus.jsonl",), out=str(tmp_path), n_boot=10)
    report = build_report(results, tmp_path, cfg, n_boot=10).read_text()
    assert "**PARTIAL**: phases done data, search, members, ensembles; still to run budgets, distill, downstream" in report
    assert "| cpu-s | 800,000 | 8 | 0.003 | 0.1 | 0 | 5.4321 |" in report
    assert report.count("Not run yet.") == 3  # data efficiency, distillation, downstream
    assert "asymptote lowest?** Yes" in report and "multipliers result?" not in report
    for png in ("loss_vs_n.png", "loss_vs_k.png", "joint_limit.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "data_efficiency.png").exists()


def test_eval_cache_keys_change_when_a_model_is_retrained_in_place(tmp_path):
    # The cache is keyed by what was evaluated: a directory whose weights changed is another model.
    from bench.study import model_ids

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (model / "chorus_run.json").write_text(json.dumps({"weights_sha256": "a" * 64}))
    before = model_ids([str(model)])
    (model / "chorus_run.json").write_text(json.dumps({"weights_sha256": "b" * 64}))
    assert model_ids([str(model)]) != before
    assert model_ids([str(model)]) == [[str(model), "b" * 64]]
    # A directory with no recorded hash is keyed by its weights file's own sha256.
    (model / "chorus_run.json").unlink()
    (model / "model.safetensors").write_bytes(b"weights v1")
    first = model_ids([str(model)])
    (model / "model.safetensors").write_bytes(b"weights v2")
    assert model_ids([str(model)]) != first and first[0][1] == hashlib.sha256(b"weights v1").hexdigest()
