"""The checkpoint protocol survives a kill at every step of it, and resumed optimizer state lands on the right device.

A kill is simulated in-process by raising at the chosen instant: what a kill -9 leaves on disk is exactly what
the protocol had written by then (no fsync-less power loss is simulated here).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import train.checkpoint as checkpoint
from train.trainer import TrainConfig, configure_optimizer, restore_moments, train_member

FAULT_STEP = 10  # the checkpoint interrupted; the run checkpoints every 5 steps


class Killed(BaseException):
    """Stands for kill -9 at an instant of the protocol (BaseException: nothing in the trainer catches it)."""


def _cfg(data_dir) -> TrainConfig:
    return TrainConfig(data_dir=str(data_dir), preset="cpu-xxs", tokens=6_000, epochs=4, lr=3e-3, weight_decay=0.8,
                       seed=3, batch_size=4, context=64, checkpoint_every=5, log_every=5, threads=1)


def _weights(run_dir):
    return load_file(run_dir / "model" / "model.safetensors")


def _kill_during(monkeypatch, where: str) -> None:
    """Raise Killed at `where` while the checkpoint of FAULT_STEP is being saved."""
    state = {"step": None}
    real_save = checkpoint.save_checkpoint

    def tracking_save(run_dir, step, files):
        state["step"] = step
        return real_save(run_dir, step, files)

    monkeypatch.setattr("train.trainer.save_checkpoint", tracking_save)

    def wrap(module, name, after: bool = False):
        real = getattr(module, name)

        def faulty(*args, **kwargs):
            if state["step"] == FAULT_STEP and not after:
                raise Killed(where)
            out = real(*args, **kwargs)
            if state["step"] == FAULT_STEP and after:
                raise Killed(where)
            return out
        monkeypatch.setattr(module, name, faulty)

    if where == "writing files":  # the temp dir holds a part of the checkpoint
        real_save_file = checkpoint.save_file
        calls = {"n": 0}

        def half_save(tensors, path):
            real_save_file(tensors, path)
            if state["step"] == FAULT_STEP:
                calls["n"] += 1
                if calls["n"] == 1:
                    raise Killed(where)
        monkeypatch.setattr(checkpoint, "save_file", half_save)
    elif where == "before publish":
        wrap(checkpoint, "publish_dir")
    elif where == "after publish, before pointer":  # the reported wedge: ckpt-N/ exists, pointer at N-5
        wrap(checkpoint, "atomic_write_json")
    elif where == "after pointer, before cleanup":
        wrap(checkpoint, "_drop_others")
    else:
        raise AssertionError(where)


FAULTS = ["writing files", "before publish", "after publish, before pointer", "after pointer, before cleanup"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "uninterrupted"
    train_member(_cfg(tiny_dataset), out, progress=False)
    return _weights(out)


@pytest.mark.parametrize("where", FAULTS)
def test_kill_at_each_checkpoint_step_resumes_exactly(where, tiny_dataset, tmp_path, monkeypatch, uninterrupted):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        _kill_during(patch, where)
        with pytest.raises(Killed):
            train_member(_cfg(tiny_dataset), run_dir, progress=False)
    assert not (run_dir / "result.json").exists()
    train_member(_cfg(tiny_dataset), run_dir, progress=False)  # the resume, with the real protocol
    resumed = _weights(run_dir)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), f"{where}: {name} differs from the uninterrupted run"
    assert not list(run_dir.glob("ckpt-*")) and not list(run_dir.glob(".ckpt-*"))


def test_negative_control_a_different_seed_differs(tiny_dataset, tmp_path, uninterrupted):
    other = tmp_path / "other"
    train_member(dataclasses.replace(_cfg(tiny_dataset), seed=4), other, progress=False)
    assert any(not torch.equal(_weights(other)[n], t) for n, t in uninterrupted.items())


def test_stale_checkpoint_dir_is_replaced(tmp_path):
    """The wedge reported in the issue, directly: ckpt-N/ from a killed attempt and the pointer at an older one."""
    good = {"model": {"w": torch.ones(2)}}
    checkpoint.save_checkpoint(tmp_path, 5, good)
    (tmp_path / "ckpt-0000010").mkdir()
    (tmp_path / "ckpt-0000010" / "model.safetensors").write_bytes(b"half a file")
    assert checkpoint.load_checkpoint(tmp_path)[0] == 5  # the pointer decides, not the newest directory
    checkpoint.save_checkpoint(tmp_path, 10, {"model": {"w": torch.full((2,), 2.0)}})
    step, files = checkpoint.load_checkpoint(tmp_path)
    assert step == 10 and torch.equal(files["model"]["w"], torch.full((2,), 2.0))
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-0000010"]


def _devices() -> list[str]:
    # "meta" stands in for an accelerator on a CPU-only machine: a tensor left on the CPU beside meta
    # parameters fails AdamW's step exactly as a CPU moment beside CUDA parameters would.
    return ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_resumed_moments_are_on_the_parameters_device(device):
    model = torch.nn.Linear(4, 3)
    opt = configure_optimizer(model, 1e-3, 0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    saved = {f"{names[id(p)]}::{k}": v.clone() for g in opt.param_groups for p in g["params"]
             for k, v in opt.state[p].items()}  # CPU tensors, as load_checkpoint reads them

    target = torch.nn.Linear(4, 3).to(device)
    target_opt = configure_optimizer(target, 1e-3, 0.1)
    restore_moments(target_opt, dict(target.named_parameters()), saved)
    for p in target.parameters():
        state = target_opt.state[p]
        assert state["exp_avg"].device == p.device and state["exp_avg_sq"].device == p.device
        assert state["step"].device.type == "cpu"
        p.grad = torch.zeros_like(p)
    target_opt.step()  # would raise on mixed devices

    # Negative control: the old behaviour (moments left where they were read) fails the step.
    bad = torch.nn.Linear(4, 3).to(device)
    bad_opt = configure_optimizer(bad, 1e-3, 0.1)
    params = dict(bad.named_parameters())
    for key, value in saved.items():
        name, slot = key.split("::")
        bad_opt.state[params[name]][slot] = value
    for p in bad.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises((RuntimeError, NotImplementedError)):
        bad_opt.step()


# The resume is a resume, not a restart: on the CPU a run restarted from scratch ends with the same weights as
# the uninterrupted run, so the test above cannot tell the two apart. This one counts the steps the resumed call
# executes (train.trainer.lr_at runs once per step); the control's load_checkpoint finds nothing and must fail.
RESUMES_FROM = {"writing files": 5, "before publish": 5, "after publish, before pointer": 5,
                "after pointer, before cleanup": FAULT_STEP}  # the step the pointer names after the fault


@pytest.mark.parametrize("where", FAULTS + ["control: load_checkpoint finds nothing"])
def test_resume_after_each_fault_runs_only_the_remaining_steps(where, tiny_dataset, tmp_path, monkeypatch):
    import json

    import train.trainer as trainer
    from conftest import assert_did_only_the_remaining_steps

    control = where.startswith("control")
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        _kill_during(patch, FAULTS[0] if control else where)
        with pytest.raises(Killed):
            train_member(_cfg(tiny_dataset), run_dir, progress=False)
    pointer_step = json.loads((run_dir / "checkpoint.json").read_text())["step"]
    assert pointer_step == RESUMES_FROM[FAULTS[0] if control else where]
    steps, real_lr_at = [], trainer.lr_at
    monkeypatch.setattr(trainer, "lr_at", lambda step, *a, **k: steps.append(step) or real_lr_at(step, *a, **k))
    if control:
        monkeypatch.setattr(trainer, "load_checkpoint", lambda *a, **k: None)
    result = train_member(_cfg(tiny_dataset), run_dir, progress=False)
    if control:
        assert steps == list(range(result["steps"]))  # a restart from step 0
        with pytest.raises(AssertionError, match="should have run only"):
            assert_did_only_the_remaining_steps(steps, pointer_step, result["steps"])
    else:
        assert_did_only_the_remaining_steps(steps, pointer_step, result["steps"])
