"""K members trained in one process: a Llama whose parameters carry a leading member axis.

On the CPU ladder a training step is dominated by per-op overhead, not FLOPs, so K members trained as K
runs waste most of the machine. Here every op runs once for all K members: weights are [K, ...] tensors,
a step takes K batches (member k's own data order) and returns K losses whose sum is backpropagated once.
The gradient of member k depends on its own loss only, so each member is still exactly itself:
  - initialisation: member k's weights are those a lone run of its seed starts from
    (`torch.manual_seed(seed); LlamaForCausalLM(config)`), stacked;
  - data: `EpochBatches` with its own seed; AdamW moments, learning rate, weight decay and gradient
    clipping are per member (the norm is each member's own, never the stack's);
  - the output is K ordinary run directories written by train/loop.py's `finish_run`, as a lone run's.

The model is hand-written with batched matmuls (`bmm`) and matches Hugging Face's LlamaForCausalLM
op for op: RMSNorm, rotary embeddings (HF's own module), SDPA causal attention with grouped KV heads,
SwiGLU MLP, untied (or tied) output head. q/k/v and gate/up are stored fused (one bmm each), in the layout of
train.model.STACKED_PARAMS_MAPPING (the serving engine's too); they are split back into HF's names when a member
is written. Its forward is bit-identical to HF's.
The alternative, `torch.func` stack_module_state + functional_call + vmap over the HF model, was timed
against it (bench/perf/train_stack_throughput.py --compare-vmap): one forward+backward of K=4 cpu-xxs members at
batch 32 x 128 took 635 ms hand-written vs 2602 ms vmapped (a shared, loaded 2-core box); the hand-written
model also needs no HF internals under vmap and stores q/k/v and gate/up fused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from plumbing.artifacts import ArtifactError, OutputLock, atomic_write_json, read_json
from train.checkpoint import clear_checkpoints, load_checkpoint, save_checkpoint
from train.data import IGNORE_INDEX, DataError, load_tokens, read_manifest, windows
from train.model import flops_per_token, fuse_layer, shape_of, unfuse_layer
from train.base import BaseModel
from train.loop import Cadence, LogWindow, autocast_for, finish_run, lr_at, training_device
from train.run_dir import RunDir
from train.trainer import EpochBatches, TrainConfig, evaluate, initial_model, member_llama_config, validation_windows

log = logging.getLogger(__name__)

# What members of one stack must share; seed, lr, weight_decay and grad_clip may differ per member.
SHARED_FIELDS = ("data_dir", "preset", "init_from", "tokens", "epochs", "batch_size", "context", "warmup_frac", "eval_every",
                 "checkpoint_every", "log_every", "threads", "extra")
BETAS, EPS = (0.9, 0.95), 1e-8  # as train.trainer.configure_optimizer


class StackMemoryError(ArtifactError):
    """A stack that would not fit in memory; the message names the estimate."""


# ---- the model ---------------------------------------------------------------------------------

class StackedLlama(nn.Module):
    """K Llama members of one config; every parameter is [K, ...]. Input ids [K, B, T] -> logits [K, B*T, V]."""

    def __init__(self, config: LlamaConfig, k: int):
        super().__init__()
        self.config, self.k = config, k
        h, hd = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        qkv = (self.heads + 2 * self.kv_heads) * hd
        empty = lambda *shape: nn.Parameter(torch.empty(k, *shape))  # noqa: E731 - filled by load_members
        self.embed = empty(config.vocab_size, h)
        if config.pad_token_id is not None:  # as nn.Embedding(padding_idx=pad): the pad row gets no gradient
            pad = config.pad_token_id
            self.embed.register_hook(lambda g: g.index_fill(1, torch.tensor([pad], device=g.device), 0.0))
        self.layers = nn.ModuleList()
        for _ in range(config.num_hidden_layers):
            layer = nn.Module()
            layer.ln1, layer.wqkv, layer.wo = empty(h), empty(qkv, h), empty(h, self.heads * hd)
            layer.ln2, layer.wgu, layer.wdown = empty(h), empty(2 * config.intermediate_size, h), empty(h, config.intermediate_size)
            self.layers.append(layer)
        self.norm = empty(h)
        self.head = None if config.tie_word_embeddings else empty(config.vocab_size, h)
        self.rotary = LlamaRotaryEmbedding(config)
        self._rope: tuple[int, torch.Tensor, torch.Tensor] | None = None

    # HF names <-> stacked parameters ------------------------------------------------------------
    def load_members(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Fill the stack from K Hugging Face LlamaForCausalLM state dicts."""
        assert len(states) == self.k
        with torch.no_grad():
            for k, sd in enumerate(states):
                self.embed[k].copy_(sd["model.embed_tokens.weight"])
                for i, layer in enumerate(self.layers):
                    p = f"model.layers.{i}."
                    fused = fuse_layer(sd, p)
                    layer.ln1[k].copy_(sd[p + "input_layernorm.weight"])
                    layer.wqkv[k].copy_(fused["qkv_proj"])
                    layer.wo[k].copy_(sd[p + "self_attn.o_proj.weight"])
                    layer.ln2[k].copy_(sd[p + "post_attention_layernorm.weight"])
                    layer.wgu[k].copy_(fused["gate_up_proj"])
                    layer.wdown[k].copy_(sd[p + "mlp.down_proj.weight"])
                self.norm[k].copy_(sd["model.norm.weight"])
                if self.head is not None:
                    self.head[k].copy_(sd["lm_head.weight"])

    def member_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Member k as a Hugging Face LlamaForCausalLM state dict (copies, on the CPU)."""
        t = lambda x: x[k].detach().to("cpu").clone()  # noqa: E731
        sd = {"model.embed_tokens.weight": t(self.embed), "model.norm.weight": t(self.norm)}
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            sd.update(unfuse_layer({"qkv_proj": t(layer.wqkv), "gate_up_proj": t(layer.wgu)}, self.config, p))
            sd.update({p + "input_layernorm.weight": t(layer.ln1), p + "self_attn.o_proj.weight": t(layer.wo),
                       p + "post_attention_layernorm.weight": t(layer.ln2), p + "mlp.down_proj.weight": t(layer.wdown)})
        sd["lm_head.weight"] = t(self.embed if self.head is None else self.head)
        return sd

    def decayed(self, name: str, p: torch.Tensor) -> bool:
        """configure_optimizer's rule, one axis up: 2-D weights (head included) decay; norms and the embedding do not."""
        return p.dim() >= 3 and name != "embed"

    # forward ----------------------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # LlamaRMSNorm, fp32
        variance = x.pow(2).mean(-1, keepdim=True)
        return weight[:, None, :] * (x * torch.rsqrt(variance + self.config.rms_norm_eps))

    def _cos_sin(self, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0] != t or self._rope[1].device != x.device:
            with torch.no_grad():
                cos, sin = self.rotary(x, torch.arange(t, device=x.device)[None])
            self._rope = (t, cos[0], sin[0])
        return self._rope[1], self._rope[2]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        """The trunk: input ids [K, B, T] -> each member's final-normed hidden states [K, B*T, H]."""
        k, b, t = ids.shape
        vocab, hd = self.config.vocab_size, self.head_dim
        offsets = (torch.arange(k, device=ids.device) * vocab)[:, None, None]
        x = F.embedding((ids + offsets).view(k, b * t), self.embed.view(k * vocab, -1))  # [K, N, H]
        cos, sin = self._cos_sin(x, t)
        groups = self.heads // self.kv_heads
        for layer in self.layers:
            qkv = torch.bmm(self._norm(x, layer.ln1), layer.wqkv.transpose(1, 2))
            q, key, v = qkv.view(k * b, t, self.heads + 2 * self.kv_heads, hd).split(
                [self.heads, self.kv_heads, self.kv_heads], dim=2)
            q, key, v = q.transpose(1, 2), key.transpose(1, 2), v.transpose(1, 2)  # [KB, heads, T, hd]
            q, key = self._rotate(q, cos, sin), self._rotate(key, cos, sin)
            if groups > 1:  # HF's repeat_kv
                key, v = (z[:, :, None].expand(-1, -1, groups, -1, -1).reshape(k * b, self.heads, t, hd) for z in (key, v))
            o = F.scaled_dot_product_attention(q, key, v, is_causal=True, scale=hd ** -0.5)
            x = x + torch.bmm(o.transpose(1, 2).reshape(k, b * t, self.heads * hd), layer.wo.transpose(1, 2))
            gate, up = torch.bmm(self._norm(x, layer.ln2), layer.wgu.transpose(1, 2)).chunk(2, dim=-1)
            x = x + torch.bmm(F.silu(gate) * up, layer.wdown.transpose(1, 2))
        return self._norm(x, self.norm)

    def _head(self) -> torch.Tensor:
        return self.embed if self.head is None else self.head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Input ids [K, B, T] -> logits [K, B*T, V]."""
        return torch.bmm(self.hidden_states(ids), self._head().transpose(1, 2))

    def losses(self, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per member: the sum of next-token cross-entropy over non-ignored targets [K], and their count [K].

        Each member's logits and loss are computed on their own ([B*T, V], a lone run's size), never as one
        [K, B*T, V] tensor: at K=4 and vocab 4096 that is 268 MB per copy, and the logits, their log-softmax and
        its gradient, each that large, made a stacked step on the CPU slower than K lone steps."""
        hidden, head = self.hidden_states(ids), self._head()
        flat = targets.reshape(self.k, -1)
        sums = [F.cross_entropy(F.linear(hidden[i], head[i]).float(), flat[i], ignore_index=IGNORE_INDEX, reduction="sum")
                for i in range(self.k)]
        return torch.stack(sums), (flat != IGNORE_INDEX).sum(1)


