"""A training run's directory: the one place that names its files, claims it for a run and reads it back.

Layout (a lone run, a stack member and a distilled student all write the same):
    run.json          the run's identity (TrainConfig.identity()): a run dir belongs to one run
    metrics.jsonl     one JSON line per log window and per validation pass
    checkpoint.json   while training: the live ckpt-<step>/ (train/checkpoint.py owns both)
    model/            the trained member: a Hugging Face directory, with chorus_run.json (the result again)
    result.json       written last: its presence means the run is complete
    mixture.json      a student's only (distill/): the mixture it consumed
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from plumbing.artifacts import atomic_write_json, read_json
from train.data import DataError


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @property
    def identity_file(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def result_file(self) -> Path:
        return self.path / "result.json"

    @property
    def mixture_file(self) -> Path:
        return self.path / "mixture.json"

    @property
    def complete(self) -> bool:
        return self.result_file.exists()

    def result(self) -> dict:
        """The finished run's result record; a corrupt one is named (ArtifactError)."""
        return read_json(self.result_file, "run result")

    def identity(self) -> dict:
        return read_json(self.identity_file, "run configuration")

    def claim(self, identity: dict) -> None:
        """Record the run's identity, or check that an existing run dir belongs to the same run."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.complete:  # a corrupt result is named here, not a traceback where it is read
            self.result()
        if self.identity_file.exists():
            existing = self.identity()
            if existing != identity:
                diff = sorted(k for k in set(existing) | set(identity) if existing.get(k) != identity.get(k))
                raise DataError(f"{self.path} belongs to another run configuration (differs in: {', '.join(diff)})")
            return
        atomic_write_json(self.identity_file, dict(sorted(identity.items())))

    def trim_metrics(self, last_step: int) -> None:
        """Drop metric lines written after the checkpoint we resume from: they will be written again."""
        path = self.metrics_file
        if not path.exists():
            return
        lines = [l for l in path.read_text().splitlines() if l.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    kept.append(line)
            except json.JSONDecodeError:
                break  # a line cut by the kill
        path.write_text("".join(l + "\n" for l in kept))
