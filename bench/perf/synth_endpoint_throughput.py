"""Synthetic generation through a live endpoint vs the offline job, in one run: throughput and identity.

    python -m bench.perf.synth_endpoint_throughput --teacher runs/ensemble --tokens 200000 --replicas 1 --out runs/bench-ep

1. the offline job (`synthdata generate`: the job's own vLLM engines as Ray actors) into OUT/offline;
2. the endpoint (`serve up`: Ray Serve + vLLM's OpenAI server, the same number of replicas) started here on
   127.0.0.1, and the same job through it (`--endpoint`) into OUT/endpoint; then the endpoint is stopped.
Both jobs have the same plan (teacher, budget, shards, seeds), so their shards can be compared file by file:
sequences by their tokens, files by sha256 (a file also holds float log-probabilities, which agree only to
rounding when the two engines batch the requests differently, so equal sequences need not mean equal files).
Tokens/s counts the generation only (engine and endpoint start-up excluded). Writes OUT/result.json and
prints it. Each job is resumable: a re-run of this script re-measures only what is missing (delete OUT to
measure again).
"""
from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pyarrow.parquet as pq

from bench.perf.timing import perf_parser
from plumbing.artifacts import atomic_write_json
from plumbing.console import setup_logging
from synthdata.job import GenerateConfig, generate
from synthdata.shards import read_manifest

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compare_jobs(a: Path, b: Path) -> dict:
    """Shards and sequences of two jobs of the same plan that are identical (files by sha256, rows by tokens)."""
    sa = {s["file"]: s["sha256"] for s in read_manifest(a)["shards"]}
    sb = {s["file"]: s["sha256"] for s in read_manifest(b)["shards"]}
    files = sorted(set(sa) & set(sb))
    rows = same_rows = 0
    for f in files:
        ta = pq.read_table(a / f, columns=["tokens"]).column(0).to_pylist()
        tb = pq.read_table(b / f, columns=["tokens"]).column(0).to_pylist()
        rows += max(len(ta), len(tb))
        same_rows += sum(x == y for x, y in zip(ta, tb))
    return {"shards_compared": len(files), "shards_identical": sum(sa[f] == sb[f] for f in files),
            "sequences_compared": rows, "sequences_identical": same_rows}


def measure(teacher: str, tokens: int, shard_tokens: int, replicas: int, out: Path, seed: int = 0,
            kv_cache_gib: float = 1.0) -> dict:
    from serve.app import DeploymentSettings, EngineSettings, EnsembleConfig, HttpSettings, start_app, stop_app

    common = {"teacher": teacher, "tokens": tokens, "shard_tokens": shard_tokens, "replicas": replicas,
              "seed": seed, "kv_cache_gib": kv_cache_gib}
    log.info("offline job: %d replica(s) of the job's own engines", replicas)
    offline = generate(GenerateConfig(out=str(out / "offline"), **common))
    log.info("endpoint: serve up with %d replica(s), then the same job through it", replicas)
    url = start_app(EnsembleConfig(model_dir=teacher, engine=EngineSettings(kv_cache_gib=kv_cache_gib),
                                   deployment=DeploymentSettings(replicas=replicas), http=HttpSettings(port=free_port())))
    try:
        endpoint = generate(GenerateConfig(out=str(out / "endpoint"), endpoint=url, **common))
    finally:
        stop_app()
    result = {"teacher": str(Path(teacher).resolve()), "tokens": tokens, "shard_tokens": shard_tokens,
              "replicas": replicas, "offline": offline, "endpoint": endpoint,
              "endpoint_over_offline": (endpoint["tokens_per_s"] / offline["tokens_per_s"]
                                        if offline["tokens_per_s"] and endpoint["tokens_per_s"] else None),
              **compare_jobs(out / "offline", out / "endpoint")}
    atomic_write_json(out / "result.json", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = perf_parser("synth_endpoint_throughput", __doc__)
    parser.add_argument("--teacher", required=True, help="packed ensemble (or member) directory")
    parser.add_argument("--tokens", type=int, default=100_000, help="budget of each job (default 100000)")
    parser.add_argument("--shard-tokens", type=int, default=10_000, help="tokens per shard (default 10000)")
    parser.add_argument("--replicas", type=int, default=1, help="engines of the offline job = endpoint replicas (default 1)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache per engine, GiB (default 1)")
    parser.add_argument("--out", required=True, help="directory for both jobs and result.json")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    result = measure(args.teacher, args.tokens, args.shard_tokens, args.replicas, Path(args.out),
                     kv_cache_gib=args.kv_cache_gib)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
