"""Command line for train/: `python -m train {data,member,members,search} --help`."""
from __future__ import annotations

import argparse
import json
import logging

from plumbing.config_flags import add_flags, from_args
from plumbing.console import run_command
from train.corpus import default_corpus
from train.data import DatasetSpec, prepare_dataset
from train.model import get_shape
from train.trainer import TrainConfig


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The knobs of one training run (shared by member, members, search and distill), derived from TrainConfig's
    fields and their help. --preset and --warmup-frac default to None here: their defaults depend on --init-from
    (train_config_from_args). --seed is each command's own (its help differs): add_flags(p, TrainConfig, ["seed"])."""
    add_flags(p, TrainConfig, ["data_dir", "preset", "init_from", "warmup_frac", "tokens", "epochs", "lr",
                               "weight_decay", "batch_size", "context", "eval_every", "checkpoint_every", "threads",
                               "compile"], rename={"weight_decay": "--wd"},
              override={"preset": {"default": None}, "warmup_frac": {"default": None}})


def check_preset(args) -> None:
    """Name an unknown preset before any work (with --init-from and no --preset, the base decides)."""
    if args.preset or not getattr(args, "init_from", None):
        get_shape(args.preset or "cpu-s")


def train_config_from_args(args, seed: int) -> TrainConfig:
    init_from = getattr(args, "init_from", None)
    warmup = args.warmup_frac if getattr(args, "warmup_frac", None) is not None else (0.05 if init_from else 0.01)
    preset = args.preset or ("" if init_from else "cpu-s")
    return from_args(TrainConfig, args, preset=preset, warmup_frac=warmup, seed=seed)


def cmd_data(args) -> None:
    corpus = args.corpus or [str(default_corpus(args.cache_dir))]
    manifest = prepare_dataset(from_args(DatasetSpec, args, corpus=tuple(corpus)), args.data_dir)
    print(json.dumps({k: {"tokens": v["tokens"], "documents": v["documents"]} for k, v in manifest["splits"].items()}))


def cmd_member(args) -> None:
    from train.trainer import train_member

    check_preset(args)
    result = train_member(train_config_from_args(args, args.seed), args.out)
    print(json.dumps({"val_loss": result["val_loss"], "model_dir": result["model_dir"]}))


def cmd_members(args) -> None:
    from train.members import joint_recipe, train_members

    check_preset(args)
    if args.joint:
        args.epochs, args.weight_decay = joint_recipe(args.epochs, args.weight_decay)
        logging.info("joint recipe: members at %d epochs, weight decay %g", args.epochs, args.weight_decay)
    configs = [train_config_from_args(args, seed) for seed in range(args.seed, args.seed + args.k)]
    results = train_members(configs, args.out, address=args.address, parallel=args.parallel, separate=args.separate)
    for r in results:
        print(json.dumps({"seed": r["config"]["seed"], "val_loss": r["val_loss"], "model_dir": r["model_dir"]}))


