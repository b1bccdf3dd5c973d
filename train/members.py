"""Many training runs at once as Ray tasks: K seed members of one configuration, or a search's trials.

Local Ray by default (one task per CPU); pass `address` to use an existing cluster, whose nodes must
see the same dataset and output paths (shared storage). Each run is resumable on its own (train/
trainer.py), so re-running a killed batch of runs finishes only what is missing.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from tqdm import tqdm

from train.trainer import TrainConfig, train_member

log = logging.getLogger(__name__)


def joint_recipe(epochs: int, weight_decay: float) -> tuple[int, float]:
    """Members of an ensemble: 2x the single-model optimum's epochs, 0.5x its weight decay (floor 0.1)."""
    return 2 * epochs, max(0.1, 0.5 * weight_decay)


def _ensure_ray(address: str | None, parallel: int):
    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=parallel or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
    return ray


def _run_one(cfg: TrainConfig, run_dir: str) -> dict:
    return train_member(cfg, run_dir, progress=False)


def run_trainings(configs: list[TrainConfig], run_dirs: list[str | Path], address: str | None = None,
                  parallel: int = 0, desc: str = "runs") -> list[dict]:
    """Train every config into its run dir, `parallel` at a time on Ray; results in input order.

    Finished runs (run_dir/result.json present) return at once without a Ray task."""
    assert len(configs) == len(run_dirs)
    results: list[dict | None] = [None] * len(configs)
    pending = []
    for i, (cfg, run_dir) in enumerate(zip(configs, run_dirs)):
        if (Path(run_dir) / "result.json").exists():
            results[i] = train_member(cfg, run_dir, progress=False)  # claims the dir and returns the stored result
        else:
            pending.append(i)
    if pending:
        width = parallel or (1 if address else os.cpu_count() or 1)
        ray = _ensure_ray(address, parallel)
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


def train_members(configs: list[TrainConfig], out_dir: str | Path, address: str | None = None,
                  parallel: int = 0) -> list[dict]:
    """K members (one config per seed) into out_dir/seed-<seed>/; each member is out_dir/seed-<seed>/model."""
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"members must have distinct seeds, got {seeds}")
    run_dirs = [Path(out_dir) / f"seed-{c.seed}" for c in configs]
    return run_trainings(configs, run_dirs, address, parallel, desc="members")
