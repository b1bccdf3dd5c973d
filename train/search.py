"""The paper's recipe search: coordinate descent over (epochs, lr, weight decay) at one size and budget.

From a candidate, run its one-step neighbours on the grid (epochs +-1, lr +-1, wd +-1; up to 6) and
move to the best. A point is *certified* when all its in-grid neighbours have run and none is
lower. Every finished run is a line in ledger.jsonl keyed by its full configuration, so no run is
repeated and a killed search resumes from the ledger (and each run itself resumes from its checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from train.members import run_trainings
from train.trainer import TrainConfig

log = logging.getLogger(__name__)

Point = tuple[int, int, int]  # indices into (epochs, lrs, wds)


@dataclass(frozen=True)
class SearchSpace:
    epochs: tuple[int, ...]
    lrs: tuple[float, ...]
    wds: tuple[float, ...]

    @classmethod
    def default(cls) -> "SearchSpace":
        """The paper's grid (../shared/docs/paper-recipe.md)."""
        return cls(epochs=(1, 2, 4, 8, 16, 32, 64), lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
                   wds=(0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4))

    @classmethod
    def standard(cls) -> "SearchSpace":
        """The standard recipe: weight decay fixed at 0.1, epochs and lr tuned."""
        return dataclasses.replace(cls.default(), wds=(0.1,))

    def replace(self, **kw) -> "SearchSpace":
        return dataclasses.replace(self, **{k: tuple(sorted(v)) for k, v in kw.items()})

    def values(self, p: Point) -> tuple[int, float, float]:
        return self.epochs[p[0]], self.lrs[p[1]], self.wds[p[2]]

    def nearest(self, epochs: int, lr: float, wd: float) -> Point:
        def idx(grid, v):
            return min(range(len(grid)), key=lambda i: abs(grid[i] - v))
        return idx(self.epochs, epochs), idx(self.lrs, lr), idx(self.wds, wd)

    def neighbours(self, p: Point) -> list[Point]:
        sizes = (len(self.epochs), len(self.lrs), len(self.wds))
        out = []
        for axis in range(3):
            for step in (-1, 1):
                q = list(p)
                q[axis] += step
                if 0 <= q[axis] < sizes[axis]:
                    out.append(tuple(q))
        return out


class Ledger:
    """Append-only JSON lines, one per finished run, keyed by the run's full configuration."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: that run is found again from its result.json
                self.records[rec["key"]] = rec

    @staticmethod
    def key(cfg: TrainConfig) -> str:
        return json.dumps(cfg.identity(), sort_keys=True)

    def get(self, cfg: TrainConfig) -> dict | None:
        return self.records.get(self.key(cfg))

    def add(self, cfg: TrainConfig, result: dict, run_dir: Path) -> dict:
        rec = {"key": self.key(cfg), "epochs": cfg.epochs, "lr": cfg.lr, "wd": cfg.weight_decay,
               "seed": cfg.seed, "val_loss": result["val_loss"], "run_dir": str(run_dir)}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[rec["key"]] = rec
        return rec


def _run_name(cfg: TrainConfig) -> str:
    return f"e{cfg.epochs}-lr{cfg.lr:g}-wd{cfg.weight_decay:g}-s{cfg.seed}"


def coordinate_descent(base: TrainConfig, space: SearchSpace, out_dir: str | Path,
                       start: tuple[int, float, float] | None = None, address: str | None = None,
                       parallel: int = 0, max_rounds: int = 20) -> dict:
    """Search from `start` (snapped to the grid); return the certified optimum and every run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out_dir / "ledger.jsonl")
    start = start or (base.epochs, base.lr, base.weight_decay)
    current = space.nearest(*start)

    def config(p: Point) -> TrainConfig:
        e, lr, wd = space.values(p)
        return dataclasses.replace(base, epochs=e, lr=lr, weight_decay=wd)

    def evaluate(points: list[Point]) -> dict[Point, float]:
        todo = [p for p in points if ledger.get(config(p)) is None]
        if todo:
            cfgs = [config(p) for p in todo]
            dirs = [out_dir / "runs" / _run_name(c) for c in cfgs]
            for c, d, r in zip(cfgs, dirs, run_trainings(cfgs, dirs, address, parallel, desc="trials")):
                ledger.add(c, r, d)
        return {p: ledger.get(config(p))["val_loss"] for p in points}

    certified, rounds = False, 0
    while rounds < max_rounds:
        rounds += 1
        losses = evaluate([current] + space.neighbours(current))
        best = min(losses, key=losses.get)
        log.info("round %d at %s: loss %.4f; best neighbour %s: %.4f", rounds, space.values(current),
                 losses[current], space.values(best), losses[best])
        if best == current:
            certified = True
            break
        current = best

    runs = sorted(ledger.records.values(), key=lambda r: r["val_loss"])
    e, lr, wd = space.values(current)
    outcome = {
        "optimum": {"epochs": e, "lr": lr, "wd": wd, "val_loss": ledger.get(config(current))["val_loss"]},
        "certified": certified,
        "rounds": rounds,
        "preset": base.preset,
        "tokens": base.tokens,
        "space": dataclasses.asdict(space),
        "runs": [{k: r[k] for k in ("epochs", "lr", "wd", "seed", "val_loss")} for r in runs],
    }
    tmp = out_dir / "result.json.tmp"
    tmp.write_text(json.dumps(outcome, indent=1))
    os.replace(tmp, out_dir / "result.json")
    if not certified:
        log.warning("no certified optimum after %d rounds; best so far %s", rounds, outcome["optimum"])
    return outcome


def runs_table(outcome: dict) -> str:
    """The search's runs as a Markdown table, best first."""
    lines = ["| epochs | lr | wd | val loss |", "|---:|---:|---:|---:|"]
    for r in outcome["runs"]:
        lines.append(f"| {r['epochs']} | {r['lr']:g} | {r['wd']:g} | {r['val_loss']:.4f} |")
    return "\n".join(lines)
