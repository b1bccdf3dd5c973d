"""Training throughput and MFU of the real training loop against the device's measured matmul peak.

Both are measured in the same run, side by side: first the GEMM peak (best of several timed square
matmuls at the thread count training uses), then a short training run of the preset through
train.trainer (the code members are trained with), whose windows log tokens/s and MFU.

    python -m bench.perf.train_throughput --preset cpu-xl --steps 30
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

from plumbing.artifacts import atomic_write_json
from train.corpus import default_corpus
from train.data import DatasetSpec, prepare_dataset
from train.model import flops_per_token, get_shape, llama_config
from train.trainer import TrainConfig, train_member


def measure_gemm_peak(threads: int, n: int = 2048, repeats: int = 8) -> float:
    """Best fp32 FLOP/s of an n x n matmul on `threads` CPU threads."""
    torch.set_num_threads(threads)
    return measure_matmul_peak(torch.device("cpu"), torch.float32, n, repeats)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 8) -> float:
    """Best FLOP/s of an n x n matmul on `device` in `dtype`: the peak MFU is measured against, on the device
    and in the precision training computes in (fp32 on CPU, bf16 under autocast on CUDA), never the CPU's."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inner = 20 if device.type == "cuda" else 1  # a GPU matmul is too short to time alone
    torch.mm(a, b)
    sync()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        sync()
        best = max(best, inner * 2 * n**3 / (time.perf_counter() - t))
    return best


# Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity), FLOP/s: printed beside the measured peak.
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def datasheet_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in DATASHEET_BF16.items() if k in name), None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.perf.train_throughput", description=__doc__,
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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    if device.type == "cuda":  # the trainer computes in bf16 under autocast there (fp32 master weights)
        peak = measure_matmul_peak(device, torch.bfloat16, n=8192)
    else:
        peak = measure_gemm_peak(args.threads)
    device_name, sheet = datasheet_peak(device)
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
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
               "device": device_name, "peak_dtype": "bf16" if device.type == "cuda" else "fp32",
               "datasheet_peak_gflops": sheet / 1e9 if sheet else None,
               "mfu_vs_datasheet": tps * fpt / sheet if sheet else None}
    print(f"| preset | device | threads | measured {figures['peak_dtype']} matmul peak | train tokens/s | achieved "
          "| MFU (target >= 30%) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print(f"| {args.preset} | {device_name} | {args.threads} | {peak / 1e9:.1f} GFLOP/s | {tps:,.0f} | "
          f"{tps * fpt / 1e9:.1f} GFLOP/s | {mfu:.1%} {'PASS' if mfu >= 0.30 else 'BELOW TARGET'} |")
    if sheet:
        print(f"data-sheet bf16 peak of {device_name}: {sheet / 1e12:.0f} TFLOP/s -> MFU {tps * fpt / sheet:.1%}")
    if args.json:
        atomic_write_json(args.json, figures)


if __name__ == "__main__":
    main()
