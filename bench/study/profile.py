"""What a study runs: its profile (bench/profiles/<name>.json), one validated pydantic model nested by stage
(a section per phase that reads it: data, runs, gate, recipes, members, data_law, serve, distill, downstream),
and the phases in order.

A profile is data: change the grid in its JSON file, not in code. Every field is described below (StudyProfile
and its sections); a bad file is refused with a StudyError naming the file and the field at fault by its path
(data_law.budget_presets). Field names are unique across sections, so a flat record (results.json's before the
sections) still reads, and each field keeps one flag in bench.pipeline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from plumbing.artifacts import read_json
from plumbing.console import ChorusError

ROOT = Path(__file__).resolve().parents[2]
PROFILE_DIR = ROOT / "bench" / "profiles"
PHASES = ("data", "gate", "search", "members", "ensembles", "joint", "budgets", "serve", "distill", "downstream")
# A section named for a phase that only that phase reads: a resumed study may change it while the phase has not run
# (a study is extended by a joint phase, say, without re-running what it measured)
OWN_PHASE_SECTIONS = ("gate", "joint", "serve", "distill", "downstream")


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


Presets = Annotated[tuple[str, ...], AfterValidator(_check_presets)]  # a ladder of train.model presets, checked
FROZEN = ConfigDict(extra="forbid", frozen=True)


class Data(BaseModel):
    """The data phase: the corpus and how it becomes a tokenizer and token shards."""

    model_config = FROZEN

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
    def _fields_agree(self) -> Data:
        if self.calibration is not None and self.chunk_tokens:
            raise ProfileFieldError("chunk_tokens", "cannot go with calibration: the floor is computed over whole "
                                                    "validation documents")
        return self


class Runs(BaseModel):
    """What every training run shares: the size ladder, the main budget, the window and the batch."""

    model_config = FROZEN

    presets: Presets = Field(min_length=1, description="the model-size ladder N (train.model presets)")
    tokens: int = Field(description="the main budget D")
    context: int = Field(description="every run's window length")
    batch_size: int = Field(description="every run's batch")
    checkpoint_every: int = Field(50, description="steps between checkpoints")


class Gate(BaseModel):
    """The gate phase (first, before the search; empty gate_epochs: no gate)."""

    model_config = FROZEN

    gate_epochs: tuple[int, ...] = Field(
        (), description="the standard recipe at the largest size at each of these epochs, beside regularized runs at "
        "`start` for the smallest and largest size; a failed gate stops the study (REPORT.md says why) unless "
        "--past-gate")
    gate_min_gap: float = Field(0.05, description="the gate passes when the largest size beats the smallest by this "
                                                  "many nats ...")
    gate_overfit: float = Field(0.02, description="... and the standard recipe's loss at its most epochs is this many "
                                                  "nats above its best")

    @field_validator("gate_epochs")
    @classmethod
    def _gate_ladder(cls, epochs: tuple[int, ...]) -> tuple[int, ...]:
        if epochs and (len(epochs) < 3 or list(epochs) != sorted(set(epochs))):
            raise ValueError("must be >= 3 distinct epoch counts in increasing order: overfitting is a rise after a "
                             "fall")
        return epochs


class Recipes(BaseModel):
    """The search phase: both recipes searched from `start`, or fixed there."""

    model_config = FROZEN

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


class Members(BaseModel):
    """The members phase: the seeds at both optima, and the ensemble's members (the ensembles phase reads k_max)."""

    model_config = FROZEN

    seeds: int = Field(ge=2, description="seeds trained at every reported optimum (both recipes): an optimum's "
                                         "uncertainty comes from its seeds")
    k_max: int = Field(ge=2, description="ensembles of K = 1 .. k_max members at each N")
    joint_members: bool = Field(description="ensemble members at the joint recipe (2x epochs, 0.5x wd of the "
                                            "optimum) or at the optimum itself")


class Joint(BaseModel):
    """The joint phase: members at the joint recipe (2x epochs, 0.5x wd of the regularized optimum, same lr) at a
    few sizes, their ensembles beside those of the optimum's members (the paper at 300M: K -> inf 3.27 with such
    members vs 3.34)."""

    model_config = FROZEN

    joint_presets: Presets = Field((), description="sizes (among presets) where k_max more members train at the "
                                                   "joint recipe and their K-subset ensembles are evaluated; empty: "
                                                   "no joint phase")


