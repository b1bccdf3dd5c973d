"""Command line for distill/: `python -m distill --help`."""
from __future__ import annotations

import argparse
import json

from distill.student import DistillConfig, distill
from train.cli import add_train_args, check_preset, train_config_from_args
from train.trainer import TrainConfig
from plumbing.config_flags import add_flags, from_args
from plumbing.console import exit_on, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distill",
        description="Pre-train a student on real tokens (--data-dir, --tokens, --epochs) mixed with a teacher's "
                    "synthetic tokens (--synthetic, made by `python -m synthdata generate`): each row of each batch "
                    "is synthetic with probability w, and total steps = real steps per epoch x epochs / (1 - w). "
                    "Resumable: re-run the same command after a kill. The student lands in OUT/model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_train_args(parser)
    # --synthetic may be left out (None: real tokens only, with --w 0 and --annotations); the field has no default
    add_flags(parser, DistillConfig, ["synthetic_dir", "recipe", "w", "blend", "temperature", "annotations"],
              rename={"synthetic_dir": "--synthetic"}, override={"synthetic_dir": {"default": None}})
    # a student's --seed also seeds the real/synthetic mixture, which the field's help (one member's) does not say
    add_flags(parser, TrainConfig, ["seed"],
              help={"seed": "student initialisation and mixture seed (default %(default)s)"})
    parser.add_argument("--out", required=True, help="run directory; the student lands in OUT/model")
    parser.add_argument("--address", help="Ray cluster address: train the student as one Ray task on a node of that "
                                          "cluster (every path must be on storage all nodes share); default: here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    with exit_on():
        check_preset(args)
        cfg = from_args(DistillConfig, args, train=train_config_from_args(args, args.seed))
        if args.address:
            from plumbing.ray_session import run_as_task

            result = run_as_task(args.address, distill, cfg, args.out)
        else:
            result = distill(cfg, args.out)
    print(json.dumps({"val_loss": result["val_loss"], "model_dir": result["model_dir"],
                      "synthetic_fraction": result["mixture"]["synthetic_fraction"], "steps": result["steps"]}))
