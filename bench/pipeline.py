"""The main job: Chorus end to end on one machine, unattended: the study orchestrator (bench.study) at its
smallest profile, bench/profiles/main.json.

    corpus -> tokenizer + shards -> standard (wd 0.1) and regularized members, 3 seeds each (one stacked run)
    -> every K-subset ensemble of the regularized members -> the packed ensemble behind the Ray Serve endpoint
    (checked with real requests) -> synthetic tokens from the ensemble (vLLM) -> distilled students -> report

OUT/REPORT.md puts standard, regularized, ensemble and student side by side, each gain with its 95% interval
over seeds. Every stage is skipped when a re-run finds its output complete, so running the job twice reuses
finished stages and a killed job continues where it stopped. Every field of the profile (--profile, default
main) has a flag that overrides it, its default the selected profile's value (--profile NAME --help shows that
profile's); a directory holding a job of other settings is refused (use another --out).
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
import types
import typing
from pathlib import Path

from bench.study.job import StudyConfig, run_study
from bench.study.profile import FIELD_SECTION, SECTIONS, StudyError, StudyProfile, load_profile, validate_profile
from plumbing.console import exit_on, setup_logging

# a section's field that is not a setting to override: the corpus (--corpus takes files); the profile's identity
# (name, description) is in no section, so it has no flag either
NOT_FLAGS = ("corpus",)
RECIPE_GRIDS = ("epochs", "lrs", "wds")  # a profile that does not search trains at `start`; these follow it


def _value(text: str):
    """A flag's value as JSON (numbers, true/false, null, lists) or, when it is not JSON, the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _nargs(annotation) -> int | str | None:
    """How many words a field's flag takes: '*' for a variable tuple, n for a fixed tuple of scalars, None for one
    word (a scalar, or JSON for a nested value such as `limits` or `calibration`)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = options[0] if len(options) == 1 else None
    if typing.get_origin(annotation) is tuple:
        items = typing.get_args(annotation)
        if items and items[-1] is Ellipsis:
            return "*"
        if not any(typing.get_origin(i) is tuple for i in items):
            return len(items)
    return None


def build_parser(profile: StudyProfile) -> argparse.ArgumentParser:
    """The job's flags and one flag per field of the profile, each field's default (and help) the profile's."""
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="main", help="profile name or JSON file (default main)")
    p.add_argument("--out", default="runs/main", help="output directory (default runs/main)")
    p.add_argument("--corpus", nargs="+", default=[], help="corpus files/directories (default: the built-in corpus)")
    p.add_argument("--tasks", nargs="*", default=[], help="extra downstream task files (JSON lines)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples (default 200)")
    fields = p.add_argument_group(
        f"profile fields (bench.study.profile.StudyProfile; defaults: profile {profile.name})",
        textwrap.fill(
            "Values are JSON (3, 0.5, true, null) or plain words (cpu-xs); a field of several values takes them as "
            "separate words. The job validates the result like a profile file." + (
                "" if profile.recipes.search else f" Profile {profile.name} does not search: --start sets the "
                f"recipe, and the grids {', '.join(RECIPE_GRIDS)} follow it."), 110))
    recorded = profile.recorded()
    for section, model in SECTIONS.items():  # one flag per field, named for the field alone (names are unique)
        for name, field in model.model_fields.items():
            if name in NOT_FLAGS:
                continue
            value = json.dumps(recorded[section][name])
            fields.add_argument(f"--{name.replace('_', '-')}", dest=name, nargs=_nargs(field.annotation),
                                type=_value, metavar=name.upper(),
                                help=f"{field.description} (default {value})".replace("%", "%%"))
    return p


def overrides(profile: StudyProfile, args: argparse.Namespace) -> dict:
    """The fields the command line sets; for a profile that does not search, --start sets the grids as well."""
    changed = {name: getattr(args, name) for name in FIELD_SECTION
               if name not in NOT_FLAGS and getattr(args, name) is not None}
    if not profile.recipes.search:
        if given := [f"--{g}" for g in RECIPE_GRIDS if g in changed]:
            raise StudyError(f"profile {profile.name} does not search: {', '.join(given)} set search grids; set "
                             "its recipe with --start EPOCHS LR WD")
        if "start" in changed:
            changed.update(zip(RECIPE_GRIDS, ([v] for v in changed["start"])))
    return changed


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--profile", default="main")
    with exit_on():  # every stage's input errors derive from ChorusError and name the problem
        profile = load_profile(first.parse_known_args(argv)[0].profile)
        args = build_parser(profile).parse_args(argv)
        setup_logging()
        if changed := overrides(profile, args):
            flags = " ".join(f"--{k.replace('_', '-')}" for k in changed)
            record = profile.model_dump()
            for name, value in changed.items():
                record[FIELD_SECTION[name]][name] = value
            profile = validate_profile(record, f"profile {profile.name} with {flags}")
        command = "bash scripts/demo.sh " + " ".join(argv)
        cfg = StudyConfig(profile=profile, out=args.out, corpus=tuple(args.corpus), address=args.address,
                          n_boot=args.n_boot, tasks=tuple(args.tasks), command=command.strip())
        run_study(cfg)
    print((Path(args.out) / "REPORT.md").read_text())


if __name__ == "__main__":
    main()