class DataLaw(BaseModel):
    """The budgets phase: both recipes searched again at other budgets D."""

    model_config = FROZEN

    budgets: tuple[int, ...] = Field(description="other budgets D (the main one is added) at which both recipes "
                                                 "are searched again")
    budget_presets: Presets = Field(description="the sizes (among presets) searched at each budget")
    budget_seeds: int | None = Field(None, ge=2, description="seeds at each budget's optima (absent: `seeds`); a "
                                                             "budget's optimum needs its seed noise too")


class Serve(BaseModel):
    """The serve phase."""

    model_config = FROZEN

    serve_check: bool = Field(description="pack the ensemble and check the Ray Serve endpoint with real requests")


class Distill(BaseModel):
    """The distill phase: sequence-level students on real + synthetic tokens, and students with soft labels
    (distill --blend; off by default)."""

    model_config = FROZEN

    distill_preset: str | None = Field(description="the students' size (among presets); null: no distillation")
    student_epochs: int = Field(description="the students' epochs over the real tokens")
    student_wd: float = Field(description="the students' weight decay")
    distill_w: float = Field(ge=0, lt=1, description="the synthetic share of a student's batches")
    student_seeds: int = Field(description="students distilled from the ensemble (seeds)")
    self_teachers: int = Field(description="single members (seeds 0..) that each teach one self-distilled student")
    distill_control: bool = Field(description="the student recipe on real data only, at the same steps")
    synthetic_shard_tokens: int = Field(description="synthdata's unit of resume; the synthetic budget itself is fixed "
                                                    "by a rule (distill.budget.synthetic_budget: one pass per student)")

    # -- soft labels
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

    @field_validator("distill_preset")
    @classmethod
    def _known_distill_preset(cls, preset: str | None) -> str | None:
        return _check_presets((preset,))[0] if preset else preset

    @model_validator(mode="after")
    def _fields_agree(self) -> Distill:
        if (self.soft_students or self.soft_self_teachers) and not self.distill_preset:
            raise ProfileFieldError("soft_students", "needs distill_preset")
        return self


class Downstream(BaseModel):
    """The downstream phase: zero-shot accuracy."""

    model_config = FROZEN

    eval_tasks: tuple[str, ...] = Field(description="downstream task files: stems in --eval-dir")
    eval_limit: int | None = Field(description="items per downstream task (null: all)")
    next_word_items: int = Field(description="items of the held-out next-word task (0: none)")


class StudyProfile(BaseModel):
    """What one study runs: its name and description, and one section per stage, in the order of the phases
    that read them. A flat record (every field at the top, as results.json recorded profiles before the
    sections) is read into its sections."""

    model_config = FROZEN

    name: str = Field(description="printed at the top of the report")
    description: str = Field(description="printed at the top of the report: why the settings are what they are")
    data: Data
    runs: Runs
    gate: Gate = Field(default_factory=Gate)
    recipes: Recipes
    members: Members
    joint: Joint = Field(default_factory=Joint)
    data_law: DataLaw
    serve: Serve
    distill: Distill
    downstream: Downstream

    @model_validator(mode="before")
    @classmethod
    def _sections_of_flat_record(cls, record: Any) -> Any:
        """A flat record's fields moved into their sections (FIELD_SECTION); an unknown field stays at the top,
        where it is refused by name."""
        if not isinstance(record, dict) or not (flat := [k for k in record if k in FIELD_SECTION]):
            return record
        if given := [k for k in record if k in SECTIONS]:
            raise ProfileFieldError(flat[0], f"is a flat field beside the section(s) {', '.join(given)}: write it "
                                             f"inside its section {FIELD_SECTION[flat[0]]!r}")
        nested: dict[str, Any] = {}
        for key, value in record.items():
            if key in FIELD_SECTION:
                nested.setdefault(FIELD_SECTION[key], {})[key] = value
            else:
                nested[key] = value
        return nested

    @model_validator(mode="after")
    def _sections_agree(self) -> StudyProfile:
        """The rules between fields of different sections, each naming the field at fault by its path."""
        presets, seeds = self.runs.presets, self.members.seeds
        if not set(self.data_law.budget_presets) <= set(presets):
            raise ProfileFieldError("data_law.budget_presets", f"must be among presets {list(presets)}")
        if self.distill.distill_preset and self.distill.distill_preset not in presets:
            raise ProfileFieldError("distill.distill_preset", f"{self.distill.distill_preset} is not in presets "
                                                              f"{list(presets)}")
        for field in ("self_teachers", "soft_self_teachers"):
            if getattr(self.distill, field) > seeds:
                raise ProfileFieldError(f"distill.{field}", f"exceeds the seeds trained at the regularized optimum "
                                                            f"(seeds = {seeds})")
        if any(d <= 0 or d == self.runs.tokens for d in self.data_law.budgets):
            raise ProfileFieldError("data_law.budgets", f"must be positive and other than the main budget tokens = "
                                                        f"{self.runs.tokens} (it is added)")
        if not set(self.joint.joint_presets) <= set(presets):
            raise ProfileFieldError("joint.joint_presets", f"must be among presets {list(presets)}")
        if self.joint.joint_presets and self.members.joint_members:
            raise ProfileFieldError("joint.joint_presets", "cannot go with members.joint_members: the ensembles' "
                                                           "members are at the joint recipe already")
        if self.gate.gate_epochs and len(presets) < 2:
            raise ProfileFieldError("gate.gate_epochs", "needs >= 2 presets: the gate compares the smallest and the "
                                                        "largest")
        return self

    def recorded(self) -> dict:
        """The profile as results.json records it (JSON types: lists, not tuples)."""
        return self.model_dump(mode="json")

    def differences(self, other: StudyProfile) -> list[str]:
        """The fields (by path: name, distill.distill_w) whose values differ from other's."""
        mine, theirs = self.recorded(), other.recorded()
        return ([k for k in ("name", "description") if mine[k] != theirs[k]]
                + [f"{s}.{f}" for s in SECTIONS for f in mine[s] if mine[s][f] != theirs[s][f]])


