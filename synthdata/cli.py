"""Command line for synthdata/: `python -m synthdata {generate,annotate,check} --help`."""
from __future__ import annotations

import argparse
import json

from synthdata.annotate import AnnotateConfig
from synthdata.job import GenerateConfig, generate
from plumbing.config_flags import add_flags, from_args
from plumbing.console import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m synthdata", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "generate", help="sample an exact budget of unconditional synthetic tokens from a teacher",
        description="Sample sequences from BOS alone with a teacher (a packed ensemble or one member) into "
                    "Parquet shards + manifest.json in --out. Resumable: after a kill, re-run the same command; "
                    "a finished job is not redone. The same command always gives the same tokens.")
    add_flags(p, GenerateConfig, ["teacher", "tokens", "out", "mode", "replicas", "temperature", "top_p", "max_len",
                                  "seed", "shard_tokens", "address", "endpoint", "max_restarts", "topk", "kv_cache_gib",
                                  "inflight", "hang_timeout_s", "draft", "num_speculative_tokens", "progress"])
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "annotate", help="store a teacher's top-k next-token log-probs over a dataset's training windows",
        description="Run the training windows of a train/ dataset (the first --tokens tokens, cut at --context, as a "
                    "student sees them) through the teacher (vLLM prompt log-probs) and store its --topk most likely "
                    "next tokens, their log-probs and the tail mass at every position in --out, for a soft-label "
                    "student (`python -m distill --annotations OUT --blend B`). Resumable and exactly-once like "
                    "`generate`; a finished job is not redone.")
    add_flags(p, AnnotateConfig, ["teacher", "data_dir", "context", "tokens", "topk", "out", "windows_per_shard",
                                  "address", "kv_cache_gib", "progress"])
    p.set_defaults(func=cmd_annotate)

    p = sub.add_parser("check", help="check a job's samples against the teacher's PyTorch reference",
                       description="Compares the engine's reported log-probs with serve/'s reference ensemble and "
                                   "tests that sampled tokens have the reference's expected log-prob (z-score).")
    p.add_argument("--teacher", required=True, help="the job's teacher directory")
    p.add_argument("--out", required=True, help="the job's output directory")
    p.add_argument("--sequences", type=int, default=48, help="rows to check (default 48)")
    p.add_argument("--member", type=int, help="check against this member alone (a negative control)")
    p.set_defaults(func=cmd_check)
    return parser


def cmd_generate(args) -> dict:
    return generate(from_args(GenerateConfig, args))


def cmd_annotate(args) -> dict:
    from synthdata.annotate import annotate

    return annotate(from_args(AnnotateConfig, args))


def cmd_check(args) -> dict:
    from synthdata.check import sampling_check

    return sampling_check(args.out, args.teacher, args.sequences, member=args.member)


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run_command(build_parser(), argv)))
