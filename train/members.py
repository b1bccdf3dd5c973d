"""Many training runs at once: K seed members of one configuration, or a search's trials.

By default runs that share a shape and schedule (train.stacked.SHARED_FIELDS: preset, budget, epochs,
batch, context, ...) are trained together as one stack in this process (train/stacked.py): one op for
all members, each member still exactly itself. `separate=True` is the older path: one Ray task per run,
on a local Ray (one task per CPU) or an existing cluster at `address`, whose nodes must see the same
dataset and output paths (shared storage). Either way every run is resumable, so re-running a killed
batch of runs finishes only what is missing.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from tqdm import tqdm

from plumbing.ray_session import ray_session
from train.run_dir import RunDir
from train.stacked import SHARED_FIELDS, train_stack
from train.trainer import TrainConfig, train_member

log = logging.getLogger(__name__)


def joint_recipe(epochs: int, weight_decay: float) -> tuple[int, float]:
    """Members of an ensemble: 2x the single-model optimum's epochs, 0.5x its weight decay (floor 0.1)."""
    return 2 * epochs, max(0.1, 0.5 * weight_decay)


def _run_one(cfg: TrainConfig, run_dir: str) -> dict:
    return train_member(cfg, run_dir, progress=False)


def run_trainings(configs: list[TrainConfig], run_dirs: list[str | Path], address: str | None = None,
                  parallel: int = 0, desc: str = "runs") -> list[dict]:
    """Train every config into its run dir as separate runs, `parallel` at a time on Ray; results in input order.

    Finished runs (run_dir/result.json present) return at once without a Ray task."""
    assert len(configs) == len(run_dirs)
    results: list[dict | None] = [None] * len(configs)
    pending = []
    for i, (cfg, run_dir) in enumerate(zip(configs, run_dirs)):
        if RunDir(run_dir).complete:
            results[i] = train_member(cfg, run_dir, progress=False)  # claims the dir and returns the stored result
        else:
            pending.append(i)
    if not pending:
        return results  # type: ignore[return-value]
    width = parallel or (1 if address else os.cpu_count() or 1)
    with ray_session(address, parallel or None) as ray:
        cpus_per_run = 1
        if not address and len(pending) < width:  # fewer runs than CPUs: give each run more threads
            cpus_per_run = max(1, width // len(pending))
        remote = ray.remote(num_cpus=cpus_per_run)(_run_one)
        futures = {}
        for i in pending:
            cfg = configs[i] if configs[i].threads else dataclasses.replace(configs[i], threads=cpus_per_run)
            futures[remote.remote(cfg, str(run_dirs[i]))] = i
        with tqdm(total=len(configs), initial=len(configs) - len(pending), desc=desc, unit="run") as bar:
            remaining = list(futures)
            while remaining:
                ready, remaining = ray.wait(remaining, num_returns=1)
                i = futures[ready[0]]
                results[i] = ray.get(ready[0])
                log.info("%s: val loss %.4f", run_dirs[i], results[i]["val_loss"])
                bar.update(1)
    return results  # type: ignore[return-value]


def train_runs(configs: list[TrainConfig], run_dirs: list[str | Path], address: str | None = None,
               parallel: int = 0, separate: bool = False, desc: str = "runs") -> list[dict]:
    """Train every config into its run dir; results in input order.

    Stacked (default): configs that agree on train.stacked.SHARED_FIELDS form one stack each (their seed, lr,
    weight decay and clip may differ), trained one stack after another in this process with all its cores.
    `separate=True`: one run per Ray task (run_trainings)."""
    if separate:
        return run_trainings(configs, run_dirs, address, parallel, desc)
    if address:
        log.info("stacked training runs in this process; --address is used only with --separate")
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(repr([getattr(cfg, f) for f in SHARED_FIELDS]), []).append(i)
    results: list[dict | None] = [None] * len(configs)
    for idx in groups.values():
        for i, result in zip(idx, train_stack([configs[i] for i in idx], [run_dirs[i] for i in idx])):
            results[i] = result
    return results  # type: ignore[return-value]


def train_members(configs: list[TrainConfig], out_dir: str | Path, address: str | None = None,
                  parallel: int = 0, separate: bool = False) -> list[dict]:
    """K members (one config per seed) into out_dir/seed-<seed>/; each member is out_dir/seed-<seed>/model.

    Stacked in one process by default; `separate=True` trains each member as its own run on Ray."""
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"members must have distinct seeds, got {seeds}")
    run_dirs = [Path(out_dir) / f"seed-{c.seed}" for c in configs]
    return train_runs(configs, run_dirs, address, parallel, separate, desc="members")
