"""Synthetic-data job throughput against the raw engine, on one teacher, in one run.

    .venv/bin/python -m bench.perf.synth_throughput --teacher DIR --tokens 40000 --work /tmp/synth-bench

1. raw: one offline `LLM.generate` call (same engine settings, same sampling, no logprobs, no Ray) over
   enough BOS-only prompts for the budget, in a fresh process with the first replica's cores, WITHOUT
   per-request seeds: what a plain vLLM user runs;
2. raw-seeded: the same with one seed per sequence, as the job sets them (what exactly-once costs the engine);
3. the job (`synthdata.job.generate`) with each `--replicas` count, each into a fresh directory (it keeps the
   engine's queue full across shards; `aborted_sequences` counts what it sampled beyond a shard's quota);
4. with `--topk K`: the job at the first replica count storing the teacher's top-K at every position too (what
   soft-label distillation costs the job: `topk_over_job`), and the bytes each stored token takes on disk with
   and without the top-K columns.

Every contender runs `--repeats` times (default 3); the order alternates between repeats (forward, then
reversed, ...) so that none always runs first on a box whose load drifts. Each figure is the median, with the
spread (min, max) and every run kept. Speeds count generated tokens (BOS excluded) over generation wall time;
engine start-up is excluded everywhere (the job's clock starts once its engines are up). Prints one JSON record.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

from bench.perf.timing import in_fresh_process, interleaved, perf_parser
from plumbing.console import setup_logging
from synthdata.engine import SamplingSettings, engine_env
from synthdata.job import GenerateConfig, engine_cores, generate
from synthdata.shards import read_manifest
from synthdata.teacher import read_teacher

log = logging.getLogger(__name__)


def raw_generate(teacher_dir: str, bos: int, n_sequences: int, settings: SamplingSettings, seed: int,
                 seeded: bool) -> tuple[int, float]:
    """In a fresh process: one LLM.generate over n BOS-only prompts (one seed per sequence if `seeded`);
    (generated tokens, seconds)."""
    os.environ.update(engine_env(1.0, engine_cores(1)[0]))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=teacher_dir, dtype="float32", enforce_eager=True, max_model_len=settings.max_len, seed=seed,
              disable_log_stats=True)
    params = [SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                             max_tokens=settings.max_len - 1, seed=seed + j if seeded else None)
              for j in range(n_sequences)]
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=[bos])] * n_sequences, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs), seconds


def measure_raw(teacher_dir: str, tokens: int, settings: SamplingSettings, seeded: bool) -> dict:
    teacher = read_teacher(teacher_dir)
    n = math.ceil(tokens / settings.max_len)
    generated, seconds = in_fresh_process(raw_generate, str(teacher.path), teacher.bos_token_id, n, settings, 0, seeded)
    return {"sequences": n, "generated_tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds}


def measure_job(teacher_dir: str, tokens: int, replicas: int, out: Path, shard_tokens: int, topk: int = 0) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    summary = generate(GenerateConfig(teacher=teacher_dir, tokens=tokens, out=str(out), replicas=replicas,
                                      shard_tokens=shard_tokens, progress=False, topk=topk))
    manifest = read_manifest(out)
    generated = summary["tokens"] - summary["sequences"]  # BOS is stored, not generated
    assert summary["tokens"] == manifest["job"]["tokens"]
    disk = sum((out / s["file"]).stat().st_size for s in manifest["shards"])
    return {"replicas": replicas, "topk": topk, "shards": summary["shards"], "sequences": summary["sequences"],
            "generated_tokens": generated, "seconds": summary["wall_s"], "tokens_per_s": generated / summary["wall_s"],
            "bytes_per_stored_token": disk / summary["tokens"],
            "aborted_sequences": summary.get("aborted_sequences"), "top_ups": summary.get("top_ups")}


def summary(runs: list[dict]) -> dict:
    rates = sorted(r["tokens_per_s"] for r in runs)
    return {"tokens_per_s": rates[len(rates) // 2], "spread_tokens_per_s": [rates[0], rates[-1]], "runs": runs}


def run(teacher: str, tokens: int, work: Path, replicas: list[int], shard_tokens: int | None, repeats: int = 3,
        topk: int = 0) -> dict:
    settings = SamplingSettings(max_len=read_teacher(teacher).context)
    shard_tokens = shard_tokens or math.ceil(tokens / 4)
    contenders = {"raw": lambda: measure_raw(teacher, tokens, settings, seeded=False),
                  "raw-seeded": lambda: measure_raw(teacher, tokens, settings, seeded=True)}
    for r in replicas:
        contenders[f"job-{r}"] = lambda r=r: measure_job(teacher, tokens, r, work / f"replicas-{r}", shard_tokens)
    if topk:
        r = replicas[0]
        contenders[f"job-{r}-topk{topk}"] = lambda: measure_job(teacher, tokens, r, work / "topk", shard_tokens, topk)
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for repeat, position, name in interleaved(contenders, repeats):
        runs[name].append({**contenders[name](), "repeat": repeat, "position": position})
        log.info("repeat %d, %s: %.0f tokens/s", repeat, name, runs[name][-1]["tokens_per_s"])
    figures = {name: summary(r) for name, r in runs.items()}
    rate = {name: f["tokens_per_s"] for name, f in figures.items()}
    first_job = f"job-{replicas[0]}"
    extra = {}
    if topk:
        with_topk = figures[f"{first_job}-topk{topk}"]
        extra = {"topk": topk, "topk_over_job": rate[f"{first_job}-topk{topk}"] / rate[first_job],
                 "bytes_per_stored_token": {"plain": figures[first_job]["runs"][0]["bytes_per_stored_token"],
                                            f"topk{topk}": with_topk["runs"][0]["bytes_per_stored_token"]}}
    return {**extra, "teacher": str(Path(teacher).resolve()), "tokens": tokens, "shard_tokens": shard_tokens,
            "cores": len(os.sched_getaffinity(0)), "repeats": repeats, "figures": figures,
            "seeding_cost": 1 - rate["raw-seeded"] / rate["raw"],  # share of raw throughput per-sequence seeds cost
            "job_over_raw": rate[first_job] / rate["raw"], "job_over_raw_seeded": rate[first_job] / rate["raw-seeded"],
            "scaling": {r: rate[f"job-{r}"] / rate[first_job] for r in replicas}}


def main() -> None:
    p = perf_parser("synth_throughput", __doc__)
    p.add_argument("--teacher", required=True, help="teacher model directory (packed ensemble or member)")
    p.add_argument("--tokens", type=int, default=40_000, help="token budget of each measurement (default 40000)")
    p.add_argument("--work", required=True, help="scratch directory for the jobs' output")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="replica counts to run (default 1 2)")
    p.add_argument("--shard-tokens", type=int, help="shard quota (default: a quarter of --tokens)")
    p.add_argument("--repeats", type=int, default=3, help="runs of every contender; median and spread (default 3)")
    p.add_argument("--topk", type=int, default=0,
                   help="also run the job storing the teacher's top-K (synthdata generate --topk); default 0: off")
    args = p.parse_args()
    if min(args.tokens, args.repeats, *args.replicas) < 1:
        p.error("--tokens, --repeats and --replicas must be >= 1")
    setup_logging()
    print(json.dumps(run(args.teacher, args.tokens, Path(args.work), args.replicas, args.shard_tokens, args.repeats,
                         args.topk), indent=1))


if __name__ == "__main__":
    main()
