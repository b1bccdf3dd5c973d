"""Command line for synthdata/: `python -m synthdata {generate,annotate,check} --help`."""
from __future__ import annotations

import argparse
import json

from synthdata.job import MODES, GenerateConfig, generate
from plumbing.console import exit_on, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m synthdata", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "generate", help="sample an exact budget of unconditional synthetic tokens from a teacher",
        description="Sample sequences from BOS alone with a teacher (a packed ensemble or one member) into "
                    "Parquet shards + manifest.json in --out. Resumable: after a kill, re-run the same command; "
                    "a finished job is not redone. The same command always gives the same tokens.")
    p.add_argument("--teacher", required=True, help="teacher model directory (serve/'s packed ensemble, or a member)")
    p.add_argument("--tokens", type=int, required=True, help="exact budget of stored tokens (BOS and EOS included)")
    p.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    p.add_argument("--mode", choices=MODES, default="ensemble",
                   help="ensemble: sample the logit-averaged ensemble (default); mixture: each sequence from one "
                        "member drawn at random (one engine per member)")
    p.add_argument("--replicas", type=int, default=1, help="engine replicas in parallel (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1: off)")
    p.add_argument("--max-len", type=int, help="tokens per sequence, BOS included (default: the teacher's context)")
    p.add_argument("--seed", type=int, default=0, help="job seed: fixes every shard's and sequence's seed (default 0)")
    p.add_argument("--shard-tokens", type=int, default=100_000, help="tokens per shard, the unit of resume (default 100000)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray); every node must see --teacher "
                                     "and --out at the same paths (a shared filesystem)")
    p.add_argument("--endpoint", help="base URL of a live Chorus endpoint (`python -m serve up`) serving --teacher: "
                                      "sample through it (one request per sequence, with its seed) instead of "
                                      "starting engines; --replicas shards at a time; key from $CHORUS_API_KEY")
    p.add_argument("--max-restarts", type=int, default=4,
                   help="replicas restarted (or endpoint failures retried) per job after one is lost (default 4)")
    p.add_argument("--topk", type=int, default=0,
                   help="also store the teacher's k most likely next tokens and their log-probs at every position "
                        "(soft labels for `python -m distill --blend`; temperature 1, no top-p); default 0: off")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache per engine on CPU, GiB (default 1)")
    p.add_argument("--inflight", type=int, default=512,
                   help="sequences kept in each engine's queue (endpoint: requests in flight per slot); default 512")
    p.add_argument("--hang-timeout-s", type=float, default=300.0,
                   help="an engine call unanswered this long is a hung engine, replaced like a dead one (default 300)")
    p.add_argument("--draft", help="speculative decoding: this model (the distilled student, a member, any Llama "
                                   "sharing the tokenizer) drafts, the teacher verifies; samples keep the teacher's "
                                   "distribution (other tokens than without it, so another job)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="tokens the draft proposes per step (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "annotate", help="store a teacher's top-k next-token log-probs over a dataset's training windows",
        description="Run the training windows of a train/ dataset (the first --tokens tokens, cut at --context, as a "
                    "student sees them) through the teacher (vLLM prompt log-probs) and store its --topk most likely "
                    "next tokens, their log-probs and the tail mass at every position in --out, for a soft-label "
                    "student (`python -m distill --annotations OUT --blend B`). Resumable and exactly-once like "
                    "`generate`; a finished job is not redone.")
    p.add_argument("--teacher", required=True, help="teacher model directory (a packed ensemble, or a member)")
    p.add_argument("--data-dir", required=True, help="train/ dataset directory (`python -m train data`)")
    p.add_argument("--context", type=int, required=True, help="the student's context (window length)")
    p.add_argument("--tokens", type=int, required=True,
                   help="training tokens to annotate: the student's budget D (a smaller D reuses a prefix)")
    p.add_argument("--topk", type=int, default=32, help="teacher tokens kept per position (default 32)")
    p.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    p.add_argument("--windows-per-shard", type=int, default=256, help="windows per shard, the unit of resume (default 256)")
    p.add_argument("--address", help="Ray cluster address (default: a private local Ray)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache of the engine on CPU, GiB (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    cfg = GenerateConfig(teacher=args.teacher, tokens=args.tokens, out=args.out, mode=args.mode,
                         replicas=args.replicas, temperature=args.temperature, top_p=args.top_p,
                         max_len=args.max_len, seed=args.seed, shard_tokens=args.shard_tokens,
                         address=args.address, kv_cache_gib=args.kv_cache_gib, progress=not args.no_progress,
                         endpoint=args.endpoint, max_restarts=args.max_restarts, topk=args.topk,
                         inflight=args.inflight, hang_timeout_s=args.hang_timeout_s, draft=args.draft,
                         num_speculative_tokens=args.num_speculative_tokens)
    return generate(cfg)


def cmd_annotate(args) -> dict:
    from synthdata.annotate import AnnotateConfig, annotate

    return annotate(AnnotateConfig(teacher=args.teacher, data_dir=args.data_dir, out=args.out, context=args.context,
                                   tokens=args.tokens, topk=args.topk, windows_per_shard=args.windows_per_shard,
                                   kv_cache_gib=args.kv_cache_gib, address=args.address,
                                   progress=not args.no_progress))


def cmd_check(args) -> dict:
    from synthdata.check import sampling_check

    return sampling_check(args.out, args.teacher, args.sequences, member=args.member)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    with exit_on():
        summary = args.func(args)
    print(json.dumps(summary))
