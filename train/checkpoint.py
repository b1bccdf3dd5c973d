"""Checkpoints of a training run: safetensors files in ckpt-<step>/, and checkpoint.json pointing at the live one.

The protocol, in order, so that a kill at any instant leaves a resumable run:
  1. write every file into .ckpt-<step>.tmp/ (a kill here leaves a temp dir, removed by the next save);
  2. publish it as ckpt-<step>/ (replacing a ckpt-<step>/ left by an earlier, killed attempt at this step);
  3. point checkpoint.json at it (atomic, durable): only now is the new checkpoint the one resumed from;
  4. delete every other ckpt-*/ (a kill here leaves extra directories, ignored and removed next time).
The pointer is the only source of truth: a directory it does not name is never loaded.
Nothing is pickled: tensors are safetensors, the pointer is JSON.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from plumbing.artifacts import (ArtifactError, atomic_write_json, disk_full_named, fresh_tmp_dir, publish_dir,
                             read_json)

POINTER = "checkpoint.json"
CKPT_NAME = re.compile(r"ckpt-\d+")  # what a pointer may name: a directory of the run, never a path


def save_checkpoint(run_dir: str | Path, step: int, files: dict[str, dict[str, torch.Tensor]]) -> None:
    """Save `files` (file stem -> tensors, e.g. {"model": ..., "optimizer": ...}) as the run's checkpoint at `step`."""
    run_dir = Path(run_dir)
    name = f"ckpt-{step:07d}"
    tmp = fresh_tmp_dir(run_dir / name)
    with disk_full_named(run_dir / name, cleanup=tmp):  # a full disk: named, the pointer still on the last one
        for stem, tensors in files.items():
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp / f"{stem}.safetensors")
    publish_dir(tmp, run_dir / name)
    atomic_write_json(run_dir / POINTER, {"step": step, "dir": name})
    _drop_others(run_dir, keep=name)


def load_checkpoint(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[int, dict[str, dict[str, torch.Tensor]]] | None:
    """(step, files) of the checkpoint the pointer names, tensors on `device`; None when the run has none."""
    run_dir = Path(run_dir)
    pointer = run_dir / POINTER
    if not pointer.exists():
        return None
    info = read_json(pointer, "checkpoint pointer")
    name = info.get("dir")
    if not isinstance(name, str) or not CKPT_NAME.fullmatch(name):  # "../../x", "/abs", "ckpt-1/../.."
        raise ArtifactError(f"checkpoint pointer {pointer} names {name!r}, not a ckpt-<step> directory of {run_dir}: "
                            f"nothing outside the run is read; delete {pointer} to restart the run")
    ckpt = run_dir / name
    try:
        files = {f.stem: load_file(f, device=str(device)) for f in sorted(ckpt.glob("*.safetensors"))}
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {ckpt}")
        step = int(info["step"])
    except Exception as e:
        raise ArtifactError(f"checkpoint {ckpt} is corrupt ({e}); delete {pointer} to restart the run") from e
    return step, files


def clear_checkpoints(run_dir: str | Path) -> None:
    """After the run is complete: the pointer first (so nothing points at a deleted dir), then the dirs."""
    run_dir = Path(run_dir)
    (run_dir / POINTER).unlink(missing_ok=True)
    _drop_others(run_dir, keep=None)


def _drop_others(run_dir: Path, keep: str | None) -> None:
    for old in list(run_dir.glob("ckpt-*")) + list(run_dir.glob(".ckpt-*")):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
