"""What a study runs: its profile (bench/profiles/<name>.json), one validated pydantic model, and the phases in order.

A profile is data: change the grid in its JSON file, not in code. Every field is described below (StudyProfile);
a bad file is refused with a StudyError naming the file and the field at fault.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from plumbing.artifacts import read_json
from plumbing.console import ChorusError

ROOT = Path(__file__).resolve().parents[2]
PROFILE_DIR = ROOT / "bench" / "profiles"
PHASES = ("data", "gate", "search", "members", "ensembles", "budgets", "serve", "distill", "downstream")


class StudyError(ChorusError):
    """A study that cannot run: bad profile, corpus, output directory or settings."""


class ProfileFieldError(ValueError):
    """A rule between fields that a profile breaks; carries the field to name (a model validator has no field)."""

    def __init__(self, field: str, why: str):
        super().__init__(why)
        self.field = field


# An int stays an int where the JSON wrote one (an epoch limit of 64, not 64.0): the values reach train/'s
# ledger keys, so the number a profile records must be the number it wrote.
Number = int | float


def _check_presets(presets: tuple[str, ...]) -> tuple[str, ...]:
    from train.model import get_shape

    for preset in presets:
        get_shape(preset)  # a ValueError naming the known presets
    return presets


class StudyProfile(BaseModel):
    """What one study runs. The fields are flat (as the JSON files and results.json record them), grouped here
    by the phase that reads them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- what it is
    name: str = Field(description="printed at the top of the report")
    description: str = Field(description="printed at the top of the report: why the settings are what they are")

    # -- data
    corpus: str = Field(description="'default' (the Python 3.11 docs, fetched by apt into .cache/corpus) or a path "
                                    "relative to the repository; --corpus overrides it")
    vocab_size: int = Field(description="the tokenizer's vocabulary (train.data.DatasetSpec)")
    max_chars: int | None = Field(description="characters of corpus read at most (train.data.DatasetSpec)")
    val_tokens: int = Field(description="validation tokens held out (train.data.DatasetSpec)")
    chunk_tokens: int | None = Field(
        None, ge=2, description="budgets are nested prefixes of one stream of chunks of this many tokens shuffled "
        "across the training documents (seeded, train.data.shuffled_chunks), validation one such chunk from each "
        "held-out document; absent: whole documents")
    calibration: dict | None = Field(
        None, description="a bench.science.calibration.MarkovSource record (symbols, documents, p_end, alpha, seed): "
        "the corpus is generated from it and its Bayes floor computed on the validation targets; every fitted "
        "asymptote below the floor is flagged")

    # -- every run
    presets: tuple[str, ...] = Field(min_length=1, description="the model-size ladder N (train.model presets)")
    tokens: int = Field(description="the main budget D")
    context: int = Field(description="every run's window length")
    batch_size: int = Field(description="every run's batch")
    checkpoint_every: int = Field(50, description="steps between checkpoints")

    # -- the gate (first, before the search; empty gate_epochs: no gate)
    gate_epochs: tuple[int, ...] = Field(
        (), description="the standard recipe at the largest size at each of these epochs, beside regularized runs at "
        "`start` for the smallest and largest size; a failed gate stops the study (REPORT.md says why) unless "
        "--past-gate")
    gate_min_gap: float = Field(0.05, description="the gate passes when the largest size beats the smallest by this "
                                                  "many nats ...")
    gate_overfit: float = Field(0.02, description="... and the standard recipe's loss at its most epochs is this many "
                                                  "nats above its best")

    # -- the search
    search: bool = Field(description="true: coordinate descent (train.search) for both recipes from `start`; "
                                     "false: `start` is the regularized recipe and (start epochs, start lr, 0.1) the "
                                     "standard one")
    epochs: tuple[int, ...] = Field(description="the starting epochs grid; an optimum on an edge extends it along "
                                                "the paper's ladder")
    lrs: tuple[float, ...] = Field(description="the starting learning-rate grid (extended like epochs)")
    wds: tuple[float, ...] = Field(description="the regularized recipe's starting weight-decay grid (extended like "
                                               "epochs); the standard recipe's is 0.1")
    start: tuple[int, Number, Number] = Field(description="(epochs, lr, wd) where both searches start")
    limits: tuple[tuple[Number, Number], tuple[Number, Number], tuple[Number, Number]] | None = Field(
        None, description="[lo, hi] for epochs, lr, wd: how far a grid may be extended (an optimum at a limit is "
                          "reported not certified); absent: train.search's defaults")
    max_rounds: int = Field(20, description="the most rounds of the coordinate descent")

    # -- members and ensembles
    seeds: int = Field(ge=2, description="seeds trained at every reported optimum (both recipes): an optimum's "
                                         "uncertainty comes from its seeds")
    k_max: int = Field(ge=2, description="ensembles of K = 1 .. k_max members at each N")
    joint_members: bool = Field(description="ensemble members at the joint recipe (2x epochs, 0.5x wd of the "
                                            "optimum) or at the optimum itself")

    # -- the data law
    budgets: tuple[int, ...] = Field(description="other budgets D (the main one is added) at which both recipes "
                                                 "are searched again")
    budget_presets: tuple[str, ...] = Field(description="the sizes (among presets) searched at each budget")
    budget_seeds: int | None = Field(None, ge=2, description="seeds at each budget's optima (absent: `seeds`); a "
                                                             "budget's optimum needs its seed noise too")

    # -- serve
    serve_check: bool = Field(description="pack the ensemble and check the Ray Serve endpoint with real requests")

    # -- distillation: sequence-level students on real + synthetic tokens
    distill_preset: str | None = Field(description="the students' size (among presets); null: no distillation")
    student_epochs: int = Field(description="the students' epochs over the real tokens")
    student_wd: float = Field(description="the students' weight decay")
    distill_w: float = Field(ge=0, lt=1, description="the synthetic share of a student's batches")
    student_seeds: int = Field(description="students distilled from the ensemble (seeds)")
    self_teachers: int = Field(description="single members (seeds 0..) that each teach one self-distilled student")
    distill_control: bool = Field(description="the student recipe on real data only, at the same steps")
    synthetic_shard_tokens: int = Field(description="synthdata's unit of resume; the synthetic budget itself is fixed "
                                                    "by a rule (distill.budget.synthetic_budget: one pass per student)")

    # -- distillation with soft labels (distill --blend); off by default
    soft_students: int = Field(0, description="soft-label students of distill_preset distilled from the ensemble "
                                              "(seeds)")
    soft_self_teachers: int = Field(0, description="single members (seeds 0..) that each teach one soft-label "
                                                   "student of their size")
    soft_control: bool = Field(False, description="the soft recipe's schedule on real data only, cross-entropy "
                                                  "alone, same steps")
    soft_epochs: int = Field(32, description="the soft recipe's epochs over the real tokens")
    soft_w: float = Field(0.25, ge=0, lt=1, description="the soft recipe's synthetic share (synthetic rows carry "
                                                        "the teacher's top-k: synthdata generate --topk)")
    soft_blend: float = Field(0.5, gt=0, le=1, description="the KD weight: loss = (1 - blend) CE + blend KL")
    soft_wd: float = Field(0.8, description="the soft recipe's weight decay")
    topk: int = Field(32, description="teacher tokens kept per position (synthdata annotate / generate --topk)")

    # -- downstream
    eval_tasks: tuple[str, ...] = Field(description="downstream task files: stems in --eval-dir")
    eval_limit: int | None = Field(description="items per downstream task (null: all)")
    next_word_items: int = Field(description="items of the held-out next-word task (0: none)")

    @field_validator("presets", "budget_presets")
    @classmethod
    def _known_presets(cls, presets: tuple[str, ...]) -> tuple[str, ...]:
        return _check_presets(presets)

    @field_validator("distill_preset")
    @classmethod
    def _known_distill_preset(cls, preset: str | None) -> str | None:
        return _check_presets((preset,))[0] if preset else preset

    @field_validator("gate_epochs")
    @classmethod
    def _gate_ladder(cls, epochs: tuple[int, ...]) -> tuple[int, ...]:
        if epochs and (len(epochs) < 3 or list(epochs) != sorted(set(epochs))):
            raise ValueError("must be >= 3 distinct epoch counts in increasing order: overfitting is a rise after a "
                             "fall")
        return epochs

    @field_validator("calibration")
    @classmethod
    def _markov_source(cls, record: dict | None) -> dict | None:
        if record is not None:
            from bench.science.calibration import CalibrationError, MarkovSource

            try:
                MarkovSource.from_record(record)
            except (CalibrationError, TypeError) as e:
                raise ValueError(str(e)) from e
        return record

    @model_validator(mode="after")
    def _fields_agree(self) -> StudyProfile:
        """The rules between fields, each naming the field at fault."""
        p = self
        if not set(p.budget_presets) <= set(p.presets):
            raise ProfileFieldError("budget_presets", f"must be among presets {list(p.presets)}")
        if p.distill_preset and p.distill_preset not in p.presets:
            raise ProfileFieldError("distill_preset", f"{p.distill_preset} is not in presets {list(p.presets)}")
        for field in ("self_teachers", "soft_self_teachers"):
            if getattr(p, field) > p.seeds:
                raise ProfileFieldError(field, f"exceeds the seeds trained at the regularized optimum "
                                               f"(seeds = {p.seeds})")
        if (p.soft_students or p.soft_self_teachers) and not p.distill_preset:
            raise ProfileFieldError("soft_students", "needs distill_preset")
        if any(d <= 0 or d == p.tokens for d in p.budgets):
            raise ProfileFieldError("budgets", f"must be positive and other than the main budget tokens = "
                                               f"{p.tokens} (it is added)")
        if p.gate_epochs and len(p.presets) < 2:
            raise ProfileFieldError("gate_epochs", "needs >= 2 presets: the gate compares the smallest and the "
                                                   "largest")
        if p.calibration is not None and p.chunk_tokens:
            raise ProfileFieldError("chunk_tokens", "cannot go with calibration: the floor is computed over whole "
                                                    "validation documents")
        return self

    def recorded(self) -> dict:
        """The profile as results.json records it (JSON types: lists, not tuples)."""
        return self.model_dump(mode="json")


