"""The training loop: one member, from a batch source, with exact resume after kill -9.

The loop is deliberately plain (nanoGPT-style). What varies between uses is the `BatchSource`:
real tokens for a member (`EpochBatches`), a real/synthetic mixture for a student (distill/).
A batch is a pure function of the step number, which is what makes resume exact: a restarted run
loads weights and AdamW moments from the last checkpoint and asks for the same batches again.

What a lone run shares with a stack of members (train/stacked.py) lives in train/loop.py (learning rate,
cadence, metrics window, writing the result) and train/run_dir.py (the run directory); this file keeps what is a
lone run's own: the Hugging Face model, torch's AdamW, the batch source and the step.

Nothing is pickled: weights and optimizer moments are safetensors, the rest is JSON.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from plumbing.artifacts import OutputLock
from plumbing.config_flags import setting
from train.base import BaseModel, BaseModelError, base_state_dict, check_base_fits, member_config, read_base
from train.checkpoint import load_checkpoint, save_checkpoint
from train.data import IGNORE_INDEX, DataError, load_tokens, read_manifest, windows
from train.loop import Cadence, LogWindow, autocast_for, finish_run, lr_at, training_device
from train.model import PRESETS, flops_per_token, get_shape, llama_config
from train.run_dir import RunDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. A field's help is its command-line flag's (train/cli.py, distill/cli.py derive them)."""
    data_dir: str = setting(help="dataset directory made by `python -m train data`")
    # with init_from: "" takes the base's shape (the CLI's --preset defaults by --init-from: train/cli.py)
    preset: str = setting("cpu-s", f"model shape: {', '.join(PRESETS)} (default cpu-s; with --init-from the base's "
                                   "shape, and a preset given must equal it)")
    init_from: str | None = setting(  # continued pre-training: a base model directory (train/base.py) to start from
        None, "continued pre-training: start from this base model (any local Hugging Face Llama directory with "
              "safetensors weights, a Chorus member included) instead of random weights; its architecture is used. "
              "Make the dataset with `train data --tokenizer DIR` (checked). Every seed starts from the same base "
              "weights, so seeds vary the data order. Suggested for continued pre-training: a peak --lr about a "
              "third of the from-scratch one, and the default --warmup-frac of 0.05 (fresh AdamW moments on trained "
              "weights), then cosine to zero", metavar="DIR")
    tokens: int = setting(200_000, "token budget D: exact number of training tokens (default %(default)s)")
    epochs: int = setting(8, "passes over the D tokens (default %(default)s)")
    lr: float = setting(3e-3, "peak learning rate (default %(default)g)")
    weight_decay: float = setting(0.8, "AdamW weight decay, multiplied by lr (default %(default)g)")
    seed: int = setting(0, "initialisation and data-order seed (default %(default)s)")
    batch_size: int = setting(32, "sequences per step (default %(default)s)")
    context: int = setting(128, "sequence length (default %(default)s)")
    warmup_frac: float = setting(  # the CLI's default is 0.05 with --init-from (train/cli.py)
        0.01, "share of steps of linear lr warmup before the cosine decay (default 0.01; 0.05 with --init-from)")
    grad_clip: float = 1.0
    eval_every: int = setting(0, "steps between validation passes; 0 = at the end only")
    checkpoint_every: int = setting(50, "steps between resumable checkpoints (default %(default)s)")
    log_every: int = 10
    threads: int = setting(0, "torch threads per run (0 = torch default)")  # intra-op threads
    compile: bool = setting(  # fuses norms/rotary/SwiGLU
        False, "torch.compile a lone member on a CUDA GPU (faster steps after a compile of a minute or so; ignored "
               "on the CPU and by stacked training)")
    extra: dict = field(default_factory=dict)  # recorded with the run (e.g. a distillation's mixture), not interpreted

    def identity(self) -> dict:
        """What makes two runs the same run (logging knobs excluded)."""
        d = asdict(self)
        for k in ("eval_every", "checkpoint_every", "log_every", "threads", "compile"):
            d.pop(k)
        d["data_dir"] = str(Path(self.data_dir).resolve())
        if self.init_from:
            d["init_from"] = str(Path(self.init_from).resolve())
        else:
            del d["init_from"]  # runs made before the option existed stay the same runs
        return d


