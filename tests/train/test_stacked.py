"""K members trained as one stack (train/stacked.py): each member equals the same seed trained alone, the
optimizer and clipping are per member, a killed stack resumes exactly, a stack too big for memory is refused."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from train.model import get_shape, llama_config
from train.stacked import (StackedAdamW, StackedLlama, StackMemoryError, check_memory, clip_grad_norm_per_member,
                           estimate_memory, init_members, train_stack)
from train.trainer import TrainConfig, configure_optimizer, train_member

from conftest import assert_did_only_the_remaining_steps, run_recording_steps

REPO = Path(__file__).resolve().parents[2]


def _cfg(data_dir, **kw) -> TrainConfig:
    """cpu-xxs, 10k tokens at batch 8 x context 64: 20 steps per epoch, 6 epochs = 120 steps."""
    base = dict(data_dir=str(data_dir), preset="cpu-xxs", tokens=10_000, epochs=6, lr=3e-3, weight_decay=0.8,
                seed=3, batch_size=8, context=64, checkpoint_every=40, log_every=10, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def _relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a|| over all parameters together."""
    assert a.keys() == b.keys()
    diff = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    return (diff / sum(float(a[k].pow(2).sum()) for k in a)) ** 0.5


# ---- the model and the optimizer, against Hugging Face and torch ------------------------------------

def test_fused_layout_round_trips_hf_names():
    """train.model's one fused layout (also the engine's): q | k | v and gate | up rows, GQA widths included."""
    from train.model import STACKED_PARAMS_MAPPING, Shape, fuse_layer, unfuse_layer

    config = llama_config(Shape(hidden=128, mlp=256, heads=4, kv_heads=2, layers=1), 64, 32, 1, 2, 0)
    state = LlamaForCausalLM(config).state_dict()
    fused = fuse_layer(state, "model.layers.0.")
    assert fused["qkv_proj"].shape == (128 + 2 * 64, 128) and fused["gate_up_proj"].shape == (2 * 256, 128)
    assert torch.equal(fused["qkv_proj"][128:192], state["model.layers.0.self_attn.k_proj.weight"])
    back = unfuse_layer(fused, config, "model.layers.0.")
    assert set(back) == {f"model.layers.0.{hf}.weight" for _, hf, _ in STACKED_PARAMS_MAPPING}
    assert all(torch.equal(v, state[name]) for name, v in back.items())


def test_stacked_forward_is_hf_llama_and_members_start_as_lone_runs():
    """Logits of each member equal LlamaForCausalLM's bit for bit (with grouped KV heads too), and member k
    starts from exactly the weights `torch.manual_seed(seed); LlamaForCausalLM(config)` gives."""
    from train.model import Shape

    for shape in (get_shape("cpu-xs"), Shape(hidden=128, mlp=256, heads=4, kv_heads=2, layers=2)):
        config = llama_config(shape, 512, 32, 1, 2, 0)
        stack = init_members(config, [5, 6])
        ids = torch.randint(0, 512, (2, 3, 32))
        for k, seed in enumerate((5, 6)):
            torch.manual_seed(seed)
            lone = LlamaForCausalLM(config)
            assert all(torch.equal(v, lone.state_dict()[n]) for n, v in stack.member_state_dict(k).items())
            with torch.no_grad():
                assert torch.equal(stack(ids)[k].view(3, 32, -1), lone(input_ids=ids[k]).logits)
        with torch.no_grad():  # negative control: member 1's logits are not member 0's
            assert not torch.allclose(stack(ids)[1].view(3, 32, -1), stack(ids)[0].view(3, 32, -1), atol=1e-2)


def _train_tiny_stack(config, seeds, lrs, wds, clip, scale, clip_fn, steps=5) -> tuple[StackedLlama, list]:
    stack = init_members(config, list(seeds))
    opt, params, norms = StackedAdamW(stack, list(wds)), list(stack.parameters()), []
    for step in range(steps):
        ids = torch.randint(0, config.vocab_size, (len(seeds), 4, 16), generator=torch.Generator().manual_seed(step))
        sums, counts = stack.losses(ids, ids)
        opt.zero_grad()
        (sums / counts * scale).sum().backward()
        norms.append(clip_fn(params, clip))
        opt.step(list(lrs))
    return stack, norms


