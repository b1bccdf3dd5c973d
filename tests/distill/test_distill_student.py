"""distill/: the step formula, the mixing proportion, exact resume after kill -9, and the checks that run
before any training (tokenizer, w, missing real data, empty synthetic data)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from distill.mixture import MixtureBatches, mixture_steps
from distill.student import DistillConfig, DistillError, distill
from train.data import DatasetSpec, prepare_dataset
from train.trainer import TrainConfig

from conftest import assert_did_only_the_remaining_steps, run_recording_steps

REPO = Path(__file__).resolve().parents[2]


def windows_of(low: int, high: int, n: int, context: int = 8, seed: int = 0):
    """n windows of token ids in [low, high): real rows and synthetic rows told apart by their ids."""
    x = np.random.default_rng(seed).integers(low, high, size=(n, context + 1))
    return x[:, :-1].copy(), x[:, 1:].copy()


def test_step_count_formula():
    # 100 real windows, batch 16 -> 7 real steps per epoch
    assert mixture_steps(100, 16, epochs=4, w=0.0) == 28
    assert mixture_steps(100, 16, epochs=4, w=0.75) == 112  # 28 / 0.25
    assert mixture_steps(100, 16, epochs=3, w=0.9) == 210
    assert mixture_steps(100, 16, epochs=1, w=0.5) == 14
    batches = MixtureBatches(windows_of(0, 50, 100), windows_of(50, 99, 40), 16, 4, 0.75, seed=0)
    assert batches.steps == 112
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            mixture_steps(100, 16, 4, bad)


@pytest.mark.parametrize("w", [0.5, 0.75, 0.9])
def test_mixing_proportion_measured_from_the_batches(w):
    real, syn = windows_of(0, 1000, 200), windows_of(1000, 2000, 150, seed=1)
    batches = MixtureBatches(real, syn, batch_size=32, epochs=3, w=w, seed=5)
    seen_real, seen_syn = np.zeros(200, int), np.zeros(150, int)
    real_index = {r.tobytes(): i for i, r in enumerate(real[0])}
    syn_index = {r.tobytes(): i for i, r in enumerate(syn[0])}
    for step in range(batches.steps):
        x, y = batches.batch(step)
        assert x.shape == y.shape == (32, 8) and x.dtype == y.dtype == np.int64
        for row in x:
            if row.min() >= 1000:
                seen_syn[syn_index[row.tobytes()]] += 1
            else:
                seen_real[real_index[row.tobytes()]] += 1
    consumed = batches.consumed()
    n_rows = batches.steps * 32
    assert seen_syn.sum() == consumed["synthetic_rows"] and seen_real.sum() == consumed["real_rows"]
    assert abs(consumed["synthetic_fraction"] - w) < 4 * np.sqrt(w * (1 - w) / n_rows)
    # real rows: the (1 - w) share of all rows, which is `epochs` passes of ceil(200 / 32) = 7 full batches;
    # each window is seen evenly (passes are permutations)
    assert abs(consumed["real_rows"] - 7 * 32 * 3) < 4 * np.sqrt(w * (1 - w) * n_rows)
    assert seen_real.max() - seen_real.min() <= 1
    assert seen_syn.max() - seen_syn.min() <= 1  # the small teacher data is repeated, evenly
    assert consumed["synthetic_passes"] > 1
    # a pure function of the step: resume asks again and gets the same batch
    again = MixtureBatches(real, syn, batch_size=32, epochs=3, w=w, seed=5)
    for step in (0, batches.steps // 2, batches.steps - 1):
        assert all(np.array_equal(a, b) for a, b in zip(batches.batch(step), again.batch(step)))


def test_synthetic_only_keeps_the_step_count_and_draws_no_real_rows():
    real, syn = windows_of(0, 1000, 100), windows_of(1000, 2000, 100, seed=1)
    batches = MixtureBatches(real, syn, 16, 2, 0.5, seed=0, synthetic_only=True)
    assert batches.steps == mixture_steps(100, 16, 2, 0.5)
    assert batches.consumed()["real_rows"] == 0
    assert all(batches.batch(s)[0].min() >= 1000 for s in range(batches.steps))


def _student_cfg(data_dir, **kw) -> TrainConfig:
    base = dict(data_dir=str(data_dir), preset="cpu-xs", tokens=20_000, epochs=2, lr=3e-3, weight_decay=0.1,
                seed=3, batch_size=16, context=128, checkpoint_every=10, log_every=1, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _distill_cmd(cfg: TrainConfig, synthetic: Path, out: Path, w: float) -> list[str]:
    return [sys.executable, "-m", "distill", "--data-dir", cfg.data_dir, "--preset", cfg.preset,
            "--tokens", str(cfg.tokens), "--epochs", str(cfg.epochs), "--lr", str(cfg.lr), "--wd",
            str(cfg.weight_decay), "--seed", str(cfg.seed), "--batch-size", str(cfg.batch_size), "--context",
            str(cfg.context), "--checkpoint-every", str(cfg.checkpoint_every), "--threads", str(cfg.threads),
            "--synthetic", str(synthetic), "--w", str(w), "--out", str(out)]


def test_student_resumes_exactly_after_kill(tiny_dataset, synthetic_job, tmp_path, kill_past_checkpoint):
    cfg, synthetic = _student_cfg(tiny_dataset), synthetic_job["out"]
    reference = distill(DistillConfig(replace(cfg, log_every=10), str(synthetic), "ensemble", 0.75),
                        tmp_path / "uninterrupted", progress=False)
    assert reference["steps"] == mixture_steps(-(-(20_000 - 1) // 128), 16, 2, 0.75)
    mixture = reference["mixture"]
    assert abs(mixture["synthetic_fraction"] - 0.75) < 0.05
    record = json.loads((tmp_path / "uninterrupted" / "run.json").read_text())["extra"]["distill"]
    assert record["teacher_sha256"] == json.loads((synthetic / "manifest.json").read_text())["job"]["teacher_sha256"]
    assert record["w"] == 0.75 and record["teacher_members"] == 3 and len(record["synthetic_manifest_sha256"]) == 64

    out, control = tmp_path / "killed", tmp_path / "killed-control"
    kill_past_checkpoint(_distill_cmd(cfg, synthetic, out, 0.75), out, 300, cwd=REPO)
    checkpoint_step = json.loads((out / "checkpoint.json").read_text())["step"]  # read after the kill
    shutil.copytree(out, control)
    res, steps = run_recording_steps(_distill_cmd(cfg, synthetic, out, 0.75), tmp_path / "steps.json", cwd=REPO,
                                     timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed" in res.stderr
    resumed = json.loads((out / "result.json").read_text())
    assert abs(resumed["val_loss"] - reference["val_loss"]) <= 1e-4
    assert_did_only_the_remaining_steps(steps, checkpoint_step, reference["steps"])
    # negative control: a re-run whose load_checkpoint finds nothing (a restart) fails the steps check
    res, restart_steps = run_recording_steps(_distill_cmd(cfg, synthetic, control, 0.75), tmp_path / "control.json",
                                             ignore_checkpoint=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert restart_steps == list(range(reference["steps"]))
    with pytest.raises(AssertionError, match="should have run only"):
        assert_did_only_the_remaining_steps(restart_steps, checkpoint_step, reference["steps"])
    assert json.loads((out / "mixture.json").read_text())["synthetic_rows"] == mixture["synthetic_rows"]
    assert (Path(resumed["model_dir"]) / "model.safetensors").exists()


@pytest.fixture(scope="module")
def other_tokenizer_dataset(tmp_path_factory) -> Path:
    """A dataset whose BPE is trained on other text: its tokenizer hash differs from tiny_dataset's."""
    root = tmp_path_factory.mktemp("other_tokenizer")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * (i + 5))
    prepare_dataset(DatasetSpec(corpus=(str(corpus),), vocab_size=2048, val_max_tokens=500), root / "data")
    return root / "data"