def cmd_search(args) -> None:
    from train.search import SearchSpace, coordinate_descent, runs_table

    check_preset(args)
    space = SearchSpace.standard() if args.standard else SearchSpace.default()
    if args.lrs:
        space = space.replace(lrs=tuple(args.lrs))
    if args.wds and not args.standard:
        space = space.replace(wds=tuple(args.wds))
    if args.epochs_grid:
        space = space.replace(epochs=tuple(args.epochs_grid))
    base = train_config_from_args(args, args.seed)
    outcome = coordinate_descent(base, space, args.out, start=(args.epochs, args.lr, args.weight_decay),
                                 address=args.address, parallel=args.parallel, max_rounds=args.max_rounds,
                                 separate=args.separate)
    print(runs_table(outcome))
    opt = outcome["optimum"]
    status = "certified" if outcome["certified"] else "NOT certified"
    print(f"optimum ({status}): epochs {opt['epochs']}, lr {opt['lr']:g}, wd {opt['wd']:g} "
          f"(standard recipe: 0.1), val loss {opt['val_loss']:.4f}; full record in {args.out}/result.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="train a BPE tokenizer and write Parquet token shards from a corpus",
                       description="Corpus (txt/md/rst, jsonl with 'text', parquet with 'text'; optionally .zst; "
                                   "files or directories) -> byte-level BPE tokenizer + train/val token shards + manifest. "
                                   "Without --corpus, uses the default corpus (Debian's python3.11-doc sources).")
    add_flags(p, DatasetSpec, ["corpus"], override={"corpus": {"default": None}})  # None: the default corpus
    p.add_argument("--data-dir", required=True, help="output dataset directory")
    add_flags(p, DatasetSpec, ["vocab_size", "tokenizer", "val_fraction", "val_max_tokens", "max_chars"],
              rename={"val_max_tokens": "--val-tokens"})
    p.add_argument("--cache-dir", default=".cache/corpus", help="where the default corpus is fetched to")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("member", help="train one member (resumable: re-run the same command after a kill)")
    add_train_args(p)
    add_flags(p, TrainConfig, ["seed"])
    p.add_argument("--out", required=True, help="run directory; the model lands in OUT/model")
    p.set_defaults(func=cmd_member)

    p = sub.add_parser("members", help="train K seed members of one configuration (stacked in one process by default)",
                       description="K members that differ only by seed. By default they are trained as one stack: "
                                   "one model whose weights carry a member axis, so every op runs once for all K "
                                   "instead of K times (figures: BENCHMARKS.md, bench/perf/train_stack_throughput.py). Each member keeps its own initialisation, data order and AdamW state, "
                                   "and lands in an ordinary run directory, the same as a member trained alone. "
                                   "The stack's checkpoint lives in OUT/.stack-<hash>/ until every member is written; "
                                   "re-run the same command after a kill. A K that would not fit in memory is refused "
                                   "with the estimate. --separate trains each member as its own run on Ray instead.")
    add_train_args(p)
    p.add_argument("--k", type=int, default=3, help="number of members (default 3)")
    # K members: --seed is the first of K seeds, not one run's seed as the field's help says
    add_flags(p, TrainConfig, ["seed"], help={"seed": "first seed; members use seed .. seed+k-1"})
    p.add_argument("--joint", action="store_true",
                   help="joint recipe: given the single-model optimum in --epochs/--wd, train at 2x epochs and 0.5x wd (floor 0.1)")
    p.add_argument("--out", required=True, help="directory; member i lands in OUT/seed-<i>/model")
    p.add_argument("--separate", action="store_true",
                   help="train each member as its own run, in parallel as Ray tasks (the pre-stacking path)")
    p.add_argument("--address", help="with --separate: Ray cluster address (default: start a local Ray)")
    p.add_argument("--parallel", type=int, default=0, help="with --separate: runs at once (default: one per CPU)")
    p.set_defaults(func=cmd_members)

    p = sub.add_parser("search", help="coordinate descent over (epochs, lr, wd) with 6-neighbour certification",
                       description="The paper's recipe search at one model size and budget. Every finished run is kept "
                                   "in OUT/ledger.jsonl, so a killed search resumes and no run is repeated.")
    add_train_args(p)
    add_flags(p, TrainConfig, ["seed"])
    p.add_argument("--out", required=True, help="search directory (ledger, runs, result.json)")
    p.add_argument("--standard", action="store_true", help="standard recipe: weight decay fixed at 0.1")
    p.add_argument("--lrs", type=float, nargs="+", help="learning-rate grid (default: the paper's)")
    p.add_argument("--wds", type=float, nargs="+", help="weight-decay grid (default: the paper's)")
    p.add_argument("--epochs-grid", type=int, nargs="+", help="epochs grid (default: the paper's)")
    p.add_argument("--max-rounds", type=int, default=20, help="moves before giving up on certification")
    p.add_argument("--separate", action="store_true",
                   help="train each trial as its own Ray task (default: a round's trials with the same epochs are "
                        "trained as one stack, with per-trial lr and wd)")
    p.add_argument("--address", help="with --separate: Ray cluster address (default: start a local Ray)")
    p.add_argument("--parallel", type=int, default=0, help="with --separate: trials at once (default: one per CPU)")
    p.set_defaults(func=cmd_search)
    return parser


def main(argv: list[str] | None = None) -> None:
    run_command(build_parser(), argv)
