"""The paper's recipe search: coordinate descent over (epochs, lr, weight decay) at one size and budget.

From the current point, run its one-step neighbours (epochs, lr and wd one grid step down and up: 6) and move
to the best; stop when the current point is best. The paper's rule decides what the stop means:

- *certified*: every neighbour exists, ran, and is worse (a strictly higher loss);
- an optimum on the edge of a grid is never certified: the grid is extended one step past the edge along the
  paper's ladders (epochs x2, lr on the 1-3-10 series, wd 0, 0.1, 0.2, 0.4, ...) and the descent goes on; an
  edge that cannot be extended (outside the space's `limits`) leaves the optimum *uncertified*, and says which.

A recipe may fix an axis (the standard recipe fixes wd at 0.1, its definition): a fixed axis is not searched,
and certification counts the neighbours of the free axes (4 for the standard recipe).

`descend` is the rule itself, a pure function of an objective (tested with fake objectives, no training);
`coordinate_descent` gives it a ledger-backed objective that trains: every finished run is a line in
ledger.jsonl keyed by its full configuration, so no run is repeated, a killed search resumes from the ledger
(each run from its checkpoint), and a round's trials that share an epoch count train as one stack.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from plumbing.artifacts import Ledger, atomic_write_json
from train.members import train_runs
from train.trainer import TrainConfig

log = logging.getLogger(__name__)

AXES = ("epochs", "lr", "wd")
Values = tuple[int, float, float]  # (epochs, lr, wd)
# How far a grid may be extended, per axis (inclusive): wide by default, a profile narrows it to bound cost.
DEFAULT_LIMITS = ((1, 256), (1e-5, 1e-1), (0.0, 51.2))


def _tidy(v: float) -> float:
    return float(f"{v:.4g}")


def ladder_step(axis: str, value: float, direction: int) -> float | None:
    """The next value past `value` on the paper's ladder of `axis` (direction +1 up, -1 down); None: none."""
    if axis == "epochs":
        nxt = value * 2 if direction > 0 else value // 2
        return int(nxt) if nxt >= 1 else None
    if axis == "lr":
        mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
        three = abs(mantissa - 3) < abs(mantissa - 1)  # 1-3-10 series: from 1 the step is x3, from 3 it is x10/3
        return _tidy(value * (10 / 3 if three else 3) if direction > 0 else value / (3 if three else 10 / 3))
    if axis == "wd":
        if direction > 0:
            return 0.1 if value == 0 else _tidy(value * 2)
        return None if value == 0 else (0.0 if value <= 0.1 + 1e-12 else _tidy(value / 2))
    raise ValueError(f"unknown axis {axis!r}; axes are {AXES}")


