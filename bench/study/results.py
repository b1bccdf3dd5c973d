"""A typed view of what a study measured, read from results.json (whose format on disk it does not change).

The analysis reads attributes of this view, not nested strings of the JSON: per model size its parameters, the
members' seed losses of both recipes and the ensemble subsets; the joint-recipe members and their ensembles; per
data-law budget each recipe's seed losses; the distilled students and controls. Only what the analysis reads is
kept; the report still renders the JSON.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bench.study.profile import recorded_profile

RECIPES = ("standard", "regularized")
# distill's record: each kind of student or control (results.json key) and its recipe in the analysis' rows
DISTILLED_RECIPES = {"ensemble": "student:ensemble", "self": "student:self", "control": "control",
                     "soft": "student:soft", "soft-self": "student:soft-self", "control-soft": "control:soft"}


@dataclass(frozen=True)
class SeedLoss:
    """One trained model: its seed and validation loss."""

    seed: int
    loss: float

    @classmethod
    def of(cls, row: dict) -> SeedLoss:
        return cls(row["seed"], row["val_loss"])


@dataclass(frozen=True)
class Subset:
    """One ensemble: the members' seeds (indices into the ensemble's members) and its validation loss."""

    seeds: list[int]
    loss: float


@dataclass(frozen=True)
class Size:
    """One model size N of the ladder: its non-embedding parameters and what was trained and evaluated there."""

    params: int
    members: dict[str, list[SeedLoss]] = field(default_factory=dict)  # recipe -> seeds at its optimum
    ensembles: list[Subset] = field(default_factory=list)  # every K-subset of the ensemble's members


@dataclass(frozen=True)
class JointMembers:
    """The joint phase at one size: the joint recipe's (epochs, lr, wd), its members and their K-subset ensembles."""

    setting: dict
    members: list[SeedLoss]
    ensembles: list[Subset]


@dataclass(frozen=True)
class Distilled:
    """The distillation phase: the students' size and, per kind (DISTILLED_RECIPES), its seeds."""

    preset: str | None = None
    runs: dict[str, list[SeedLoss]] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyResults:
    """results.json as the analysis reads it."""

    tokens: int  # the main budget D
    k_max: int
    presets: list[str]  # the profile's ladder, in order
    sizes: dict[str, Size]  # preset -> Size, for every size the search phase reached
    members_done: list[str]  # presets whose members were trained, in results.json's order
    ensembles_done: list[str]  # presets whose ensembles were evaluated, in results.json's order
    budgets: dict[str, dict[int, dict[str, list[float]]]]  # preset -> D -> recipe -> seeds' losses
    distilled: Distilled
    floor: float | None  # the calibration source's Bayes floor (a calibration profile only)
    joint: dict[str, JointMembers] = field(default_factory=dict)  # preset -> the joint phase there

    @classmethod
    def of(cls, results: dict | StudyResults) -> StudyResults:
        """The view of results.json's content (a view passes through)."""
        if isinstance(results, StudyResults):
            return results
        profile = recorded_profile(results)
        members, ensembles = results.get("members", {}), results.get("ensembles", {})
        sizes = {}
        for preset, s in results.get("search", {}).items():
            m = members.get(preset, {})
            sizes[preset] = Size(
                params=s["params"],
                members={r: [SeedLoss.of(row) for row in m[r]] for r in RECIPES if r in m},
                ensembles=[Subset(row["seeds"], row["loss"]) for row in ensembles.get(preset, [])])
        budgets = {preset: {int(d): {r: row[r]["seeds"] for r in RECIPES} for d, row in per_d.items()}
                   for preset, per_d in results.get("budgets", {}).items()}
        d = results.get("distill", {})
        distilled = Distilled(d.get("preset"), {kind: [SeedLoss.of(row) for row in d[kind]]
                                                for kind in DISTILLED_RECIPES if d.get(kind)})
        joint = {preset: JointMembers(j["setting"], [SeedLoss.of(row) for row in j["members"]],
                                      [Subset(row["seeds"], row["loss"]) for row in j["ensembles"]])
                 for preset, j in results.get("joint", {}).items()}
        return cls(tokens=profile.runs.tokens, k_max=profile.members.k_max, presets=list(profile.runs.presets),
                   sizes=sizes, members_done=list(members), ensembles_done=list(ensembles), budgets=budgets,
                   distilled=distilled, floor=results.get("calibration", {}).get("floor"), joint=joint)

    def params(self, preset: str) -> int:
        return self.sizes[preset].params

    @property
    def largest_params(self) -> int:
        return max((s.params for s in self.sizes.values()), default=0)
