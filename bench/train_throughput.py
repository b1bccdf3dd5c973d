"""Training throughput and MFU of the real training loop against this machine's measured fp32 GEMM peak.

Both are measured in the same run, side by side: first the GEMM peak (best of several timed square
matmuls at the thread count training uses), then a short training run of the preset through
train.trainer (the code members are trained with), whose windows log tokens/s and MFU.

    python -m bench.train_throughput --preset cpu-xl --steps 30
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from train.corpus import default_corpus
from train.data import DatasetSpec, prepare_dataset
from train.model import flops_per_token, get_shape, llama_config
from train.trainer import TrainConfig, train_member


def measure_gemm_peak(threads: int, n: int = 2048, repeats: int = 8) -> float:
    """Best fp32 FLOP/s of an n x n matmul on `threads` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-xl", help="model preset (default cpu-xl, the largest CPU preset)")
    p.add_argument("--steps", type=int, default=30, help="training steps to time (default 30)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    p.add_argument("--data-dir", default="data/default", help="dataset (built from the default corpus if missing)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    if not (Path(args.data_dir) / "manifest.json").exists():
        prepare_dataset(DatasetSpec(corpus=(str(default_corpus(".cache/corpus")),)), args.data_dir)
    peak = measure_gemm_peak(args.threads)
    tokens = args.steps * args.batch_size * args.context + 1
    cfg = TrainConfig(data_dir=args.data_dir, preset=args.preset, tokens=tokens, epochs=1, batch_size=args.batch_size,
                      context=args.context, log_every=5, checkpoint_every=10**9, threads=args.threads)
    run_dir = Path(tempfile.mkdtemp(prefix="chorus-train-bench-"))
    try:
        train_member(cfg, run_dir, progress=True, peak_flops=peak)
        records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    windows = [r for r in records if "tokens_per_s" in r][1:]  # the first window holds one-time start-up costs
    tps = float(np.median([r["tokens_per_s"] for r in windows]))
    from train.data import read_manifest
    m = read_manifest(args.data_dir)
    fpt = flops_per_token(llama_config(get_shape(args.preset), m["vocab_size"], args.context, 0, 1), args.context)
    mfu = tps * fpt / peak
    figures = {"preset": args.preset, "non_embedding_params": get_shape(args.preset).non_embedding_params(),
               "threads": args.threads, "gemm_peak_gflops": peak / 1e9, "train_tokens_per_s": tps,
               "flops_per_token": fpt, "achieved_gflops": tps * fpt / 1e9, "mfu": mfu, "target_mfu": 0.30,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__}
    print("| preset | threads | fp32 GEMM peak | train tokens/s | achieved | MFU (target >= 30%) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| {args.preset} | {args.threads} | {peak / 1e9:.1f} GFLOP/s | {tps:,.0f} | {tps * fpt / 1e9:.1f} GFLOP/s "
          f"| {mfu:.1%} {'PASS' if mfu >= 0.30 else 'BELOW TARGET'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
