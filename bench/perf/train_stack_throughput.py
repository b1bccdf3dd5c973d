"""K members trained stacked (train/stacked.py) vs the same K as separate runs, side by side in one run.

For each preset, K members of one configuration are trained three ways, each for `--steps` steps:
  stacked     one process, one stack, all cores (what `train members` does by default);
  sequential  K lone runs one after another, all cores each (train_member);
  ray         K lone runs as Ray tasks, one per CPU at a time (`train members --separate`).
Throughput is steady state, from the runs' own metrics windows (the first window, with one-time start-up costs,
is dropped): stacked = the stack's tokens/s; sequential = a lone run's tokens/s (one run at a time); ray =
runs at once x a lone run's tokens/s (the runs of one wave overlap). MFU of the stacked run is measured against
this machine's fp32 GEMM peak (bench/perf/mfu.measure_gemm_peak) in the same run, per window: median
and spread. `--compare-vmap` also times one forward+backward of the hand-written stack against
torch.func (stack_module_state + functional_call + vmap over HF LlamaForCausalLM).

    python -m bench.perf.train_stack_throughput --data-dir data/default
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.perf.mfu import (add_training_flags, ensure_default_dataset, measure_gemm_peak, preset_flops_per_token,
                            steady_windows)
from bench.perf.timing import perf_parser
from plumbing.artifacts import atomic_write_json
from plumbing.ray_session import ray_session
from train.data import read_manifest
from train.members import run_trainings
from train.model import get_shape, llama_config
from train.stacked import train_stack
from train.trainer import TrainConfig, train_member

PRESETS = ("cpu-xxs", "cpu-xs", "cpu-s", "cpu-m")
TARGETS = {"cpu-xxs": 2.0, "cpu-xs": 2.0, "cpu-s": 1.3, "cpu-m": 1.0}


def compare_vmap(preset: str, k: int, batch: int, context: int, vocab: int, repeats: int = 3) -> dict[str, float]:
    """Seconds per forward+backward of k members: hand-written stack vs torch.func vmap over HF Llama."""
    import torch.nn.functional as F
    from torch.func import functional_call, stack_module_state, vmap
    from transformers import LlamaForCausalLM

    from train.stacked import init_members

    config = llama_config(get_shape(preset), vocab, context, 1, 2, 0)
    ids = torch.randint(0, vocab, (k, batch, context))
    stack = init_members(config, list(range(k)))
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(LlamaForCausalLM(config))
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def one_loss(p, b, x):
        logits = functional_call(base, (p, b), (x,), {"use_cache": False}).logits
        return F.cross_entropy(logits.flatten(0, 1), x.flatten())

    def hand():
        sums, counts = stack.losses(ids, ids)
        (sums / counts).sum().backward()
        stack.zero_grad(set_to_none=True)

    def vmapped():
        vmap(one_loss)(params, buffers, ids).sum().backward()
        for p in params.values():
            p.grad = None

    out = {}
    for name, fn in (("hand", hand), ("vmap", vmapped)):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = min(times)
    return out


def main(argv: list[str] | None = None) -> None:
    p = perf_parser("train_stack_throughput", __doc__)
    p.add_argument("--presets", nargs="+", default=list(PRESETS), help=f"presets (default {' '.join(PRESETS)})")
    p.add_argument("--k", type=int, default=4, help="members (default 4)")
    p.add_argument("--steps", type=int, default=12, help="steps per run (default 12: 4 windows of 3, 3 timed)")
    p.add_argument("--log-every", type=int, default=3, help="steps per timed window (default 3)")
    add_training_flags(p)
    p.add_argument("--compare-vmap", action="store_true", help="also time torch.func vmap against the hand-written stack")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.steps // args.log_every < 4:
        p.error("need at least 4 windows (--steps >= 4 x --log-every): the first is dropped, >= 3 are timed")

    ensure_default_dataset(args.data_dir)
    manifest = read_manifest(args.data_dir)
    cpus = os.cpu_count() or 1
    peak = measure_gemm_peak(args.threads)
    torch.set_num_threads(args.threads)
    tokens = args.steps * args.batch_size * args.context + 1
    rows, root = [], Path(tempfile.mkdtemp(prefix="chorus-stack-bench-"))
    try:
        with ray_session(None, cpus):
            for preset in args.presets:
                base = TrainConfig(data_dir=args.data_dir, preset=preset, tokens=tokens, epochs=1,
                                   batch_size=args.batch_size, context=args.context, log_every=args.log_every,
                                   checkpoint_every=10**9)
                configs = [dataclasses.replace(base, seed=s, threads=args.threads) for s in range(args.k)]
                out = root / preset
                t = time.perf_counter()
                train_stack(configs, [out / "stacked" / f"seed-{s}" for s in range(args.k)], progress=True, peak_flops=peak)
                wall_stacked = time.perf_counter() - t
                stacked = steady_windows(out / "stacked" / "seed-0", "stack_tokens_per_s")
                mfu = steady_windows(out / "stacked" / "seed-0", "mfu")

                t = time.perf_counter()
                for c in configs:
                    train_member(c, out / "sequential" / f"seed-{c.seed}", progress=False)
                wall_seq = time.perf_counter() - t
                sequential = [w for c in configs
                              for w in steady_windows(out / "sequential" / f"seed-{c.seed}", "tokens_per_s")]

                t = time.perf_counter()
                ray_configs = [dataclasses.replace(c, threads=0) for c in configs]  # run_trainings gives each its share
                run_trainings(ray_configs, [out / "ray" / f"seed-{c.seed}" for c in configs], desc=f"{preset} ray")
                wall_ray = time.perf_counter() - t
                per_run = [w for c in configs for w in steady_windows(out / "ray" / f"seed-{c.seed}", "tokens_per_s")]
                concurrent = min(args.k, cpus)

                fpt = preset_flops_per_token(preset, manifest["vocab_size"], args.context)
                row = {"preset": preset, "non_embedding_params": get_shape(preset).non_embedding_params(),
                       "stacked_tokens_per_s": statistics.median(stacked),
                       "stacked_windows": stacked,
                       "sequential_tokens_per_s": statistics.median(sequential),
                       "ray_tokens_per_s": concurrent * statistics.median(per_run), "ray_concurrent_runs": concurrent,
                       "wall_s": {"stacked": wall_stacked, "sequential": wall_seq, "ray": wall_ray},
                       "mfu_median": statistics.median(mfu), "mfu_min": min(mfu), "mfu_max": max(mfu),
                       "mfu_windows": len(mfu), "flops_per_token": fpt, "target": TARGETS.get(preset)}
                row["speedup_vs_sequential"] = row["stacked_tokens_per_s"] / row["sequential_tokens_per_s"]
                row["speedup_vs_ray"] = row["stacked_tokens_per_s"] / row["ray_tokens_per_s"]
                if args.compare_vmap:
                    row["fwd_bwd_s"] = compare_vmap(preset, args.k, args.batch_size, args.context, manifest["vocab_size"])
                rows.append(row)
                print(json.dumps(row), flush=True)  # each preset's figures as soon as they exist
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nK = {args.k} members, batch {args.batch_size} x context {args.context}, {args.steps} steps, "
          f"{args.threads} threads on {cpus} CPUs; fp32 GEMM peak {peak / 1e9:.1f} GFLOP/s")
    print("| preset | stacked tok/s | sequential tok/s | ray tok/s | stacked / best separate (target) "
          "| MFU stacked: median [min-max], windows | wall s stacked / seq / ray |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        best = max(r["sequential_tokens_per_s"], r["ray_tokens_per_s"])
        ratio = r["stacked_tokens_per_s"] / best
        verdict = "meets" if r["target"] is None or ratio >= r["target"] else "MISSES"
        w = r["wall_s"]
        print(f"| {r['preset']} | {r['stacked_tokens_per_s']:,.0f} | {r['sequential_tokens_per_s']:,.0f} | "
              f"{r['ray_tokens_per_s']:,.0f} | {ratio:.2f}x (>= {r['target']}x: {verdict}) | "
              f"{r['mfu_median']:.1%} [{r['mfu_min']:.1%}-{r['mfu_max']:.1%}], {r['mfu_windows']} | "
              f"{w['stacked']:.0f} / {w['sequential']:.0f} / {w['ray']:.0f} |")
    if args.compare_vmap:
        print("\n| preset | fwd+bwd hand-written stack | torch.func vmap over HF | vmap / hand |\n|---|---:|---:|---:|")
        for r in rows:
            f = r["fwd_bwd_s"]
            print(f"| {r['preset']} | {f['hand'] * 1e3:.0f} ms | {f['vmap'] * 1e3:.0f} ms | {f['vmap'] / f['hand']:.2f}x |")
    if args.json:
        atomic_write_json(args.json, {"peak_flops": peak, "rows": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
