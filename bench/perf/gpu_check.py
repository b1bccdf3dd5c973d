"""The training side on a CUDA GPU, checked rather than assumed: steps, kill -9 and exact resume, stacked K-member
training, and tokens/s + MFU of the paper's 150M preset against the device's measured bf16 matmul peak.

Needs only PyTorch, transformers, safetensors, pyarrow and numpy (no vLLM, no Ray: a GPU box may have neither).
Its data is made by code (random-word documents), so it needs no corpus and no network.

    bash scripts/gpu_check.sh              # on a machine with a CUDA GPU
    bash scripts/gpu_check.sh --dry-run    # anywhere: the same checks at toy size on the CPU (what the tests run)

Prints one JSON object (also written to --json): each check's result and the figures.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from bench.perf.mfu import datasheet_peak, measure_matmul_peak, preset_flops_per_token, steady_windows
from bench.perf.timing import perf_parser
from plumbing.artifacts import atomic_write_json
from train.data import DatasetSpec, prepare_dataset, read_manifest
from train.run_dir import RunDir
from train.trainer import TrainConfig, train_member

REPO = Path(__file__).resolve().parents[2]
WORDS = ("the a of to in and is was for on with as by at from it that this which be are an or have had not but "
         "river city music history science model data energy field water light world system group early").split()


def make_corpus(path: Path, docs: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=int(rng.integers(200, 600)))) + f" {i}."}) + "\n")
    return path


def _member_cmd(cfg: TrainConfig, out: Path) -> list[str]:
    return [sys.executable, "-m", "train", "member", "--data-dir", cfg.data_dir, "--preset", cfg.preset,
            "--tokens", str(cfg.tokens), "--epochs", str(cfg.epochs), "--lr", str(cfg.lr), "--wd", str(cfg.weight_decay),
            "--seed", str(cfg.seed), "--batch-size", str(cfg.batch_size), "--context", str(cfg.context),
            "--checkpoint-every", str(cfg.checkpoint_every), "--out", str(out)]


def check_resume(cfg: TrainConfig, root: Path) -> dict:
    """kill -9 a real `train member` past its first checkpoint, resume it, compare every tensor with an
    uninterrupted run of the same config."""
    reference = root / "uninterrupted"
    train_member(cfg, reference, progress=False)
    killed = root / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(_member_cmd(cfg, killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (killed / "checkpoint.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    was_running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    res = subprocess.run(_member_cmd(cfg, killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        return {"ok": False, "error": res.stderr[-2000:]}
    a, b = load_file(RunDir(reference).model_dir / "model.safetensors"), load_file(RunDir(killed).model_dir / "model.safetensors")
    max_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    # On CUDA, bf16 matmuls may pick different kernels across processes: equality within bf16 noise, not bitwise.
    tolerance = 0.0 if cfg_device().type == "cpu" else 1e-2
    return {"ok": was_running and max_diff <= tolerance, "killed_mid_run": was_running,
            "max_abs_weight_diff": max_diff, "tolerance": tolerance}


def cfg_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_stacked(cfg: TrainConfig, root: Path, k: int) -> dict:
    """K members trained as one stack (train.members' default), each an ordinary member directory; then the
    same K trained as lone runs one after another, for the stack's speed-up (steady-state windows of each)."""
    try:
        from train.members import train_members
    except ImportError as e:  # pragma: no cover - the module is part of train/
        return {"ok": False, "error": str(e)}
    configs = [dataclasses.replace(cfg, seed=s) for s in range(k)]
    results = train_members(configs, root / "stack")
    stacked = float(np.median(steady_windows(Path(results[0]["model_dir"]).parent, "stack_tokens_per_s")))
    lone_dirs = [Path(train_member(c, root / "lone" / f"seed-{c.seed}", progress=False)["model_dir"]).parent
                 for c in configs]
    lone = [float(np.median(steady_windows(d, "tokens_per_s"))) for d in lone_dirs]
    return {"ok": all((Path(r["model_dir"]) / "model.safetensors").exists() for r in results), "k": k,
            "preset": cfg.preset, "val_losses": [r["val_loss"] for r in results],
            "tokens_per_s_all_members": stacked, "lone_tokens_per_s": float(np.median(lone)),
            "stacked_over_lone": stacked / float(np.median(lone))}


def measure_throughput(cfg: TrainConfig, root: Path, peak: float, sheet: float | None) -> dict:
    run = root / ("throughput-compiled" if cfg.compile else "throughput")
    train_member(cfg, run, progress=True, peak_flops=peak)
    windows = steady_windows(run, "tokens_per_s")
    tps = float(np.median(windows))
    fpt = preset_flops_per_token(cfg.preset, read_manifest(cfg.data_dir)["vocab_size"], cfg.context)
    return {"preset": cfg.preset, "compiled": cfg.compile, "windows": len(windows), "tokens_per_s_median": tps,
            "tokens_per_s_spread": [float(min(windows)), float(max(windows))], "flops_per_token": fpt,
            "mfu_vs_measured_peak": tps * fpt / peak, "mfu_vs_datasheet": tps * fpt / sheet if sheet else None}


def main(argv: list[str] | None = None) -> None:
    p = perf_parser("gpu_check", __doc__)
    p.add_argument("--dry-run", action="store_true", help="toy sizes, runs on the CPU (what the tests run)")
    p.add_argument("--preset", default="150m", help="throughput preset (default 150m; --dry-run: cpu-xxs)")
    p.add_argument("--context", type=int, default=1024, help="sequence length (default 1024)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=60, help="timed training steps (default 60)")
    p.add_argument("--k", type=int, default=4, help="members in the stacked check (default 4)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the second throughput run with `train member --compile` (torch.compile; CUDA only)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    device = cfg_device()
    if device.type != "cuda" and not args.dry_run:
        p.error("no CUDA GPU here: run with --dry-run for the CPU version of the checks")
    if args.dry_run:
        args.preset, args.context, args.batch_size, args.steps = "cpu-xxs", 64, 8, 12

    root = Path(tempfile.mkdtemp(prefix="chorus-gpu-check-"))
    try:
        result = run_checks(args, device, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)


def run_checks(args, device: torch.device, root: Path) -> dict:
    tokens_needed = (args.steps + 2) * args.batch_size * args.context
    corpus = make_corpus(root / "corpus.jsonl", docs=max(200, tokens_needed // 300 + 100))
    data = root / "data"
    prepare_dataset(DatasetSpec(corpus=(str(corpus),), vocab_size=512 if args.dry_run else 8192,
                                val_max_tokens=20_000), data)

    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = measure_matmul_peak(device, peak_dtype, n=8192 if device.type == "cuda" else 1024)
    name, sheet = datasheet_peak(device)
    small = TrainConfig(data_dir=str(data), preset="cpu-xs" if not args.dry_run else "cpu-xxs",
                        tokens=40 * args.batch_size * args.context + 1, epochs=1, batch_size=args.batch_size,
                        context=args.context, checkpoint_every=10, log_every=5)
    result = {"device": name, "torch": torch.__version__, "machine": platform.machine(),
              "compute": "bf16 autocast, fp32 master weights and AdamW state" if device.type == "cuda" else "fp32",
              "measured_peak_tflops": peak / 1e12, "datasheet_peak_tflops": sheet / 1e12 if sheet else None}

    def record(key: str, value) -> None:  # --json holds every check done so far: a run cut short keeps them
        result[key] = value
        if args.json:
            atomic_write_json(args.json, result)

    big = TrainConfig(data_dir=str(data), preset=args.preset, tokens=args.steps * args.batch_size * args.context + 1,
                      epochs=1, batch_size=args.batch_size, context=args.context, checkpoint_every=10**9, log_every=5)
    record("throughput", measure_throughput(big, root, peak, sheet))
    record("resume", check_resume(small, root))
    record("stacked", check_stacked(small, root, args.k))
    if device.type == "cuda" and not args.no_compile:  # the same run, torch.compile'd (the first window, which
        # holds the compile, is left out of the median like every run's first); last: it is the slowest to start
        record("throughput_compiled", measure_throughput(dataclasses.replace(big, compile=True), root, peak, sheet))
    result["ok"] = result["resume"]["ok"] and result["stacked"]["ok"]
    record("ok", result["ok"])
    return result


if __name__ == "__main__":
    main()