@pytest.mark.parametrize("case", ["tokenizer", "w-one", "w-negative", "no-real-data", "empty-synthetic",
                                  "no-synthetic", "self-recipe-on-ensemble"])
def test_bad_input_fails_before_training(case, tiny_dataset, synthetic_job, other_tokenizer_dataset, tmp_path):
    data_dir, synthetic, recipe, w = tiny_dataset, synthetic_job["out"], "ensemble", 0.75
    expected = {"tokenizer": "another tokenizer", "w-one": r"\[0, 1\)", "w-negative": r"\[0, 1\)",
                "no-real-data": "real data: no dataset", "empty-synthetic": "holds no token shards",
                "no-synthetic": "does not exist", "self-recipe-on-ensemble": "single-member teacher"}[case]
    if case == "tokenizer":
        data_dir = other_tokenizer_dataset
    elif case == "w-one":
        w = 1.0
    elif case == "w-negative":
        w = -0.1
    elif case == "no-real-data":
        data_dir = tmp_path / "nodata"
    elif case == "empty-synthetic":
        synthetic = tmp_path / "empty"
        synthetic.mkdir()
    elif case == "no-synthetic":
        synthetic = tmp_path / "nowhere"
    else:
        recipe = "self"
    out = tmp_path / "run"
    with pytest.raises(DistillError, match=expected):
        distill(DistillConfig(_student_cfg(data_dir), str(synthetic), recipe, w), out, progress=False)
    assert not out.exists()  # nothing started
    cmd = _distill_cmd(_student_cfg(data_dir), synthetic, out, w) + ["--recipe", recipe]
    cli = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "error:" in cli.stderr and not out.exists()
