"""How the training benchmarks (train_throughput, train_stack_throughput, gpu_check) measure: tokens/s from a
training run's own metrics windows, and MFU against the device's matmul peak measured in the same run (beside the
vendor's data-sheet peak on a GPU); and the flags and default dataset of their timed runs. Needs only PyTorch and
train/ (gpu_check runs on GPU boxes without vLLM or Ray)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from train.corpus import default_corpus
from train.data import DatasetSpec, prepare_dataset
from train.model import flops_per_token, get_shape, llama_config
from train.run_dir import RunDir


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


def preset_flops_per_token(preset: str, vocab_size: int, context: int) -> float:
    """Training FLOPs per token of a preset (train.model.flops_per_token) at this vocabulary and context."""
    return flops_per_token(llama_config(get_shape(preset), vocab_size, context, 0, 1), context)


def steady_windows(run_dir: Path, key: str) -> list[float]:
    """`key` of every metrics window a training run logged (metrics.jsonl) but the first, which holds one-time
    start-up costs (a run with one window keeps it)."""
    records = [json.loads(line) for line in RunDir(run_dir).metrics_file.read_text().splitlines()]
    windows = [r[key] for r in records if key in r]
    return windows[1:] or windows


def add_training_flags(p) -> None:
    """The flags of a timed training run the training benchmarks share."""
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    p.add_argument("--data-dir", default="data/default", help="dataset (built from the default corpus if missing)")


def ensure_default_dataset(data_dir: str) -> None:
    """--data-dir as add_training_flags promises: built from the default corpus if it holds no dataset."""
    if not (Path(data_dir) / "manifest.json").exists():
        prepare_dataset(DatasetSpec(corpus=(str(default_corpus(".cache/corpus")),)), data_dir)
