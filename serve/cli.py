"""Command line for serve/: `python -m serve {pack,up} --help`."""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from serve.app import DeploymentSettings, EngineSettings, EnsembleConfig, HttpSettings, ServeError
from serve.pack import COMBINE_RULES, pack_ensemble
from plumbing.config_flags import add_flags, from_args
from plumbing.console import run_command

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


def config_from_args(args) -> EnsembleConfig:
    """`serve up`'s flags as the endpoint's config, section by section (the key from api_key_from)."""
    return from_args(EnsembleConfig, args, engine=from_args(EngineSettings, args),
                     deployment=from_args(DeploymentSettings, args),
                     http=from_args(HttpSettings, args, api_key=api_key_from(args)))


def cmd_up(args) -> None:
    from serve.app import start_app, stop_app

    config = config_from_args(args)
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
    # Flags follow the config's fields (serve/app.py: EnsembleConfig and its sections), in the order --help lists them.
    add_flags(p, EnsembleConfig, ["model_dir", "served_model_name"],
              rename={"model_dir": "--model", "served_model_name": "--name"})
    add_flags(p, DeploymentSettings, ["replicas"])
    add_flags(p, HttpSettings, ["host", "port"])
    p.add_argument("--api-key-file", help="file holding the key that every route but /health requires "
                                          "('Authorization: Bearer KEY'); or set $CHORUS_API_KEY")
    p.add_argument("--api-key", help="the key itself (visible to other users in `ps`: prefer the two above)")
    add_flags(p, HttpSettings, ["allow_unauthenticated"])
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray); every node must see --model "
                                     "at the same path (a shared filesystem)")
    add_flags(p, DeploymentSettings, ["max_replicas_per_node"])
    add_flags(p, EngineSettings, ["max_model_len", "kv_cache_gib", "max_num_seqs", "compile"])
    spec = p.add_argument_group("speculative decoding", "a small model sharing the ensemble's tokenizer proposes tokens, "
                                "the ensemble verifies several in one pass; the output is distributed exactly as "
                                "without it (greedy output identical). Pays at low concurrency with a good draft "
                                "(README, 'Speculative decoding')")
    add_flags(spec, EngineSettings, ["draft", "num_speculative_tokens", "draft_max_batch", "draft_sampling"])
    limits = p.add_argument_group("limits", "what one request may ask for (past a limit: a 4xx naming it and the flag "
                                            "that raises it), how long it may take, and how many may wait")
    add_flags(limits, HttpSettings, ["max_body_bytes", "max_n", "max_prompts", "max_request_tokens", "max_logprobs",
                                     "request_timeout_s"])
    add_flags(limits, DeploymentSettings, ["max_ongoing_requests", "max_queued_requests"])
    p.set_defaults(func=cmd_up)
    return parser


def main(argv: list[str] | None = None) -> None:
    run_command(build_parser(), argv)
