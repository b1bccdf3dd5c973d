"""Command line for serve/: `python -m serve {pack,up} --help`."""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from serve.app import LIMIT_FLAGS, EnsembleConfig, ServeError
from serve.draft import DRAFT_SAMPLING
from serve.pack import COMBINE_RULES, pack_ensemble
from plumbing.console import exit_on, setup_logging

log = logging.getLogger(__name__)


def cmd_pack(args) -> None:
    out = pack_ensemble(args.members, args.out, combine=args.combine)
    print(out)


API_KEY_ENV = "CHORUS_API_KEY"


def api_key_from(args) -> str | None:
    """The endpoint's key: --api-key-file (a file holding the key), else --api-key, else $CHORUS_API_KEY.

    A key on the command line is readable by every user of the machine (`ps`); a file or the environment is not."""
    if args.api_key_file and args.api_key:
        raise ServeError("give the API key once: --api-key-file or --api-key, not both")
    if args.api_key_file:
        path = Path(args.api_key_file)
        try:
            key = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ServeError(f"--api-key-file {path}: cannot read the key ({e})") from e
        if not key or any(c.isspace() for c in key):
            raise ServeError(f"--api-key-file {path}: expected one key on one line, found "
                             f"{'nothing' if not key else 'whitespace inside it'}")
        return key
    if args.api_key:
        log.warning("--api-key is visible to every user of this machine (ps, /proc): prefer $%s or --api-key-file",
                    API_KEY_ENV)
        return args.api_key
    return os.environ.get(API_KEY_ENV, "").strip() or None


def cmd_up(args) -> None:
    from serve.app import EnsembleConfig, start_app, stop_app

    config = EnsembleConfig(model_dir=args.model, served_model_name=args.name, replicas=args.replicas,
                            api_key=api_key_from(args), host=args.host, port=args.port,
                            allow_unauthenticated=args.allow_unauthenticated, max_model_len=args.max_model_len,
                            kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)), max_num_seqs=args.max_num_seqs,
                            enforce_eager=not args.compile, max_replicas_per_node=args.max_replicas_per_node,
                            draft=args.draft, num_speculative_tokens=args.num_speculative_tokens,
                            draft_max_batch=args.draft_max_batch, draft_sampling=args.draft_sampling,
                            **{name: getattr(args, name) for name in LIMIT_FLAGS})
    try:
        url = start_app(config, address=args.address)  # a start cut short by Ctrl-C/SIGTERM tears itself down
        print(f"serving {config.model_name!r} at {url}/v1 (Ctrl-C or SIGTERM to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        finally:
            print("stopping: replicas, engines, Serve and the Ray this command started", flush=True)
            stop_app()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (plumbing.console.exit_on): a requested stop, not a failure
        print("stopped", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pack", help="pack K member directories into one ensemble directory",
                       description="Members must share architecture, weight shapes and tokenizer. The result is a "
                                   "Hugging Face model directory that vLLM (with this package installed) serves as one model.")
    p.add_argument("--members", nargs="+", required=True, help="member model directories (e.g. runs/members/seed-0/model)")
    p.add_argument("--out", required=True, help="ensemble directory to write")
    p.add_argument("--combine", choices=COMBINE_RULES, default="logits",
                   help="logits: softmax of the mean logits (the paper's ensemble, default); probs: mean of probabilities")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("up", help="serve an ensemble (or member) directory as an OpenAI-compatible endpoint on Ray Serve",
                       description="Starts Ray (local unless --address), Ray Serve and N replicas, each one vLLM engine; "
                                   "blocks until Ctrl-C or SIGTERM, then stops all of it.")
    p.add_argument("--model", required=True, help="ensemble directory from `pack`, or a plain member directory")
    p.add_argument("--name", help="served model name (default: the directory's name)")
    p.add_argument("--replicas", type=int, default=1, help="engine replicas (default 1)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default 127.0.0.1; any other needs a key or --allow-unauthenticated)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--api-key-file", help="file holding the key that every route but /health requires "
                                          "('Authorization: Bearer KEY'); or set $CHORUS_API_KEY")
    p.add_argument("--api-key", help="the key itself (visible to other users in `ps`: prefer the two above)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve a --host other than loopback without a key (refused otherwise)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray); every node must see --model "
                                     "at the same path (a shared filesystem)")
    p.add_argument("--max-replicas-per-node", type=int,
                   help="on a cluster: at most this many replicas per node (1: each replica on its own node, so a "
                        "lost node takes one replica)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache per replica in GiB (default 1)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences batched at once per replica (default 64)")
    p.add_argument("--compile", action="store_true", help="let vLLM torch.compile the model (slow start; default eager)")
    spec = p.add_argument_group("speculative decoding", "a small model sharing the ensemble's tokenizer proposes tokens, "
                                "the ensemble verifies several in one pass; the output is distributed exactly as "
                                "without it (greedy output identical). Pays at low concurrency with a good draft "
                                "(README, 'Speculative decoding')")
    spec.add_argument("--draft", help="draft model directory: the distilled student from `distill` (intended), a "
                                      "member, or any Llama sharing the tokenizer (another tokenizer is refused)")
    spec.add_argument("--num-speculative-tokens", type=int, default=4,
                      help="tokens the draft proposes per step (default 4)")
    spec.add_argument("--draft-max-batch", type=int,
                      help="speculate only while at most this many sequences run; a fuller batch decodes without "
                           "the draft (default: always speculate)")
    spec.add_argument("--draft-sampling", choices=DRAFT_SAMPLING, default="greedy",
                      help="greedy (default): the draft's most likely token, accepted with the ensemble's probability "
                           "of it; seeded requests stay reproducible. probabilistic: a draw from the draft, accepted "
                           "far more often when sampling with a close draft, but vLLM draws it without the request's "
                           "seed (the output distribution is exact either way)")
    limits = p.add_argument_group("limits", "what one request may ask for (past a limit: a 4xx naming it and the flag "
                                            "that raises it), how long it may take, and how many may wait")
    d = EnsembleConfig(model_dir="")
    limits.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                        help=f"request body size (413 past it; default {d.max_body_bytes})")
    limits.add_argument("--max-n", type=int, default=d.max_n, help=f"n and best_of per request (default {d.max_n})")
    limits.add_argument("--max-prompts", type=int, default=d.max_prompts,
                        help=f"prompts (or conversations) in one request (default {d.max_prompts})")
    limits.add_argument("--max-request-tokens", type=int, default=d.max_request_tokens,
                        help=f"prompts x n x max_tokens of one request; a missing max_tokens counts as 16 on "
                             f"/v1/completions, else as the context (default {d.max_request_tokens})")
    limits.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                        help=f"logprobs / top_logprobs / prompt_logprobs (default {d.max_logprobs})")
    limits.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s,
                        help=f"a request not answered within this is cancelled with a 408 (default {d.request_timeout_s:g})")
    limits.add_argument("--max-ongoing-requests", type=int,
                        help="requests a replica works on at once (default 4 x --max-num-seqs); more wait in the queue")
    limits.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                        help=f"requests waiting for a replica; past it a 503 'dropped due to backpressure' "
                             f"(default {d.max_queued_requests})")
    p.set_defaults(func=cmd_up)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    with exit_on():
        args.func(args)
