"""Training throughput and MFU of the real training loop against the device's measured matmul peak.

Both are measured in the same run, side by side: first the GEMM peak (best of several timed square
matmuls at the thread count training uses), then a short training run of the preset through
train.trainer (the code members are trained with), whose windows log tokens/s and MFU.

    python -m bench.perf.train_throughput --preset cpu-xl --steps 30
"""
from __future__ import annotations

import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.perf.mfu import (add_training_flags, datasheet_peak, ensure_default_dataset, measure_gemm_peak,
                            measure_matmul_peak, preset_flops_per_token, steady_windows)
from bench.perf.timing import perf_parser
from plumbing.artifacts import atomic_write_json
from train.data import read_manifest
from train.model import get_shape
from train.trainer import TrainConfig, train_member


def main(argv: list[str] | None = None) -> None:
    p = perf_parser("train_throughput", __doc__)
    p.add_argument("--preset", default="cpu-xl", help="model preset (default cpu-xl, the largest CPU preset)")
    p.add_argument("--steps", type=int, default=30, help="training steps to time (default 30)")
    add_training_flags(p)
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    ensure_default_dataset(args.data_dir)
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
        tps = float(np.median(steady_windows(run_dir, "tokens_per_s")))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    fpt = preset_flops_per_token(args.preset, read_manifest(args.data_dir)["vocab_size"], args.context)
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
