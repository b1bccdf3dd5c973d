"""The main job: Chorus end to end on one machine, unattended: the study orchestrator (bench.study) at its
smallest profile, bench/profiles/main.json.

    corpus -> tokenizer + shards -> standard (wd 0.1) and regularized members, 3 seeds each (one stacked run)
    -> every K-subset ensemble of the regularized members -> the packed ensemble behind the Ray Serve endpoint
    (checked with real requests) -> synthetic tokens from the ensemble (vLLM) -> distilled students -> report

OUT/REPORT.md puts standard, regularized, ensemble and student side by side, each gain with its 95% interval
over seeds. Every stage is skipped when a re-run finds its output complete, so running the job twice reuses
finished stages and a killed job continues where it stopped. The flags below override the profile's settings;
a directory holding a job of other settings is refused (use another --out).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.study.job import StudyConfig, run_study
from bench.study.profile import StudyError, load_profile, validate_profile
from plumbing.console import exit_on, setup_logging


def main(argv: list[str] | None = None) -> None:
    d = load_profile("main")
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/main", help="output directory (default runs/main)")
    p.add_argument("--profile", default="main", help="profile name or JSON file (default main)")
    p.add_argument("--corpus", nargs="+", default=[], help="corpus files/directories (default: the built-in corpus)")
    p.add_argument("--preset", help=f"member size (default {d.presets[0]})")
    p.add_argument("--tokens", type=int, help=f"token budget D (default {d.tokens:,})")
    p.add_argument("--epochs", type=int, help=f"member epochs (default {d.start[0]})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {d.start[1]:g})")
    p.add_argument("--wd", type=float, help=f"the regularized recipe's weight decay (default {d.start[2]:g}; "
                                            "the standard recipe's is 0.1)")
    p.add_argument("--k", type=int, help=f"ensemble members (default {d.k_max})")
    p.add_argument("--seeds", type=int, help=f"seeds per recipe (default {d.seeds})")
    p.add_argument("--w", type=float, help=f"synthetic share of the student's batches (default {d.distill_w})")
    p.add_argument("--student-epochs", type=int, help=f"student epochs over the real tokens (default {d.student_epochs})")
    p.add_argument("--students", type=int, help=f"student seeds (default {d.student_seeds})")
    p.add_argument("--tasks", nargs="*", default=[], help="extra downstream task files (JSON lines)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples (default 200)")
    args = p.parse_args(argv)
    setup_logging()
    with exit_on():  # every stage's input errors derive from ChorusError and name the problem
        profile = load_profile(args.profile)
        e, lr, wd = profile.start
        e, lr, wd = args.epochs or e, args.lr or lr, args.wd if args.wd is not None else wd
        preset = args.preset or profile.presets[-1]
        override = {"start": (e, lr, wd), "epochs": (e,), "lrs": (lr,), "wds": (wd,)}
        if args.preset:
            override.update(presets=(preset,), distill_preset=preset)
        for flag, field in (("tokens", "tokens"), ("k", "k_max"), ("seeds", "seeds"), ("w", "distill_w"),
                            ("student_epochs", "student_epochs"), ("students", "student_seeds")):
            if getattr(args, flag) is not None:
                override[field] = getattr(args, flag)
        if profile.search and any(getattr(args, f) is not None for f in ("epochs", "lr", "wd")):
            raise StudyError(f"profile {profile.name} searches its settings: --epochs/--lr/--wd apply to a profile "
                             "with \"search\": false")
        if profile.search:
            override = {k: v for k, v in override.items() if k not in ("start", "epochs", "lrs", "wds")}
        profile = validate_profile({**profile.model_dump(), **override}, f"profile {profile.name} with these flags")
        command = "bash scripts/demo.sh " + " ".join(sys.argv[1:] if argv is None else argv)
        cfg = StudyConfig(profile=profile, out=args.out, corpus=tuple(args.corpus), address=args.address,
                          n_boot=args.n_boot, tasks=tuple(args.tasks), command=command.strip())
        run_study(cfg)
    print((Path(args.out) / "REPORT.md").read_text())


if __name__ == "__main__":
    main()