def init_members(config: LlamaConfig, seeds: list[int], base: BaseModel | None = None) -> StackedLlama:
    """The stack of the K models lone runs of `seeds` start from (train.trainer.initial_model: the seed's
    initialisation, or the base's weights for continued pre-training)."""
    model = StackedLlama(config, len(seeds))
    model.load_members([initial_model(seed, config, base).state_dict() for seed in seeds])
    return model


# ---- optimizer ---------------------------------------------------------------------------------

class StackedAdamW:
    """K AdamW optimizers over stacked parameters, each with its own lr and weight decay.

    The arithmetic is torch.optim.AdamW's (single-tensor path, decoupled decay multiplied by lr), with each
    member's scalars computed in double precision as torch computes them, then applied along the member axis."""

    def __init__(self, model: StackedLlama, weight_decays: list[float]):
        self.model, self.weight_decays = model, list(weight_decays)
        self.params = dict(model.named_parameters())
        self.state = {n: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)} for n, p in self.params.items()}
        self.steps = 0

    def _per_member(self, values: list[float], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *[1] * (like.dim() - 1))

    @torch.no_grad()
    def step(self, lrs: list[float]) -> None:
        self.steps += 1
        (b1, b2), s = BETAS, self.steps
        bias1, bias2_sqrt = 1 - b1 ** s, (1 - b2 ** s) ** 0.5
        for name, p in self.params.items():
            g, st = p.grad, self.state[name]
            if self.model.decayed(name, p):
                p.mul_(self._per_member([1 - lr * wd for lr, wd in zip(lrs, self.weight_decays)], p))
            st["exp_avg"].lerp_(g, 1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (st["exp_avg_sq"].sqrt() / bias2_sqrt).add_(EPS)
            p.sub_(st["exp_avg"] / denom * self._per_member([lr / bias1 for lr in lrs], p))

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{n}::{slot}": v for n, st in self.state.items() for slot, v in st.items()}
        out["::step"] = torch.tensor(self.steps, dtype=torch.int64)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.steps = int(tensors["::step"])
        for name, st in self.state.items():
            for slot in st:
                st[slot].copy_(tensors[f"{name}::{slot}"])


@torch.no_grad()
def clip_grad_norm_per_member(params: list[torch.Tensor], max_norms: list[float]) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for each member on its own slice of the stack; returns the K norms."""
    grads = [p.grad for p in params]
    k = grads[0].shape[0]
    norms = torch.stack([g.reshape(k, -1).norm(dim=1) for g in grads]).norm(dim=0)  # [K]
    limit = torch.tensor(max_norms, dtype=norms.dtype, device=norms.device)
    coef = (limit / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))
    return norms


# ---- memory ------------------------------------------------------------------------------------

def estimate_memory(config: LlamaConfig, k: int, batch_size: int, context: int) -> dict[str, int]:
    """Bytes a stack of k members needs (fp32): weights, grads and 2 AdamW moments (4 x params), and the
    activations autograd keeps for one step (per token and layer: the residual, two norms, q/k/v/attention
    output, gate/up/SiLU products; then the logits, their softmax and gradient), with 1.5x headroom for
    the allocator and temporaries."""
    shape = shape_of(config)
    params = shape.non_embedding_params() + config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    per_token = config.num_hidden_layers * (6 * config.hidden_size + 2 * qkv + 5 * config.intermediate_size) + 3 * config.vocab_size
    state = 4 * 4 * params * k
    activations = int(1.5 * 4 * per_token * batch_size * context * k)
    return {"params_per_member": params, "state_bytes": state, "activation_bytes": activations,
            "total_bytes": state + activations}


def available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(config: LlamaConfig, k: int, batch_size: int, context: int, available: int | None = None) -> dict:
    """Refuse a stack that would not fit in available memory, naming the estimate."""
    est = estimate_memory(config, k, batch_size, context)
    available = available_memory() if available is None else available
    if est["total_bytes"] > available:
        gib = 2 ** 30
        per_member = est["total_bytes"] / k
        raise StackMemoryError(
            f"a stack of K={k} members needs an estimated {est['total_bytes'] / gib:.2f} GiB "
            f"({est['state_bytes'] / gib:.2f} GiB weights + grads + AdamW moments, {est['activation_bytes'] / gib:.2f} GiB "
            f"activations at batch {batch_size} x context {context}), but {available / gib:.2f} GiB is available; "
            f"at most {max(0, int(available // per_member))} members fit. Use fewer members or `--separate`.")
    return est


# ---- the loop ----------------------------------------------------------------------------------

def check_stackable(configs: list[TrainConfig]) -> None:
    first = configs[0]
    for c in configs[1:]:
        diff = [f for f in SHARED_FIELDS if getattr(c, f) != getattr(first, f)]
        if diff:
            raise DataError(f"members of one stack must share {', '.join(diff)} (seed {first.seed} vs seed {c.seed})")


def stack_key(identities: list[dict]) -> str:
    return hashlib.sha256(json.dumps(identities, sort_keys=True).encode()).hexdigest()[:16]


def _stack_members(runs: list[RunDir], stack_dir: Path) -> list[int]:
    """Which of the runs this stack trains: those recorded in stack_dir/stack.json by a killed attempt (so
    the resume is exact even if some of them were written before the kill), else the unfinished ones."""
    record = stack_dir / "stack.json"
    if record.exists():
        names = read_json(record, "stack record")["run_dirs"]
        index = {str(run.path.resolve()): i for i, run in enumerate(runs)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ArtifactError(f"{record} names runs that are not in this job: {missing}; delete {stack_dir} to restart")
        return [index[n] for n in names]
    return [i for i, run in enumerate(runs) if not run.complete]


def train_stack(configs: list[TrainConfig], run_dirs: list[str | Path], progress: bool = True,
                peak_flops: float | None = None, available: int | None = None) -> list[dict]:
    """Train configs (same shape and schedule; own seed, lr, wd, clip) as one stack into their run dirs.

    The stack's checkpoint lives in <parent of the first run dir>/.stack-<hash of the runs>/; it is deleted
    once every member's run dir is complete. Returns each run's result record, in input order."""
    if not configs:
        return []
    check_stackable(configs)
    cfg = configs[0]
    if cfg.tokens < 2 or cfg.epochs < 1:
        raise DataError(f"token budget must be at least 2 and epochs >= 1 (got {cfg.tokens}, {cfg.epochs})")
    runs = [RunDir(d) for d in run_dirs]
    key = stack_key([[str(run.path.resolve()), c.identity()] for c, run in zip(configs, runs)])
    stack_dir = runs[0].path.parent / f".stack-{key}"
    members = _stack_members(runs, stack_dir)
    if members:  # before anything is written: a stack too big for memory leaves no trace
        config = member_llama_config(cfg, read_manifest(cfg.data_dir))[0]
        check_memory(config, len(members), cfg.batch_size, cfg.context, available)
    with ExitStack() as locks:
        for run in runs:
            locks.enter_context(OutputLock(run.path))
        for c, run in zip(configs, runs):  # under the locks: a job already holding a run dir finds it untouched
            run.claim(c.identity())
        members = _stack_members(runs, stack_dir)  # again, under the locks
        if members:
            _train([configs[i] for i in members], [runs[i] for i in members], stack_dir, progress, peak_flops)
    return [run.result() for run in runs]


def _train(configs: list[TrainConfig], runs: list[RunDir], stack_dir: Path, progress: bool,
           peak_flops: float | None) -> None:
    cfg, k = configs[0], len(configs)
    written = [run.complete for run in runs]  # finished before a kill: trained again, not rewritten
    device = training_device(cfg.threads)
    manifest = read_manifest(cfg.data_dir)
    config, base = member_llama_config(cfg, manifest)
    inputs, targets = windows(load_tokens(cfg.data_dir, "train", cfg.tokens), cfg.context)
    sources = [EpochBatches(inputs, targets, cfg.batch_size, cfg.epochs, c.seed) for c in configs]
    val = validation_windows(cfg.data_dir, cfg.context)

    model = init_members(config, [c.seed for c in configs], base).to(device)
    optimizer = StackedAdamW(model, [c.weight_decay for c in configs])
    stack_dir.mkdir(parents=True, exist_ok=True)
    if not (stack_dir / "stack.json").exists():
        atomic_write_json(stack_dir / "stack.json", {"run_dirs": [str(run.path.resolve()) for run in runs],
                                                     "configs": [c.identity() for c in configs]})
    start = 0
    found = load_checkpoint(stack_dir, device)
    if found is not None:
        start, files = found
        model.load_state_dict(files["model"])
        optimizer.load_state_tensors(files["optimizer"])
        log.info("resumed the stack of %d members in %s from step %d", k, stack_dir, start)
    for run, done in zip(runs, written):
        if not done:
            run.trim_metrics(start)

    total = sources[0].steps
    cadence = Cadence(total, cfg.log_every, cfg.eval_every, cfg.checkpoint_every)
    flops_tok = flops_per_token(config, cfg.context)
    params = list(model.parameters())
    bar = tqdm(total=total, initial=start, desc=f"{k} members (stacked)", unit="step", disable=not progress)
    window = LogWindow()
    files = [None if done else open(run.metrics_file, "a") for run, done in zip(runs, written)]
    try:
        def emit(i, record):
            if files[i] is not None:
                files[i].write(json.dumps(record) + "\n")
                files[i].flush()

        for step in range(start, total):
            lrs = [lr_at(step, total, c.lr, c.warmup_frac) for c in configs]
            batch = [s.batch(step) for s in sources]
            x = torch.from_numpy(np.stack([b[0] for b in batch])).to(device)
            y = torch.from_numpy(np.stack([b[1] for b in batch])).to(device)
            with autocast_for(device):  # bf16 matmuls on CUDA, fp32 master weights and moments (as lone runs)
                sums, counts = model.losses(x, y)
            loss = sums / counts
            optimizer.zero_grad()
            loss.sum().backward()
            clip_grad_norm_per_member(params, [c.grad_clip for c in configs])
            optimizer.step(lrs)
            window.add(loss.detach().cpu().numpy(), x.numel())
            done = step + 1
            if cadence.logs(done):
                losses, tps = window.close()  # tokens/s of all members together
                mean_loss = np.mean(losses, axis=0)
                for i in range(k):
                    record = {"step": done, "epoch": done / sources[i].steps_per_epoch, "lr": lrs[i],
                              "train_loss": float(mean_loss[i]), "tokens_per_s": tps / k, "stack": k,
                              "stack_tokens_per_s": tps}
                    if peak_flops:
                        record["mfu"] = tps * flops_tok / peak_flops
                    emit(i, record)
                bar.set_postfix(loss=f"{float(mean_loss.mean()):.3f}", tok_s=f"{tps:,.0f}")
            if cadence.evaluates(done):
                for i, vl in enumerate(evaluate_stack(model, *val)):
                    emit(i, {"step": done, "val_loss": vl})
            if cadence.checkpoints(done):
                save_checkpoint(stack_dir, done, {"model": model.state_dict(), "optimizer": optimizer.state_tensors()})
            bar.update(1)
        bar.close()
        if start < total:  # the final weights, so a kill while members are being written resumes without training
            save_checkpoint(stack_dir, total, {"model": model.state_dict(), "optimizer": optimizer.state_tensors()})
        member = LlamaForCausalLM(config).to(device)
        for i, (c, run) in enumerate(zip(configs, runs)):
            if written[i]:
                continue
            member.load_state_dict(model.member_state_dict(i))
            val_loss = evaluate(member, *val)
            emit(i, {"step": total, "val_loss": val_loss})
            finish_run(c, run, member, val_loss, total, manifest, base)
    finally:
        for f in files:
            if f is not None:
                f.close()
    clear_checkpoints(stack_dir)  # the pointer first, then the checkpoint directories
    shutil.rmtree(stack_dir)


@torch.no_grad()
def evaluate_stack(model: StackedLlama, inputs: np.ndarray, targets: np.ndarray, batch_size: int = 32) -> list[float]:
    """Each member's mean next-token loss on the same windows (periodic validation while training)."""
    model.eval()
    device = model.embed.device
    total, count = torch.zeros(model.k, dtype=torch.float64), 0
    for i in range(0, len(inputs), batch_size):
        x = torch.from_numpy(inputs[i : i + batch_size]).to(device).expand(model.k, -1, -1)
        y = torch.from_numpy(targets[i : i + batch_size]).to(device).expand(model.k, -1, -1)
        with autocast_for(device):
            sums, counts = model.losses(x, y)
        total += sums.double().cpu()
        count += int(counts[0])
    model.train()
    return (total / count).tolist()