def member_llama_config(cfg: TrainConfig, manifest: dict) -> tuple[LlamaConfig, BaseModel | None]:
    """The member's architecture: the preset's (from scratch), or the base's (continued pre-training)."""
    if not cfg.init_from:
        return llama_config(get_shape(cfg.preset), manifest["vocab_size"], cfg.context, manifest["bos_token_id"],
                            manifest["eos_token_id"], manifest["pad_token_id"]), None
    base = read_base(cfg.init_from)
    check_base_fits(base, manifest, cfg.data_dir, cfg.context, cfg.preset)
    return member_config(base), base


def initial_model(seed: int, config: LlamaConfig, base: BaseModel | None) -> LlamaForCausalLM:
    """The weights a run starts from: the seed's random initialisation, or the base's weights (then the seed
    varies only the data order, as in the paper's continued pre-training ensembles)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if base is not None:
        missing, unexpected = model.load_state_dict(base_state_dict(base), strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise BaseModelError(f"--init-from {base.path}: weights do not match its config.json "
                                 f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model


class BatchSource(Protocol):
    steps: int

    def batch(self, step: int) -> tuple[np.ndarray, ...]:
        """(inputs, targets, *extra) for `step`: the same arrays every time it is asked. Extra arrays (a student's
        soft targets) go to the run's loss after inputs and targets."""
        ...


StepLoss = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (model, inputs, targets, *extra) -> (sum, count)


class EpochBatches:
    """`epochs` passes over fixed windows, reshuffled each epoch from (seed, epoch)."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, batch_size: int, epochs: int, seed: int):
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = -(-len(inputs) // batch_size)
        self.steps = self.steps_per_epoch * epochs

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.inputs))

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = self.order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        return self.inputs[idx], self.targets[idx]


def configure_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Decay 2-D weights (the output head included); not norms, biases or the input embedding.

    PyTorch's AdamW multiplies weight decay by the learning rate: the paper's convention."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused on CUDA: one kernel for all parameters instead of a few per tensor (the optimizer step of a small model
    # is launch-bound there); the CPU keeps the plain for-each update that the bit-exact tests were written against
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def token_loss_on_device(model: torch.nn.Module, inputs: torch.Tensor,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over non-ignored targets, and their count, both left on the device (a
    training step that reads neither back never waits for the GPU)."""
    logits = model(input_ids=inputs).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()


def token_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over non-ignored targets, and their count."""
    loss, count = token_loss_on_device(model, inputs, targets)
    return loss, int(count)


@torch.no_grad()
def evaluate(model: torch.nn.Module, inputs: np.ndarray, targets: np.ndarray, batch_size: int = 32) -> float:
    """Mean next-token loss (nats/token) over the given windows."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(inputs), batch_size):
        x = torch.from_numpy(inputs[i : i + batch_size]).to(device)
        y = torch.from_numpy(targets[i : i + batch_size]).to(device)
        with autocast_for(device):
            loss, n = token_loss(model, x, y)
        total, count = total + float(loss), count + n
    model.train()
    return total / count


# ---- checkpoints -------------------------------------------------------------------------------

def _save_checkpoint(run_dir: Path, model, optimizer, step: int) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {f"{names[id(p)]}::{key}": value
               for group in optimizer.param_groups for p in group["params"]
               for key, value in optimizer.state[p].items()}
    save_checkpoint(run_dir, step, {"model": model.state_dict(), "optimizer": moments})


def _load_checkpoint(run_dir: Path, model, optimizer) -> int:
    device = next(model.parameters()).device
    found = load_checkpoint(run_dir, device)
    if found is None:
        return 0
    step, files = found
    model.load_state_dict(files["model"])
    restore_moments(optimizer, dict(model.named_parameters()), files["optimizer"])
    log.info("resumed %s from step %d", run_dir, step)
    return step


def restore_moments(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor],
                    moments: dict[str, torch.Tensor]) -> None:
    """Put saved AdamW state back, as torch's own load_state_dict does: moments on their parameter's device
    and dtype, the step counter on the CPU for plain AdamW (it reads it there) and beside the parameter for fused."""
    for key, value in moments.items():
        name, slot = key.split("::")
        param = params[name]
        if slot == "step":  # fused AdamW (CUDA) keeps its step counter beside the parameter
            optimizer.state[param][slot] = value.to(param.device if optimizer.defaults.get("fused") else "cpu")
        else:
            optimizer.state[param][slot] = value.to(param.device, param.dtype)


# ---- the loop ----------------------------------------------------------------------------------