@dataclass(frozen=True)
class SearchSpace:
    epochs: tuple[int, ...]
    lrs: tuple[float, ...]
    wds: tuple[float, ...]
    fixed: tuple[str, ...] = ()  # axes not searched (the standard recipe: wd)
    limits: tuple[tuple[float, float], ...] = DEFAULT_LIMITS  # per axis: how far an edge may be extended

    def __post_init__(self):
        for axis, grid in zip(AXES, self.grids()):
            if not grid or list(grid) != sorted(set(grid)):
                raise ValueError(f"search grid {axis} must be non-empty, ascending and distinct (got {grid})")
        unknown = set(self.fixed) - set(AXES)
        if unknown:
            raise ValueError(f"unknown fixed axes {sorted(unknown)}; axes are {AXES}")

    @classmethod
    def default(cls) -> SearchSpace:
        """The paper's grid (../shared/docs/paper-recipe.md)."""
        return cls(epochs=(1, 2, 4, 8, 16, 32, 64), lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
                   wds=(0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4))

    @classmethod
    def standard(cls) -> SearchSpace:
        """The standard recipe: weight decay fixed at 0.1, epochs and lr tuned."""
        return dataclasses.replace(cls.default(), wds=(0.1,), fixed=("wd",))

    def replace(self, **kw) -> SearchSpace:
        return dataclasses.replace(self, **{k: tuple(sorted(v)) if k in ("epochs", "lrs", "wds") else v
                                            for k, v in kw.items()})

    def grids(self) -> tuple[tuple, tuple, tuple]:
        return self.epochs, self.lrs, self.wds

    def nearest(self, epochs: int, lr: float, wd: float) -> Values:
        """The grid point nearest to (epochs, lr, wd), axis by axis (log scale where the axis is)."""
        def snap(grid, v, log_scale):
            key = (lambda g: abs(math.log(g) - math.log(v))) if log_scale and v > 0 and all(grid) else \
                (lambda g: abs(g - v))
            return min(grid, key=key)
        return int(snap(self.epochs, epochs, True)), snap(self.lrs, lr, True), snap(self.wds, wd, False)

    def neighbours(self, p: Values) -> tuple[list[Values], list[str], SearchSpace]:
        """p's one-step neighbours on the free axes, extending an axis past its edge where the limits allow.

        Returns (neighbours, edges, space): `edges` names each missing neighbour ('wd above 6.4: limit 6.4'),
        `space` is this space with any extension added."""
        grids = [list(g) for g in self.grids()]
        out, edges = [], []
        for a, axis in enumerate(AXES):
            if axis in self.fixed:
                continue
            lo, hi = self.limits[a]
            for direction in (-1, 1):
                j = grids[a].index(p[a]) + direction
                if 0 <= j < len(grids[a]):
                    value = grids[a][j]
                else:
                    value = ladder_step(axis, p[a], direction)
                    if value is None or not lo <= value <= hi:
                        allowed = f"fixed at {lo:g}" if lo == hi else f"limited to {lo:g}..{hi:g}"
                        edges.append(f"{axis} {'below' if direction < 0 else 'above'} {p[a]:g}: "
                                     f"outside the search ({axis} {allowed})")
                        continue
                    grids[a] = sorted({*grids[a], value})
                q = list(p)
                q[a] = value
                out.append(tuple(q))
        space = dataclasses.replace(self, epochs=tuple(int(e) for e in grids[0]), lrs=tuple(grids[1]),
                                    wds=tuple(grids[2]))
        return out, edges, space


@dataclass(frozen=True)
class Descent:
    optimum: Values
    loss: float
    certified: bool
    reason: str  # why it stopped: certified, at an edge that cannot be extended, a tie, or out of rounds
    rounds: int
    space: SearchSpace  # the grids as extended
    losses: dict  # every point the objective was asked for -> loss


def descend(space: SearchSpace, start: Values, objective: Callable[[list[Values]], dict[Values, float]],
            max_rounds: int = 20) -> Descent:
    """Coordinate descent from `start` (snapped to the grid) by the paper's rule (module docstring).

    `objective(points)` returns a loss for every point asked; it is called once per round with the current
    point and its neighbours (a caller caches: a point is asked again in later rounds)."""
    current = space.nearest(*start)
    seen: dict[Values, float] = {}
    for rounds in range(1, max_rounds + 1):
        neighbours, edges, space = space.neighbours(current)
        seen.update(objective([current, *neighbours]))
        best = min([current, *neighbours], key=lambda q: seen[q])  # current first: a tie stays
        log.info("round %d at %s: loss %.4f; best %s: %.4f", rounds, current, seen[current], best, seen[best])
        if best != current:
            current = best
            continue
        ties = [q for q in neighbours if seen[q] == seen[current]]
        if edges:
            reason = "not certified: optimum at the edge of the allowed grid (" + "; ".join(edges) + ")"
        elif ties:
            reason = f"not certified: {len(ties)} neighbour(s) tie with it"
        else:
            reason = f"certified: all {len(neighbours)} neighbours ran and are worse"
        return Descent(current, seen[current], reason.startswith("certified"), reason, rounds, space, seen)
    return Descent(current, seen[current], False, f"not certified: still moving after {max_rounds} rounds",
                   max_rounds, space, seen)


