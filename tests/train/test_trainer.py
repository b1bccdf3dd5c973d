"""Presets, optimizer, schedule, exact resume after kill -9, run-dir identity, HF loading."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train.data import DataError, load_tokens
from train.loop import lr_at
from train.model import PRESETS, VLLM_HEAD_SIZES, Shape, ShapeError, check_shape, get_shape
from train.trainer import TrainConfig, configure_optimizer, train_member

from conftest import assert_did_only_the_remaining_steps, run_recording_steps

REPO = Path(__file__).resolve().parents[2]


def test_presets_are_servable_and_span_the_cpu_ladder():
    for name, shape in PRESETS.items():
        check_shape(shape)
        assert shape.head_dim in VLLM_HEAD_SIZES, name
    cpu = sorted(s.non_embedding_params() for n, s in PRESETS.items() if n.startswith("cpu-"))
    assert 30e3 <= cpu[0] <= 0.5e6 and 10e6 <= cpu[-1] <= 20e6  # cpu-xxxs (~33k) .. cpu-xl (~19M)
    assert PRESETS["600m"] == Shape(hidden=1024, mlp=3584, heads=16, kv_heads=8, layers=24)  # paper-recipe.md
    with pytest.raises(ShapeError, match="unknown preset"):
        get_shape("cpu-huge")
    with pytest.raises(ShapeError, match="head size 48"):
        check_shape(Shape(hidden=192, mlp=512, heads=4, kv_heads=4, layers=2))


def test_schedule_warmup_then_cosine_to_zero():
    total, peak = 1000, 1e-3
    assert lr_at(0, total, peak, 0.01) == pytest.approx(peak / 10)
    assert lr_at(9, total, peak, 0.01) == pytest.approx(peak)
    assert lr_at(10, total, peak, 0.01) == pytest.approx(peak)
    assert lr_at(505, total, peak, 0.01) == pytest.approx(peak / 2, rel=1e-6)
    assert lr_at(999, total, peak, 0.01) < 1e-7 * peak * 1e3
    assert lr_at(0, 5, peak, 0.01) == pytest.approx(peak)  # at least one warmup step


def test_weight_decay_groups():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=False))
    opt = configure_optimizer(model, 1e-3, 0.8)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.8 and opt.param_groups[1]["weight_decay"] == 0.0
    assert "lm_head.weight" in decayed and "model.layers.0.mlp.up_proj.weight" in decayed
    assert "model.embed_tokens.weight" in plain and "model.norm.weight" in plain
    assert all("norm" not in n for n in decayed)
    assert not opt.defaults["fused"]  # the CPU keeps the plain update (fused is for CUDA parameters)


def test_compile_is_a_runtime_knob_not_part_of_the_run():
    """`--compile` changes how fast a run goes, not which run it is (a compiled resume of a plain run is the
    same run); a real knob (lr) does change it."""
    plain = TrainConfig(data_dir="d", preset="cpu-xs")
    assert TrainConfig(data_dir="d", preset="cpu-xs", compile=True).identity() == plain.identity()
    assert TrainConfig(data_dir="d", preset="cpu-xs", lr=1e-3).identity() != plain.identity()


def _cfg(data_dir, **kw) -> TrainConfig:
    base = dict(data_dir=str(data_dir), preset="cpu-xs", tokens=30_000, epochs=3, lr=3e-3, weight_decay=0.8,
                seed=1, batch_size=16, context=128, checkpoint_every=5, log_every=1, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _member_cmd(cfg: TrainConfig, out: Path) -> list[str]:
    return [sys.executable, "-m", "train", "member", "--data-dir", cfg.data_dir, "--preset", cfg.preset,
            "--tokens", str(cfg.tokens), "--epochs", str(cfg.epochs), "--lr", str(cfg.lr), "--wd",
            str(cfg.weight_decay), "--seed", str(cfg.seed), "--batch-size", str(cfg.batch_size), "--context",
            str(cfg.context), "--checkpoint-every", str(cfg.checkpoint_every), "--threads", str(cfg.threads),
            "--out", str(out)]


def test_resume_after_kill_matches_uninterrupted_run(tiny_dataset, tmp_path, kill_past_checkpoint):
    """kill -9 past a checkpoint, re-run: the same model as an uninterrupted run, and the re-run executed only the
    steps after the checkpoint. Negative control: the same re-run with a load_checkpoint that finds nothing (a
    restart) also ends with the same model on the CPU, but fails the steps check."""
    cfg = _cfg(tiny_dataset)
    reference = train_member(dataclass_replace(cfg, log_every=10), tmp_path / "uninterrupted", progress=False)

    out, control = tmp_path / "killed", tmp_path / "killed-control"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    kill_past_checkpoint(_member_cmd(cfg, out), out, 120, cwd=REPO, env=env)
    checkpoint_step = json.loads((out / "checkpoint.json").read_text())["step"]  # read after the kill
    shutil.copytree(out, control)

    res, steps = run_recording_steps(_member_cmd(cfg, out), tmp_path / "steps.json", cwd=REPO, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    resumed = json.loads((out / "result.json").read_text())
    assert abs(resumed["val_loss"] - reference["val_loss"]) <= 1e-4
    assert_did_only_the_remaining_steps(steps, checkpoint_step, resumed["steps"])
    metric_steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()
                    if "train_loss" in l]
    assert metric_steps == sorted(set(metric_steps)) and metric_steps[-1] == resumed["steps"]  # none logged twice
    assert not list(out.glob("ckpt-*"))  # checkpoints are cleaned up once the model is saved

    res, restart_steps = run_recording_steps(_member_cmd(cfg, control), tmp_path / "control.json",
                                             ignore_checkpoint=True, cwd=REPO, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    restarted = json.loads((control / "result.json").read_text())
    assert abs(restarted["val_loss"] - reference["val_loss"]) <= 1e-4  # what the model alone cannot tell apart
    assert restart_steps == list(range(restarted["steps"]))  # the control did restart from step 0
    with pytest.raises(AssertionError, match="should have run only"):
        assert_did_only_the_remaining_steps(restart_steps, checkpoint_step, restarted["steps"])


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_run_dir_refuses_another_configuration(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tokens=5_000, epochs=1)
    first = train_member(cfg, tmp_path / "run", progress=False)
    assert train_member(cfg, tmp_path / "run", progress=False) == first  # complete: reused
    with pytest.raises(DataError, match="differs in: weight_decay"):
        train_member(dataclass_replace(cfg, weight_decay=0.1), tmp_path / "run", progress=False)
    with pytest.raises(DataError, match="exceeds"):
        train_member(dataclass_replace(cfg, tokens=10**9), tmp_path / "big", progress=False)


def test_member_is_a_transformers_model(tiny_members, tiny_dataset):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_members[0], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_members[0])
    assert model.config.tie_word_embeddings is False and model.config.head_dim == 32
    ids = tok("The city is on the river.", return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    run = json.loads((tiny_members[0] / "chorus_run.json").read_text())
    # trained, and on more than token frequencies: below the validation tokens' cross-entropy under the training
    # set's unigram frequencies (6.22 nats on the generated corpus; uniform would be ln(2048) = 7.62)
    train, val = load_tokens(tiny_dataset, "train"), load_tokens(tiny_dataset, "val")
    unigram = (np.bincount(train, minlength=2048) + 0.1) / (len(train) + 0.1 * 2048)
    assert run["val_loss"] < -np.log(unigram[val]).mean() - 0.05


def test_cli_errors_are_clear(tiny_dataset, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "train", "member", "--data-dir", str(tiny_dataset), "--preset",
                          "cpu-huge", "--out", str(tmp_path / "x")], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "unknown preset 'cpu-huge'" in res.stderr
    res = subprocess.run([sys.executable, "-m", "train", "member", "--data-dir", str(tmp_path / "nothing"),
                          "--out", str(tmp_path / "y")], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "manifest.json is missing" in res.stderr
    res = subprocess.run([sys.executable, "-m", "train", "data", "--corpus", str(tmp_path / "missing.txt"),
                          "--data-dir", str(tmp_path / "d")], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "does not exist" in res.stderr
