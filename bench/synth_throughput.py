"""Synthetic-data job throughput against the raw engine, on one teacher, in one run.

    .venv/bin/python -m bench.synth_throughput --teacher DIR --tokens 40000 --work /tmp/synth-bench

1. raw: one offline `LLM.generate` call (same engine settings, same sampling, no logprobs, no Ray) over
   enough BOS-only prompts for the budget, in a fresh process with all the machine's cores;
2. the job (`synthdata.job.generate`) with 1 replica, then with 2, each into a fresh directory.

Speeds count generated tokens (BOS excluded) over generation wall time; engine start-up is excluded from
both (the job's clock starts once its engines are up). Prints one JSON record.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

from synthdata.engine import SamplingSettings, engine_env
from synthdata.job import GenerateConfig, engine_cores, generate, read_manifest
from synthdata.teacher import read_teacher

log = logging.getLogger(__name__)


def raw_generate(teacher_dir: str, bos: int, n_sequences: int, settings: SamplingSettings, seed: int,
                 result: mp.Queue) -> None:
    """In a fresh process: one LLM.generate over n BOS-only prompts; put (generated tokens, seconds)."""
    os.environ.update(engine_env(1.0, engine_cores(1)[0]))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=teacher_dir, dtype="float32", enforce_eager=True, max_model_len=settings.max_len, seed=seed,
              disable_log_stats=True)
    params = [SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                             max_tokens=settings.max_len - 1, seed=seed + j) for j in range(n_sequences)]
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=[bos])] * n_sequences, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    result.put((sum(len(o.outputs[0].token_ids) for o in outputs), seconds))


def measure_raw(teacher_dir: str, tokens: int, settings: SamplingSettings) -> dict:
    teacher = read_teacher(teacher_dir)
    n = math.ceil(tokens / settings.max_len)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=raw_generate, args=(str(teacher.path), teacher.bos_token_id, n, settings, 0, queue))
    proc.start()
    generated, seconds = queue.get()
    proc.join()
    return {"sequences": n, "generated_tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds}


def measure_job(teacher_dir: str, tokens: int, replicas: int, out: Path, shard_tokens: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    summary = generate(GenerateConfig(teacher=teacher_dir, tokens=tokens, out=str(out), replicas=replicas,
                                      shard_tokens=shard_tokens, progress=False))
    manifest = read_manifest(out)
    generated = summary["tokens"] - summary["sequences"]  # BOS is stored, not generated
    assert summary["tokens"] == manifest["job"]["tokens"]
    return {"replicas": replicas, "shards": summary["shards"], "sequences": summary["sequences"],
            "generated_tokens": generated, "seconds": summary["wall_s"], "tokens_per_s": generated / summary["wall_s"]}


def run(teacher: str, tokens: int, work: Path, replicas: list[int], shard_tokens: int | None) -> dict:
    settings = SamplingSettings(max_len=read_teacher(teacher).context)
    shard_tokens = shard_tokens or math.ceil(tokens / 4)
    raw = measure_raw(teacher, tokens, settings)
    log.info("raw engine: %.0f tokens/s", raw["tokens_per_s"])
    jobs = []
    for r in replicas:
        jobs.append(measure_job(teacher, tokens, r, work / f"replicas-{r}", shard_tokens))
        log.info("job, %d replica(s): %.0f tokens/s", r, jobs[-1]["tokens_per_s"])
    return {"teacher": str(Path(teacher).resolve()), "tokens": tokens, "shard_tokens": shard_tokens,
            "cores": len(os.sched_getaffinity(0)), "raw": raw, "jobs": jobs,
            "job_over_raw": jobs[0]["tokens_per_s"] / raw["tokens_per_s"],
            "scaling": {j["replicas"]: j["tokens_per_s"] / jobs[0]["tokens_per_s"] for j in jobs}}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.synth_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher model directory (packed ensemble or member)")
    p.add_argument("--tokens", type=int, default=40_000, help="token budget of each measurement (default 40000)")
    p.add_argument("--work", required=True, help="scratch directory for the jobs' output")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="replica counts to run (default 1 2)")
    p.add_argument("--shard-tokens", type=int, help="shard quota (default: a quarter of --tokens)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(run(args.teacher, args.tokens, Path(args.work), args.replicas, args.shard_tokens), indent=1))


if __name__ == "__main__":
    main()