# The sections, and the one table of which section holds each field: a flat record's keys map through it and
# the pipeline's flags (one per field, named for the field alone) are derived from it.
SECTIONS: dict[str, type[BaseModel]] = {name: f.annotation for name, f in StudyProfile.model_fields.items()
                                        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
FIELD_SECTION: dict[str, str] = {field: section for section, model in SECTIONS.items() for field in model.model_fields}
if len(FIELD_SECTION) != sum(len(m.model_fields) for m in SECTIONS.values()):
    raise TypeError("a field name is in two sections: a flat record and the pipeline's flags need unique names")


def validate_profile(record: dict[str, Any], where: Path | str) -> StudyProfile:
    """A StudyProfile from a record (a profile file's content, or a profile with fields changed); a bad record
    raises StudyError naming `where` and every field at fault."""
    try:
        return StudyProfile.model_validate(record)
    except ValidationError as e:
        raise StudyError(f"{where}: {profile_problems(e)}") from None


def profile_problems(error: ValidationError) -> str:
    """The fields at fault, each by its path (runs.presets, recipes.limits): pydantic's locations are the
    section, the field and, inside a field, the item."""
    def field_path(loc: tuple) -> tuple[str, tuple]:
        depth = 2 if loc and loc[0] in SECTIONS else 1  # a field is a section's, or name/description/a section
        return ".".join(map(str, loc[:depth])), loc[depth:]

    errors = error.errors()
    for kind, what in (("extra_forbidden", "unknown"), ("missing", "missing")):
        fields = sorted(path for path, inside in map(field_path, (e["loc"] for e in errors if e["type"] == kind))
                        if not inside)
        if fields:
            return f"{what} field(s) {', '.join(fields)}"
    problems = []
    for e in errors:
        path, inside = field_path(e["loc"])
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, ProfileFieldError):  # a rule between fields, raised by the model that holds both
            problems.append(f"field {'.'.join(filter(None, (path, cause.field)))!r} {cause}")
        elif e["type"] == "value_error":
            problems.append(f"field {path!r} {e['msg'].removeprefix('Value error, ')}")
        else:  # a type or bound: pydantic's words, and where inside the field (limits[1]) when it is nested
            where = "".join(f"[{i}]" for i in inside)
            problems.append(f"field {path!r}: {e['msg'].lower()}{f' at {where}' if where else ''} "
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


def recorded_profile(results: dict) -> StudyProfile:
    """The profile a study's results.json records: flat (as before the sections) or nested."""
    return validate_profile(results["profile"], "results.json's profile")
