"""Command line for bench/: `python -m bench {loss,downstream,fit,report} --help`."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from bench.science.fits import data_efficiency, fit_power_law
from plumbing.artifacts import read_json_lines
from plumbing.console import ChorusError, run_command

log = logging.getLogger(__name__)


class PointsError(ChorusError):
    """A points file that cannot be read as the requested (series, x, y) records."""


def read_points(path: str | Path, x_key: str, y_key: str, series_key: str | None) -> dict[str, tuple[list, list]]:
    """JSON lines -> {series: (x values, y values)}; records without the series key form one series ''."""
    series: dict[str, tuple[list, list]] = {}
    for where, record in read_json_lines(Path(path), PointsError):
        for key in (x_key, y_key):
            if not isinstance(record.get(key), (int, float)):
                raise PointsError(f"{where}: needs a number under {key!r} (keys: {sorted(record)})")
        name = str(record.get(series_key, "")) if series_key else ""
        xs, ys = series.setdefault(name, ([], []))
        xs.append(float(record[x_key]))
        ys.append(float(record[y_key]))
    if not series:
        raise PointsError(f"points file {path} holds no records")
    return series


def _parse_reached(spec: str) -> tuple[str, float, float]:
    """'NAME=LOSS@TOKENS' -> (name, loss, tokens)."""
    try:
        name, rest = spec.split("=", 1)
        loss, tokens = rest.split("@", 1)
        return name, float(loss), float(tokens)
    except ValueError:
        raise PointsError(f"--reached {spec!r}: expected NAME=LOSS@TOKENS, e.g. regularized=5.31@0.0002") from None


def run_here_or_on(address: str | None, fn, *args, **kwargs):
    """fn(*args, **kwargs) in this process, or as one Ray task on the cluster at `address` (shared paths)."""
    if not address:
        return fn(*args, **kwargs)
    from plumbing.ray_session import run_as_task

    return run_as_task(address, fn, *args, **kwargs)


def cmd_loss(args) -> None:
    from serve.evaluation import validation_loss

    print(json.dumps(run_here_or_on(args.address, validation_loss, args.model, args.data_dir, args.combine,
                                    args.batch_size, args.context)))


def cmd_downstream(args) -> None:
    from serve.downstream import evaluate_downstream

    results = run_here_or_on(args.address, evaluate_downstream, args.model, args.task, args.combine, args.limit,
                             args.batch_size, add_bos=not args.no_bos)
    for name, r in results.items():
        print(json.dumps({"task": name, **r}))


def cmd_fit(args) -> None:
    from bench.science.report import fit_table

    series = read_points(args.points, args.x, args.y, args.series)
    fits = {name: fit_power_law(xs, ys, n_boot=args.n_boot) for name, (xs, ys) in series.items()}
    print(fit_table(fits, args.x), end="")


def cmd_report(args) -> None:
    from bench.science.report import efficiency_table, fit_table, plot_data_efficiency, plot_scaling, write_text

    series = read_points(args.points, args.x, args.y, args.series)
    fits = {name: fit_power_law(xs, ys, n_boot=args.n_boot) for name, (xs, ys) in series.items()}
    out = Path(args.out)
    plot_scaling({n: (*series[n], fits[n]) for n in series}, out / "scaling.png", args.xlabel or args.x,
                 f"loss vs {args.xlabel or args.x}: L = A / x^B + C")
    parts = [f"# {args.title}\n", f"Fits of L = A / x^B + C over `{args.x}` (from `{args.points}`).\n",
             fit_table(fits, args.x), "\n![loss and fitted laws](scaling.png)\n"]
    if args.reached:
        if not args.data_law:
            raise PointsError("--reached needs --data-law SERIES (the standard recipe's loss over token budgets)")
        if args.data_law not in fits:
            raise PointsError(f"--data-law {args.data_law!r} is not a series of {args.points} ({', '.join(fits)})")
        law = fits[args.data_law]
        effs = {name: data_efficiency(law, loss, tokens) for name, loss, tokens in map(_parse_reached, args.reached)}
        plot_data_efficiency(law, effs, out / "efficiency.png", xlabel=args.x)
        parts += [f"\n## Data efficiency against `{args.data_law}`\n", efficiency_table(effs),
                  "\n![data efficiency](efficiency.png)\n"]
    path = write_text(out / "REPORT.md", "\n".join(parts))
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", nargs="+", required=True,
                       help="a member, student or packed-ensemble directory, or several member directories "
                            "(combined as one ensemble)")
        p.add_argument("--combine", choices=("logits", "probs"),
                       help="ensemble rule: average logits (the paper's) or probabilities (a mixture); "
                            "default: the packed directory's own, else logits")
        p.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass (default 64)")
        p.add_argument("--address", help="Ray cluster address: evaluate as one Ray task on a node of that cluster "
                                         "(every path must be on storage all nodes share); default: here")

    p = sub.add_parser("loss", help="validation loss (nats/token) on a dataset's fixed validation tokens")
    model_args(p)
    p.add_argument("--data-dir", required=True, help="dataset directory made by `python -m train data`")
    p.add_argument("--context", type=int, help="window length (default: the model's context)")
    p.set_defaults(func=cmd_loss)

    p = sub.add_parser("downstream", help="zero-shot multiple choice (acc, acc_norm) and LAMBADA (greedy acc)",
                       description="Task files are JSON lines: {query, choices, gold} or {context, continuation}. "
                                   "Scored as lm-evaluation-harness scores them (see README, bench/).")
    model_args(p)
    p.add_argument("--task", nargs="+", required=True, help="task files (e.g. ../shared/data/eval/piqa.jsonl)")
    p.add_argument("--limit", type=int, help="first N items of each task")
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS to contexts (Chorus models expect it)")
    p.set_defaults(func=cmd_downstream)

    def points_args(p):
        p.add_argument("--points", required=True, help="JSON lines, one record per run (repeated x = seeds)")
        p.add_argument("--x", default="x", help="key of x: model size, K or tokens (default 'x')")
        p.add_argument("--y", default="loss", help="key of the loss (default 'loss')")
        p.add_argument("--series", help="key that names the series (e.g. 'recipe'); one fit per series")
        p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples for C's uncertainty (default 200)")

    p = sub.add_parser("fit", help="fit L = A / x^B + C per series; print A, B, C ± bootstrap and flags")
    points_args(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("report", help="fits, a loss-vs-x plot and (optionally) data efficiency as REPORT.md + PNG")
    points_args(p)
    p.add_argument("--out", required=True, help="directory for REPORT.md and the PNG plots")
    p.add_argument("--title", default="Scaling report", help="report title")
    p.add_argument("--xlabel", help="axis label for x (default: the x key)")
    p.add_argument("--data-law", help="series that is the standard recipe's loss over token budgets (x = tokens)")
    p.add_argument("--reached", nargs="+", metavar="NAME=LOSS@TOKENS",
                   help="losses other recipes reached with a budget, for their data efficiency")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    run_command(build_parser(), argv)