def test_stacked_adamw_and_clipping_are_per_member():
    """Two members with their own lr and weight decay, only one of them clipped, each equal to torch's AdamW +
    clip_grad_norm_ on its own; clipping over the whole stack (negative control) is not."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, head_dim=32, tie_word_embeddings=False, pad_token_id=0)
    seeds, lrs, wds, clip = (0, 1), (3e-3, 1e-2), (0.8, 0.1), 1.0
    scale = torch.tensor([1e-2, 1e2])  # member 0's gradients are small, member 1's large
    lones = []
    for k, (seed, lr, wd) in enumerate(zip(seeds, lrs, wds)):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        optimizer = configure_optimizer(model, lr, wd)
        for step in range(5):
            ids = torch.randint(0, 64, (2, 4, 16), generator=torch.Generator().manual_seed(step))[k]
            loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits.flatten(0, 1), ids.flatten()) * scale[k]
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        lones.append(model.state_dict())

    per_member = lambda params, c: clip_grad_norm_per_member(params, [c, c])  # noqa: E731
    stack, norms = _train_tiny_stack(config, seeds, lrs, wds, clip, scale, per_member)
    assert float(norms[0][0]) < clip < float(norms[0][1])  # only member 1 is clipped
    for k in range(2):
        for name, value in stack.member_state_dict(k).items():
            torch.testing.assert_close(value, lones[k][name], rtol=0, atol=1e-6, msg=name)
    # negative control: one norm over the whole stack also scales member 0's gradients
    whole = lambda params, c: torch.nn.utils.clip_grad_norm_(params, c)  # noqa: E731
    wrong, _ = _train_tiny_stack(config, seeds, lrs, wds, clip, scale, whole)
    assert max(float((v - lones[0][n]).abs().max()) for n, v in wrong.member_state_dict(0).items()) > 1e-4


# ---- a member trained in the stack equals the same member trained alone -----------------------------

def test_stacked_member_equals_lone_run(tiny_dataset, tmp_path):
    """120 steps. Both members of a stack (own seed, own lr and wd) against lone runs of the same configs:
    final validation loss within 1e-4, weights within 1e-2 relative distance. Why 1e-2: the stack's forward is
    bit-identical to HF's (test above) but its backward sums in another order (bmm, fused q/k/v), so gradients
    differ at float32 rounding (~1e-8); 120 AdamW steps, which divide by sqrt of the second moment, amplify that
    to ~2e-3 (measured). A different seed (negative control) is at distance ~1, 100x the tolerance."""
    a = _cfg(tiny_dataset)
    b = _cfg(tiny_dataset, seed=4, lr=1e-3, weight_decay=0.1)  # per-member hyper-parameters in one stack
    lone = [train_member(c, tmp_path / f"lone-{c.seed}", progress=False) for c in (a, b)]
    stacked = train_stack([a, b], [tmp_path / "stack" / f"seed-{c.seed}" for c in (a, b)], progress=False)
    assert lone[0]["steps"] == stacked[0]["steps"] >= 100
    for c, lone_result, stack_result in zip((a, b), lone, stacked):
        assert abs(lone_result["val_loss"] - stack_result["val_loss"]) <= 1e-4
        dist = _relative_distance(_weights(tmp_path / f"lone-{c.seed}"), _weights(tmp_path / "stack" / f"seed-{c.seed}"))
        assert dist <= 1e-2, dist
        # indistinguishable run directories: the same identity, files and result fields
        lone_dir, stack_dir = tmp_path / f"lone-{c.seed}", tmp_path / "stack" / f"seed-{c.seed}"
        assert (lone_dir / "run.json").read_text() == (stack_dir / "run.json").read_text()
        assert (lone_dir / "model" / "config.json").read_text() == (stack_dir / "model" / "config.json").read_text()
        assert sorted(p.name for p in (lone_dir / "model").iterdir()) == sorted(p.name for p in (stack_dir / "model").iterdir())
        assert lone_result.keys() == stack_result.keys() and lone_result["config"] == stack_result["config"]
    assert not list((tmp_path / "stack").glob(".stack-*"))  # the stack's checkpoint is gone once members are written
    # negative control: the other seed, trained alone, is far from this member
    other = _relative_distance(_weights(tmp_path / "lone-3"), _weights(tmp_path / "stack" / "seed-4"))
    assert other > 0.5 and abs(lone[0]["val_loss"] - stacked[1]["val_loss"]) > 1e-3
    # a finished stack is reused, not retrained
    assert train_stack([a, b], [tmp_path / "stack" / f"seed-{c.seed}" for c in (a, b)], progress=False) == stacked


# ---- kill -9 and resume -----------------------------------------------------------------------------

def _members_cmd(cfg: TrainConfig, k: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "train", "members", "--data-dir", cfg.data_dir, "--preset", cfg.preset,
            "--tokens", str(cfg.tokens), "--epochs", str(cfg.epochs), "--lr", str(cfg.lr), "--wd",
            str(cfg.weight_decay), "--seed", str(cfg.seed), "--k", str(k), "--batch-size", str(cfg.batch_size),
            "--context", str(cfg.context), "--checkpoint-every", str(cfg.checkpoint_every), "--threads",
            str(cfg.threads), "--out", str(out)]


def _kill_stack_past_checkpoint(cmd: list[str], out: Path, timeout_s: float, env: dict) -> int:
    """kill -9 once the stack's checkpoint is at step >= 10 and a member's metrics have moved past it."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, ckpt_step = time.time() + timeout_s, 0
    try:
        while time.time() < deadline and proc.poll() is None:
            pointers = list(out.glob(".stack-*/checkpoint.json"))
            metrics = out / "seed-0" / "metrics.jsonl"
            if pointers and metrics.exists():
                try:
                    ckpt_step = json.loads(pointers[0].read_text())["step"]
                    lines = metrics.read_text().splitlines()
                    if ckpt_step >= 10 and lines and json.loads(lines[-1])["step"] > ckpt_step:
                        break
                except (json.JSONDecodeError, KeyError):
                    pass  # caught mid-write
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "seed-0" / "result.json").exists(), "the stack finished before it could be killed; make it longer"
    return ckpt_step


