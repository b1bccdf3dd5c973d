"""python -m bench.study: run (or finish) a study, or rewrite its report."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import bench.study
from bench.study.analysis import write_report
from bench.study.job import StudyConfig, run_study
from bench.study.profile import ROOT, StudyError, load_profile, profile_names
from plumbing.artifacts import read_json
from plumbing.console import exit_on, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.study", description=bench.study.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="wiki",
                        help=f"a profile name ({', '.join(profile_names())}) or a profile JSON file (default wiki)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--corpus", nargs="+", help="corpus files or directories (default: the profile's corpus)")
    source.add_argument("--data-dir", help="an existing dataset directory (`python -m train data`) instead of a corpus")
    parser.add_argument("--out", required=True, help="study directory (data, runs, REPORT.md, plots, results.json)")
    parser.add_argument("--eval-dir", default=str(ROOT.parent / "shared" / "data" / "eval"),
                        help="directory of downstream task files (JSON lines); absent: those tasks are skipped")
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    parser.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples per fit (default 200)")
    parser.add_argument("--past-gate", action="store_true",
                        help="run the study on after a failed gate phase (its report keeps the verdict)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite REPORT.md and plots from OUT/results.json; train and evaluate nothing")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    with exit_on():
        if args.report_only:
            path = Path(args.out) / "results.json"
            if not path.exists():
                raise StudyError(f"{path} does not exist: run the study first")
            print(write_report(read_json(path, "study results"), args.out, args.n_boot).read_text())
            return
        command = "python -m bench.study " + " ".join(sys.argv[1:] if argv is None else argv)
        cfg = StudyConfig(profile=load_profile(args.profile), out=args.out, corpus=tuple(args.corpus or ()),
                          eval_dir=args.eval_dir, data_dir=args.data_dir, address=args.address, n_boot=args.n_boot,
                          command=command, past_gate=args.past_gate)
        results = run_study(cfg)
    print(json.dumps({"report": str(Path(args.out) / "REPORT.md"), "phases_done": results["phases_done"],
                      "trained": results["trained_last_invocation"],
                      "evaluated": results["evaluated_last_invocation"]}))


if __name__ == "__main__":
    main()
