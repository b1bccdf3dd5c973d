"""One study as one resumable job: its settings (StudyConfig), the Study that runs its phases in order and keeps
results.json, and run_study, which holds the output directory's lock while it runs."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from bench.study.analysis import write_report
from bench.study.distillation import DistillationPhases
from bench.study.profile import OWN_PHASE_SECTIONS, PHASES, StudyError, StudyProfile, validate_profile
from bench.study.training import TrainingPhases
from plumbing.artifacts import Ledger, OutputLock, atomic_write_json, read_json

log = logging.getLogger("bench.study")

PARTIAL_REPORT_EVERY_S = 300  # a phase ending this long after the last report writes a partial one


@dataclass(frozen=True)
class StudyConfig:
    """One invocation of a study: the profile and where and how this run of it works."""

    profile: StudyProfile
    out: str
    corpus: tuple[str, ...] = ()  # overrides the profile's corpus
    eval_dir: str | None = None
    data_dir: str | None = None  # an existing train/ dataset instead of building one from the corpus
    address: str | None = None
    n_boot: int = 200
    tasks: tuple[str, ...] = ()  # extra downstream task files
    command: str = ""
    past_gate: bool = False  # run the study on after a failed gate (the report keeps the verdict)


class Study(TrainingPhases, DistillationPhases):
    """Runs the phases of one study; `results` (results.json) is what the analysis and report read."""

    def __init__(self, cfg: StudyConfig):
        self.cfg, self.p = cfg, cfg.profile
        self.out = Path(cfg.out)
        self.data_dir = Path(cfg.data_dir) if cfg.data_dir else self.out / "data"
        self.results_path = self.out / "results.json"
        self.results = read_json(self.results_path, "study results") if self.results_path.exists() else {}
        if "profile" in self.results:  # a resumed study: its recorded profile (flat or nested) must be this one
            stored = validate_profile(self.results["profile"], f"{self.results_path} (its profile)")
            # a field added since the study started reads back at its default, so a profile that keeps the default
            # is the same study; the description is prose: rewording it does not make another study; a phase's own
            # section may change while that phase has not run (a finished study gains a joint phase, say)
            done = self.results.get("phases_done", [])
            open_sections = [s for s in OWN_PHASE_SECTIONS if s not in done]
            if diff := [f for f in self.p.differences(stored)
                        if f != "description" and f.split(".")[0] not in open_sections]:
                raise StudyError(f"{self.out} holds a study of another profile (differs in: {', '.join(diff)}); "
                                 "use another --out or the same settings")
        self.results["profile"] = self.p.recorded()  # nested, by section
        self.results.setdefault("phases_done", [])
        self.results.setdefault("seconds", {})
        self.results["command"] = cfg.command
        self.evals = Ledger(self.out / "evals.jsonl")  # evaluations done: a re-run evaluates nothing twice
        self.trained = 0  # runs this invocation actually trained (0 on a resumed, finished study)

    def save(self, phase: str | None = None) -> None:
        if phase and phase not in self.results["phases_done"]:
            self.results["phases_done"].append(phase)
        atomic_write_json(self.results_path, self.results)

    def run(self) -> dict:
        last_report = time.monotonic()
        for i, phase in enumerate(PHASES, 1):
            log.info("[%d/%d] phase %s", i, len(PHASES), phase)
            t = time.perf_counter()
            getattr(self, f"phase_{phase}")()
            if phase not in self.results["phases_done"] or phase not in self.results["seconds"]:
                self.results["seconds"][phase] = time.perf_counter() - t
            self.save(phase)
            if time.monotonic() - last_report > PARTIAL_REPORT_EVERY_S and phase != PHASES[-1]:
                write_report(self.results, self.out, self.cfg.n_boot)
                last_report = time.monotonic()
        self._release_ray()
        self.results["trained_last_invocation"] = self.trained
        self.results["evaluated_last_invocation"] = self.evals.computed
        self.save()
        write_report(self.results, self.out, self.cfg.n_boot)
        log.info("study complete: %s (this invocation trained %d runs, evaluated %d models)",
                 self.out / "REPORT.md", self.trained, self.evals.computed)
        return self.results


def run_study(cfg: StudyConfig) -> dict:
    """Run (or finish) the study in cfg.out and write its report; return results.json's content."""
    for c in cfg.corpus:
        if not Path(c).exists():
            raise StudyError(f"corpus {c} does not exist")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    with OutputLock(cfg.out):  # one study per directory: a second is refused, naming the first
        return Study(cfg).run()