def run_ledger(out_dir: Path) -> Ledger:
    """out_dir/ledger.jsonl: one record per finished run, keyed by the run's full configuration (its identity)."""
    return Ledger(out_dir / "ledger.jsonl")


def _run_record(cfg: TrainConfig, result: dict, run_dir: Path) -> dict:
    return {"epochs": cfg.epochs, "lr": cfg.lr, "wd": cfg.weight_decay, "seed": cfg.seed,
            "val_loss": result["val_loss"], "run_dir": str(run_dir)}


def _run_name(cfg: TrainConfig) -> str:
    return f"e{cfg.epochs}-lr{cfg.lr:g}-wd{cfg.weight_decay:g}-s{cfg.seed}"


def train_ledgered(configs: list[TrainConfig], out_dir: Path, address: str | None = None, parallel: int = 0,
                   separate: bool = False, desc: str = "runs") -> list[dict]:
    """Every config's ledger record in out_dir/ledger.jsonl, training (out_dir/runs/<name>) those it lacks."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger = run_ledger(out_dir)
    todo = list({ledger.key(c.identity()): c for c in configs if ledger.get(c.identity()) is None}.values())
    if todo:
        dirs = [out_dir / "runs" / _run_name(c) for c in todo]
        for c, d, r in zip(todo, dirs, train_runs(todo, dirs, address, parallel, separate, desc=desc)):
            ledger.add(c.identity(), _run_record(c, r, d))
    return [ledger.get(c.identity()) for c in configs]


def coordinate_descent(base: TrainConfig, space: SearchSpace, out_dir: str | Path,
                       start: tuple[int, float, float] | None = None, address: str | None = None,
                       parallel: int = 0, max_rounds: int = 20, separate: bool = False) -> dict:
    """Search from `start` (snapped to the grid) by `descend`, training through the ledger in out_dir.

    A round's trials that share an epoch count are trained as one stack (per-member lr and wd; train/stacked.py)
    unless `separate`, which runs each trial as its own Ray task."""
    out_dir = Path(out_dir)

    def config(p: Values) -> TrainConfig:
        e, lr, wd = p
        return dataclasses.replace(base, epochs=int(e), lr=lr, weight_decay=wd)

    def objective(points: list[Values]) -> dict[Values, float]:
        records = train_ledgered([config(p) for p in points], out_dir, address, parallel, separate, desc="trials")
        return {p: r["val_loss"] for p, r in zip(points, records)}

    d = descend(space, start or (base.epochs, base.lr, base.weight_decay), objective, max_rounds)
    if not d.certified:
        log.warning("%s; best so far %s", d.reason, d.optimum)
    e, lr, wd = d.optimum
    ran = {(r["epochs"], r["lr"], r["wd"], r["seed"]): r for r in run_ledger(out_dir).records.values()}
    runs = sorted((r for r in ran.values() if r["seed"] == base.seed), key=lambda r: r["val_loss"])
    outcome = {
        "optimum": {"epochs": e, "lr": lr, "wd": wd, "val_loss": d.loss},
        "certified": d.certified,
        "reason": d.reason,
        "rounds": d.rounds,
        "preset": base.preset,
        "tokens": base.tokens,
        "space": dataclasses.asdict(d.space),
        "runs": [{k: r[k] for k in ("epochs", "lr", "wd", "seed", "val_loss")} for r in runs
                 if (r["epochs"], r["lr"], r["wd"]) in d.losses],
    }
    atomic_write_json(out_dir / f"result-{'standard' if 'wd' in space.fixed else 'search'}.json", outcome)
    return outcome


def runs_table(outcome: dict) -> str:
    """The search's runs as a Markdown table, best first."""
    lines = ["| epochs | lr | wd | val loss |", "|---:|---:|---:|---:|"]
    for r in outcome["runs"]:
        lines.append(f"| {r['epochs']} | {r['lr']:g} | {r['wd']:g} | {r['val_loss']:.4f} |")
    return "\n".join(lines)
