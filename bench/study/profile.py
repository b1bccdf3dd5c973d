"""What a study runs: its profile (bench/profiles/<name>.json), loaded and checked, and the phases in order."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from plumbing.artifacts import read_json
from plumbing.console import ChorusError

ROOT = Path(__file__).resolve().parents[2]
PROFILE_DIR = ROOT / "bench" / "profiles"
PHASES = ("data", "gate", "search", "members", "ensembles", "budgets", "serve", "distill", "downstream")


class StudyError(ChorusError):
    """A study that cannot run: bad profile, corpus, output directory or settings."""


@dataclass(frozen=True)
class StudyProfile:
    """What one study runs (a bench/profiles/*.json file; every field is documented in bench/profiles/README.md)."""

    name: str
    description: str
    corpus: str  # "default" (the Python docs, fetched by apt) or a path relative to the repository
    presets: tuple[str, ...]  # the model-size ladder N (train.model.PRESETS)
    tokens: int  # the main budget D
    vocab_size: int
    max_chars: int | None
    val_tokens: int
    context: int
    batch_size: int
    search: bool  # False: the start point is the regularized recipe, (start epochs, lr, 0.1) the standard one
    epochs: tuple[int, ...]  # the search grids (extended past an edge up to `limits`)
    lrs: tuple[float, ...]
    wds: tuple[float, ...]
    start: tuple[int, float, float]  # (epochs, lr, wd) where both searches start
    seeds: int  # seeds trained at every reported optimum
    k_max: int  # ensembles of K = 1 .. k_max members at each N
    joint_members: bool  # ensemble members at the joint recipe (2x epochs, 0.5x wd of the optimum)
    budgets: tuple[int, ...]  # smaller budgets D for the data law (the main budget is added)
    budget_presets: tuple[str, ...]
    serve_check: bool
    distill_preset: str | None
    student_epochs: int
    student_wd: float
    distill_w: float
    student_seeds: int
    self_teachers: int  # single members (seeds 0..) that each teach one self-distilled student
    distill_control: bool
    synthetic_shard_tokens: int
    eval_tasks: tuple[str, ...]  # file stems in --eval-dir
    eval_limit: int | None
    next_word_items: int  # items of the held-out next-word task (0: none)
    checkpoint_every: int = 50
    limits: tuple[tuple[float, float], ...] | None = None  # how far the search may extend each grid
    max_rounds: int = 20
    # soft-label distillation (distill --blend): students of distill_preset on real rows annotated by the teacher
    # (synthdata annotate) and synthetic rows carrying its top-k (synthdata generate --topk)
    soft_students: int = 0  # seeds distilled from the ensemble
    soft_self_teachers: int = 0  # single members (seeds 0..) that each teach one soft-label student of their size
    soft_control: bool = False  # the soft recipe's schedule on real data only, cross-entropy alone, same steps
    soft_epochs: int = 32
    soft_w: float = 0.25
    soft_blend: float = 0.5
    soft_wd: float = 0.8
    topk: int = 32
    budget_seeds: int | None = None  # seeds at each budget's optima (None: `seeds`)
    chunk_tokens: int | None = None  # budgets are prefixes of a stream of shuffled chunks (train.data.shuffled_chunks)
    # the gate: regularized runs at `start` for the smallest and largest size, the standard recipe at the largest
    # size at each of gate_epochs; passes when largest beats smallest by gate_min_gap nats and the standard
    # recipe's loss at its most epochs is gate_overfit nats above its best (empty: no gate)
    gate_epochs: tuple[int, ...] = ()
    gate_min_gap: float = 0.05
    gate_overfit: float = 0.02
    calibration: dict | None = None  # a bench.science.calibration.MarkovSource: the corpus is generated, its floor known


def _as_tuple(v):
    return tuple(_as_tuple(x) for x in v) if isinstance(v, list) else v


def load_profile(name: str) -> StudyProfile:
    """A profile by name (bench/profiles/<name>.json) or path; a bad file is named with the field at fault."""
    path = Path(name) if name.endswith(".json") else PROFILE_DIR / f"{name}.json"
    if not path.exists():
        raise StudyError(f"no study profile {name!r}: {path} does not exist (profiles: {', '.join(profile_names())})")
    record = read_json(path, "study profile")
    fields = {f.name: f for f in dataclasses.fields(StudyProfile)}
    unknown = sorted(set(record) - set(fields))
    if unknown:
        raise StudyError(f"{path}: unknown field(s) {', '.join(unknown)}")
    missing = sorted(n for n, f in fields.items() if n not in record and f.default is dataclasses.MISSING)
    if missing:
        raise StudyError(f"{path}: missing field(s) {', '.join(missing)}")
    profile = StudyProfile(**{k: _as_tuple(v) for k, v in record.items()})
    check_profile(profile, path)
    return profile


def check_profile(p: StudyProfile, where: Path | str) -> None:
    from train.model import get_shape

    def bad(field: str, why: str):
        raise StudyError(f"{where}: field {field!r} {why}")

    for preset in (*p.presets, *p.budget_presets, *([p.distill_preset] if p.distill_preset else [])):
        try:
            get_shape(preset)
        except ValueError as e:
            bad("presets", str(e))
    if not p.presets:
        bad("presets", "is empty")
    if not set(p.budget_presets) <= set(p.presets):
        bad("budget_presets", f"must be among presets {list(p.presets)}")
    if p.distill_preset and p.distill_preset not in p.presets:
        bad("distill_preset", f"{p.distill_preset} is not in presets {list(p.presets)}")
    if p.seeds < 2:
        bad("seeds", "must be >= 2: an optimum's uncertainty comes from its seeds")
    if p.k_max < 2:
        bad("k_max", "must be >= 2")
    if not 0 <= p.distill_w < 1:
        bad("distill_w", "must be in [0, 1)")
    if p.self_teachers > p.seeds:
        bad("self_teachers", f"exceeds the seeds trained at the regularized optimum (seeds = {p.seeds})")
    if p.soft_self_teachers > p.seeds:
        bad("soft_self_teachers", f"exceeds the seeds trained at the regularized optimum (seeds = {p.seeds})")
    if not 0 <= p.soft_w < 1:
        bad("soft_w", "must be in [0, 1)")
    if not 0 < p.soft_blend <= 1:
        bad("soft_blend", "must be in (0, 1]")
    if (p.soft_students or p.soft_self_teachers) and not p.distill_preset:
        bad("soft_students", "needs distill_preset")
    if any(d <= 0 or d == p.tokens for d in p.budgets):
        bad("budgets", f"must be positive and other than the main budget tokens = {p.tokens} (it is added)")
    if p.limits is not None and (len(p.limits) != 3 or any(len(lim) != 2 for lim in p.limits)):
        bad("limits", "must be 3 pairs [lo, hi] for epochs, lr, wd")
    if p.budget_seeds is not None and p.budget_seeds < 2:
        bad("budget_seeds", "must be >= 2: a budget's optimum needs its seed noise too")
    if p.chunk_tokens is not None and p.chunk_tokens < 2:
        bad("chunk_tokens", "must be >= 2 tokens (or absent: whole documents)")
    if p.gate_epochs and (len(p.gate_epochs) < 3 or list(p.gate_epochs) != sorted(set(p.gate_epochs))):
        bad("gate_epochs", "must be >= 3 distinct epoch counts in increasing order: overfitting is a rise after a fall")
    if p.gate_epochs and len(p.presets) < 2:
        bad("gate_epochs", "needs >= 2 presets: the gate compares the smallest and the largest")
    if p.calibration is not None:
        from bench.science.calibration import CalibrationError, MarkovSource

        if p.chunk_tokens:
            bad("chunk_tokens", "cannot go with calibration: the floor is computed over whole validation documents")
        try:
            MarkovSource.from_record(p.calibration)
        except (CalibrationError, TypeError) as e:
            bad("calibration", str(e))


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))