def train_loop(cfg: TrainConfig, run_dir: str | Path, batches: BatchSource, val: tuple[np.ndarray, np.ndarray],
               progress: bool = True, peak_flops: float | None = None,
               step_loss: StepLoss = token_loss_on_device) -> dict:
    """Train from `batches` with `step_loss` (next-token cross-entropy by default), evaluate the cross-entropy on
    `val`; save the model as a HF directory in run_dir/model. A loss other than the default must be part of
    cfg.identity() (through cfg.extra): it changes the run.

    Returns the result record (also written to run_dir/result.json, last, when everything is saved).
    """
    run = RunDir(run_dir)
    with OutputLock(run.path):
        run.claim(cfg.identity())
        if run.complete:
            log.info("%s is already complete; reusing it", run.path)
            return run.result()
        return _train_loop(cfg, run, batches, val, progress, peak_flops, step_loss)


def _train_loop(cfg: TrainConfig, run: RunDir, batches: BatchSource, val: tuple[np.ndarray, np.ndarray],
                progress: bool, peak_flops: float | None, step_loss: StepLoss) -> dict:
    device = training_device(cfg.threads)
    manifest = read_manifest(cfg.data_dir)
    config, base = member_llama_config(cfg, manifest)
    model = initial_model(cfg.seed, config, base).to(device)  # EpochBatches uses the seed for data order
    model.train()
    if cfg.compile and device.type == "cuda":
        model.compile()  # in place: state_dict keys and save_pretrained stay those of the plain model
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay)
    start = _load_checkpoint(run.path, model, optimizer)
    run.trim_metrics(start)

    flops_tok = flops_per_token(config, cfg.context)
    total = batches.steps
    cadence = Cadence(total, cfg.log_every, cfg.eval_every, cfg.checkpoint_every)
    bar = tqdm(total=total, initial=start, desc=run.path.name, unit="step", disable=not progress, leave=False)
    window = LogWindow()
    with open(run.metrics_file, "a") as metrics:
        def emit(record):
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

        for step in range(start, total):
            lr = lr_at(step, total, cfg.lr, cfg.warmup_frac)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y, *extra = (torch.from_numpy(a).to(device) for a in batches.batch(step))
            with autocast_for(device):
                loss_sum, n = step_loss(model, x, y, *extra)
            loss = loss_sum / n
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            window.add(loss.detach(), x.numel())  # read back once per log window, not once per step
            done = step + 1
            if cadence.logs(done):
                losses, tps = window.close()
                record = {"step": done, "epoch": done / max(1, getattr(batches, "steps_per_epoch", total)),
                          "lr": lr, "train_loss": float(torch.stack(losses).double().mean()), "tokens_per_s": tps}
                if peak_flops:
                    record["mfu"] = tps * flops_tok / peak_flops
                emit(record)
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{tps:,.0f}")
            if cadence.evaluates(done):
                emit({"step": done, "val_loss": evaluate(model, *val)})
            if cadence.checkpoints(done):
                _save_checkpoint(run.path, model, optimizer, done)
            bar.update(1)
        bar.close()
        val_loss = evaluate(model, *val)
        emit({"step": total, "val_loss": val_loss})

    return finish_run(cfg, run, model, val_loss, total, manifest, base)


def validation_windows(data_dir: str | Path, context: int) -> tuple[np.ndarray, np.ndarray]:
    return windows(load_tokens(data_dir, "val"), context)


def train_member(cfg: TrainConfig, run_dir: str | Path, progress: bool = True, peak_flops: float | None = None) -> dict:
    """Train one member on exactly `cfg.tokens` training tokens for `cfg.epochs` epochs."""
    if cfg.tokens < 2:
        raise DataError(f"token budget must be at least 2 (got {cfg.tokens})")
    if cfg.epochs < 1:
        raise DataError(f"epochs must be >= 1 (got {cfg.epochs})")
    if cfg.init_from:
        member_llama_config(cfg, read_manifest(cfg.data_dir))  # a base that does not fit is named before any work
    stream = load_tokens(cfg.data_dir, "train", cfg.tokens)
    inputs, targets = windows(stream, cfg.context)
    batches = EpochBatches(inputs, targets, cfg.batch_size, cfg.epochs, cfg.seed)
    return train_loop(cfg, run_dir, batches, validation_windows(cfg.data_dir, cfg.context), progress, peak_flops)