def validate_profile(record: dict[str, Any], where: Path | str) -> StudyProfile:
    """A StudyProfile from a record (a profile file's content, or a profile with fields changed); a bad record
    raises StudyError naming `where` and every field at fault."""
    try:
        return StudyProfile.model_validate(record)
    except ValidationError as e:
        raise StudyError(f"{where}: {profile_problems(e)}") from None


def profile_problems(error: ValidationError) -> str:
    errors = error.errors()
    for kind, what in (("extra_forbidden", "unknown"), ("missing", "missing")):
        fields = sorted(str(e["loc"][0]) for e in errors if e["type"] == kind and len(e["loc"]) == 1)
        if fields:
            return f"{what} field(s) {', '.join(fields)}"
    problems = []
    for e in errors:
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, ProfileFieldError):
            problems.append(f"field {cause.field!r} {cause}")
        elif e["type"] == "value_error":
            problems.append(f"field {e['loc'][0]!r} {e['msg'].removeprefix('Value error, ')}")
        else:  # a type or bound: pydantic's words, and where inside the field (limits[1]) when it is nested
            inside = "".join(f"[{i}]" for i in e["loc"][1:])
            problems.append(f"field {e['loc'][0]!r}: {e['msg'].lower()}{f' at {inside}' if inside else ''} "
                            f"(got {e['input']!r})")
    return "; ".join(problems)


def load_profile(name: str) -> StudyProfile:
    """A profile by name (bench/profiles/<name>.json) or path; a bad file is named with the field at fault."""
    path = Path(name) if name.endswith(".json") else PROFILE_DIR / f"{name}.json"
    if not path.exists():
        raise StudyError(f"no study profile {name!r}: {path} does not exist (profiles: {', '.join(profile_names())})")
    return validate_profile(read_json(path, "study profile"), path)


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def profile_defaults() -> dict[str, Any]:
    """The fields a profile may leave out, at their defaults as results.json records them."""
    from pydantic_core import to_jsonable_python

    return {name: to_jsonable_python(f.default) for name, f in StudyProfile.model_fields.items()
            if not f.is_required()}