def test_killed_stack_resumes_exactly(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, seed=0, checkpoint_every=5)  # 120 steps; killed at step >= 20
    k = 2
    configs = [dataclasses.replace(cfg, seed=s) for s in range(k)]
    reference = train_stack(configs, [tmp_path / "uninterrupted" / f"seed-{s}" for s in range(k)], progress=False)

    out, env = tmp_path / "killed", dict(os.environ, PYTHONPATH=str(REPO))
    killed_at = _kill_stack_past_checkpoint(_members_cmd(cfg, k, out), out, 300, env)
    assert killed_at >= 10
    (pointer,) = out.glob(".stack-*/checkpoint.json")
    checkpoint_step = json.loads(pointer.read_text())["step"]  # read after the kill: what the resume must load
    control = tmp_path / "killed-control"
    shutil.copytree(out, control)
    res, steps = run_recording_steps(_members_cmd(cfg, k, out), tmp_path / "steps.json", cwd=REPO, env=env,
                                     timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed the stack" in res.stderr
    assert_did_only_the_remaining_steps(steps, checkpoint_step, reference[0]["steps"])
    for s in range(k):
        resumed, uninterrupted = _weights(out / f"seed-{s}"), _weights(tmp_path / "uninterrupted" / f"seed-{s}")
        assert resumed.keys() == uninterrupted.keys()
        for name in resumed:
            assert torch.equal(resumed[name], uninterrupted[name]), f"seed-{s}: {name}"
        result = json.loads((out / f"seed-{s}" / "result.json").read_text())
        assert result["val_loss"] == reference[s]["val_loss"]
        steps = [json.loads(l)["step"] for l in (out / f"seed-{s}" / "metrics.jsonl").read_text().splitlines()
                 if "train_loss" in l]
        assert steps == sorted(set(steps)) and steps[-1] == result["steps"]  # no step logged twice after resume
    assert not list(out.glob(".stack-*"))
    # negative control: the comparison sees a difference where there is one (the other member)
    other = _weights(tmp_path / "uninterrupted" / "seed-1")
    assert not all(torch.equal(v, other[n]) for n, v in _weights(out / "seed-0").items())
    # negative control: a re-run whose load_checkpoint finds nothing (a restart) gives the same weights, but the
    # steps check fails it
    res, restart_steps = run_recording_steps(_members_cmd(cfg, k, control), tmp_path / "control.json",
                                             ignore_checkpoint=True, cwd=REPO, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert torch.equal(_weights(control / "seed-0")["lm_head.weight"], _weights(out / "seed-0")["lm_head.weight"])
    assert restart_steps == list(range(reference[0]["steps"]))
    with pytest.raises(AssertionError, match="should have run only"):
        assert_did_only_the_remaining_steps(restart_steps, checkpoint_step, reference[0]["steps"])


# ---- memory -----------------------------------------------------------------------------------------

def test_a_stack_that_does_not_fit_is_refused(tiny_dataset, tmp_path):
    config = llama_config(get_shape("cpu-xl"), 4096, 128, 1, 2, 0)
    per_member = estimate_memory(config, 1, 32, 128)["total_bytes"]
    assert estimate_memory(config, 4, 32, 128)["total_bytes"] == 4 * per_member
    check_memory(config, 1, 32, 128, available=2 * per_member)  # negative control: one member fits
    with pytest.raises(StackMemoryError, match=r"K=3 members needs an estimated .* GiB .* at most 2 members fit"):
        check_memory(config, 3, 32, 128, available=2 * per_member)
    # against this machine's real available memory: a K far beyond it
    from train.stacked import available_memory

    too_many = available_memory() // per_member + 1
    with pytest.raises(StackMemoryError, match=f"K={too_many} members"):
        check_memory(config, too_many, 32, 128)
    # through train_stack: refused before any run directory is written
    configs = [_cfg(tiny_dataset, seed=s) for s in range(3)]
    dirs = [tmp_path / "members" / f"seed-{s}" for s in range(3)]
    with pytest.raises(StackMemoryError, match="K=3"):
        train_stack(configs, dirs, progress=False, available=1 << 20)
    assert not (tmp_path / "members").exists()


def test_stack_refuses_members_of_different_shapes(tiny_dataset, tmp_path):
    from train.data import DataError

    with pytest.raises(DataError, match="must share preset"):
        train_stack([_cfg(tiny_dataset), _cfg(tiny_dataset, seed=4, preset="cpu-xs")],
                    [tmp_path / "a", tmp_path / "b"], progress=False)


@pytest.mark.slow  # a Ray start
def test_members_cli_explains_stacking_and_separate_uses_ray(tiny_dataset, tmp_path):
    """`--separate` keeps the Ray path (plumbing.ray_session): same members as the stack, Ray stopped after."""
    import ray

    from train.members import train_members

    help_text = subprocess.run([sys.executable, "-m", "train", "members", "--help"], cwd=REPO, capture_output=True,
                               text=True, env=dict(os.environ, PYTHONPATH=str(REPO))).stdout
    assert "stack" in help_text and "--separate" in help_text
    configs = [_cfg(tiny_dataset, seed=s, tokens=4_000, epochs=1, threads=0) for s in (0, 1)]
    separate = train_members(configs, tmp_path / "separate", separate=True)
    assert not ray.is_initialized()  # started by ray_session, stopped by it
    stacked = train_members(configs, tmp_path / "stacked")
    for a, b in zip(separate, stacked):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-4
    assert abs(stacked[0]["val_loss"] - stacked[1]["val_loss"]) > 1e-4  # negative control: seeds differ
