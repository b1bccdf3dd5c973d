"""What the two training loops share: train/trainer.py trains one member, train/stacked.py K members at once.

Both follow one schedule and write the same run directory (train/run_dir.py); only the model, the optimizer and
the step differ, and those stay in each loop, which reads top to bottom:
  - `training_device`: threads, CUDA or the CPU, and the CPU allocator's setting;
  - `lr_at`: the learning rate of a step, linear warmup then cosine decay;
  - `Cadence`: what follows a step (a metrics line, a validation pass, a checkpoint);
  - `LogWindow`: the train losses and throughput a metrics line reports;
  - `finish_run`: the trained member written as run_dir/model, then result.json.
Each loop looks up `lr_at` and `load_checkpoint` through its own module, once per step and once per run: the
resume tests count a run's steps by replacing them there (tests/conftest.py STEP_RECORDER).
"""
from __future__ import annotations

import ctypes
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from plumbing.artifacts import atomic_write_json, fresh_tmp_dir, publish_dir, sha256_file
from train.checkpoint import clear_checkpoints
from train.model import shape_of
from train.run_dir import RunDir

log = logging.getLogger(__name__)


def lr_at(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warmup over `warmup_frac` of the steps (at least one), then cosine decay to 0."""
    warmup = max(1, round(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class Cadence:
    """What follows step `done` (counted from 1) of `total`: a metrics line every `log_every` steps and after the
    last; a validation pass every `eval_every` (0: none) and a checkpoint every `checkpoint_every`, neither after
    the last step, whose weights are evaluated and written as the run's model instead."""
    total: int
    log_every: int
    eval_every: int
    checkpoint_every: int

    def logs(self, done: int) -> bool:
        return done % self.log_every == 0 or done == self.total

    def evaluates(self, done: int) -> bool:
        return bool(self.eval_every) and done % self.eval_every == 0 and done < self.total

    def checkpoints(self, done: int) -> bool:
        return done % self.checkpoint_every == 0 and done < self.total


class LogWindow:
    """The steps since the last metrics line: their losses (as each loop keeps them) and tokens, and the time taken."""

    def __init__(self):
        self.start, self.tokens, self.losses = time.perf_counter(), 0, []

    def add(self, loss, tokens: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens

    def close(self) -> tuple[list, float]:
        """(the window's losses, its tokens per second); the next window starts now."""
        losses, tokens_per_s = self.losses, self.tokens / (time.perf_counter() - self.start)
        self.__init__()
        return losses, tokens_per_s


def training_device(threads: int) -> torch.device:
    """CUDA if there is one, else the CPU (with `threads` intra-op threads when given, and freed memory kept)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keep_freed_memory(device)
    return device


def keep_freed_memory(device: torch.device) -> None:
    """On the CPU under glibc: serve every allocation from the heap and keep what is freed there for reuse.

    By default glibc maps each block over 32 MB fresh from the kernel and unmaps it when freed, so a training
    step's large activations (logits, MLP products) are page-faulted in and zeroed again at every step; on the
    VMs this project runs on that cost a lone run up to 30% of its step (bench/perf/train_stack_throughput). The price:
    a training process keeps its peak memory until it exits. Nothing happens on CUDA or without glibc."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 2**31 - 1)
    except (OSError, AttributeError):  # not glibc (musl, ...): keep the default allocator
        pass


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (weights, grads and AdamW moments stay fp32); plain fp32 on the CPU, where bf16 is slow."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def finish_run(cfg, run_dir: RunDir, model: torch.nn.Module, val_loss: float, steps: int, manifest: dict,
               base=None) -> dict:
    """Write a trained member (cfg: its TrainConfig; base: the train.base.BaseModel it was continued from, if any):
    run_dir/model (HF directory + chorus_run.json), then result.json (last: its presence means the run is complete),
    then drop the run's checkpoints."""
    final = run_dir.model_dir
    tmp = fresh_tmp_dir(final)
    device = next(model.parameters()).device
    model.to("cpu").save_pretrained(tmp, safe_serialization=True, max_shard_size="1000GB")  # one file: pack reads it
    model.to(device)
    shutil.copytree(Path(cfg.data_dir) / "tokenizer", tmp, dirs_exist_ok=True)
    result = {"val_loss": val_loss, "steps": steps, "model_dir": str(final.resolve()),
              "non_embedding_params": shape_of(model.config).non_embedding_params(),
              "tokenizer_sha256": manifest["tokenizer_sha256"], "config": cfg.identity(),
              "weights_sha256": sha256_file(tmp / "model.safetensors")}  # loaders verify it (serve.pack.check_weights)
    if base is not None:  # the base read at the start (not re-hashed here)
        result["base"] = base.provenance()  # what it was continued from (path, weights sha256)
    (tmp / "chorus_run.json").write_text(json.dumps(result, indent=1))
    publish_dir(tmp, final)
    atomic_write_json(run_dir.result_file, result)
    clear_checkpoints(run_dir.path)
    log.info("%s: val loss %.4f after %d steps", run_dir.path.name, val_loss, steps)
    return result
