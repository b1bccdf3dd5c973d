"""What a soft-label training step costs against a plain one, side by side in one run.

    .venv/bin/python -m bench.perf.kd_step_cost --preset cpu-xs --vocab 2048 --context 256 --batch-size 16 --topk 32

Both contenders train the same model shape on the same random batch with AdamW: "plain" with train/'s next-token
cross-entropy, "kd" with distill/kd.py's blended loss (CE + KL from a top-k teacher with its tail bucket) on every
position. Steps alternate between the two in blocks (`--steps` each, `--repeats` blocks, the order flipped every
block) so that drift in the box's load falls on both; each block's seconds per step is kept, the figure is the
median with the spread. Prints one JSON record with kd_over_plain.
"""
from __future__ import annotations

import functools
import json
import os
import time

import numpy as np
import torch

from bench.perf.timing import interleaved, median_spread, perf_parser
from distill.kd import kd_token_loss
from train.model import get_shape, llama_config
from train.trainer import configure_optimizer, token_loss_on_device


def block(model, optimizer, loss, arrays, steps: int) -> float:
    """Seconds per step over `steps` steps (after the first block, the allocator and caches are warm)."""
    start = time.perf_counter()
    for _ in range(steps):
        loss_sum, n = loss(model, *arrays)
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / n).backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def run(preset: str, vocab: int, context: int, batch_size: int, topk: int, steps: int, repeats: int) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(get_shape(preset), vocab, context, 1, 2, 0))
    optimizer = configure_optimizer(model, 3e-3, 0.8)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, vocab, (batch_size, context)))
    y = torch.from_numpy(rng.integers(0, vocab, (batch_size, context)))
    teacher = torch.log_softmax(torch.randn(batch_size, context, vocab) * 3, -1).topk(topk, -1)
    tail = (1 - teacher.values.exp().sum(-1)).clamp_min(0)
    soft = (teacher.indices.int(), teacher.values, tail, torch.ones(batch_size, context, dtype=torch.bool))
    contenders = {"plain": (token_loss_on_device, (x, y)),
                  "kd": (functools.partial(kd_token_loss, blend=0.5), (x, y, *soft))}
    for loss, arrays in contenders.values():  # warm-up
        block(model, optimizer, loss, arrays, 2)
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _, _, name in interleaved(contenders, repeats):
        loss, arrays = contenders[name]
        seconds[name].append(block(model, optimizer, loss, arrays, steps))
    per_step = {name: {**median_spread(s), "blocks": s} for name, s in seconds.items()}
    return {"preset": preset, "vocab": vocab, "context": context, "batch_size": batch_size, "topk": topk,
            "steps_per_block": steps, "repeats": repeats, "threads": torch.get_num_threads(),
            "cores": len(os.sched_getaffinity(0)), "seconds_per_step": per_step,
            "kd_over_plain": per_step["kd"]["median"] / per_step["plain"]["median"]}


def main() -> None:
    p = perf_parser("kd_step_cost", __doc__)
    p.add_argument("--preset", default="cpu-xs", help="model shape (train/model.py presets; default cpu-xs)")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary (default 2048, the main job's)")
    p.add_argument("--context", type=int, default=256, help="window length (default 256)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per step (default 16)")
    p.add_argument("--topk", type=int, default=32, help="teacher tokens per position (default 32)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed block (default 10)")
    p.add_argument("--repeats", type=int, default=6, help="timed blocks per contender (default 6)")
    args = p.parse_args()
    print(json.dumps(run(args.preset, args.vocab, args.context, args.batch_size, args.topk, args.steps, args.repeats),
                     indent=1))


if __name__ == "__main__":
    main()
