"""The paper-style study: one command runs the grid at a profile and writes REPORT.md with PNG plots.

    python -m bench.study --profile tiny --corpus ../shared/data/corpus/enwiki2015_30k.jsonl.zst --out studies/tiny-wiki

Phases, each resumable and each followed by a (partial) report:
    data        corpus -> tokenizer + token shards (train.data.prepare_dataset)
    search      per model size N: coordinate descent for the regularized recipe (wd tuned) and the standard
                recipe (wd 0.1), sharing one run ledger per (N, budget) (train.search)
    members     per N: seeds 1..K-1 at the regularized optimum (seed 0 is the search's run)
    ensembles   per N: validation loss of every K-subset of those members (logit average)
    budgets     smaller token budgets D: the standard and regularized optima retrained at each D
    distill     the K-member ensemble and one member sample synthetic tokens (synthdata); students train on
                real + synthetic tokens (distill)
    downstream  zero-shot accuracy of each recipe's model (bench.downstream)

Every training run goes through train/'s ledgers (`train.search.Ledger`, `train.members.run_trainings`), so a
killed study continues where it stopped and a finished run is never repeated; every evaluation is cached in
OUT/evals.jsonl. What the report needs is collected in OUT/results.json; `--report-only` rewrites REPORT.md
and the plots from it (no training, no evaluation).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from train.artifacts import OutputLock, atomic_write_json
from train.console import exit_on, setup_logging
from train.search import Ledger

log = logging.getLogger("bench.study")

PHASES = ("data", "search", "members", "ensembles", "budgets", "distill", "downstream")
PARTIAL_REPORT_EVERY_S = 300  # a phase ending this long after the last report writes a partial one (fits cost seconds)


@dataclass(frozen=True)
class StudyProfile:
    """The grid of one study: model sizes, budget, search space, ensembles, budgets, distillation, evaluation."""

    name: str
    presets: tuple[str, ...]  # the model-size ladder N (train.model.PRESETS)
    tokens: int  # the main budget D
    vocab_size: int
    max_chars: int | None  # corpus characters read (None: all)
    val_tokens: int
    context: int
    batch_size: int
    epochs: tuple[int, ...]  # the search grid
    lrs: tuple[float, ...]
    wds: tuple[float, ...]
    start: tuple[int, float, float]  # (epochs, lr, wd) where both searches start
    k_max: int  # ensembles of K = 1 .. k_max members at each N
    joint_members: bool  # members at the joint recipe (2x epochs, 0.5x wd) rather than the single-model optimum
    budgets: tuple[int, ...]  # smaller budgets D for the data law (the main budget is added)
    budget_presets: tuple[str, ...]  # sizes retrained at those budgets (the data law is the best over them)
    distill_preset: str  # teacher members and students
    synthetic_tokens: int
    synthetic_shard_tokens: int
    student_epochs: int
    student_wd: float
    distill_w: float
    eval_tasks: tuple[str, ...]  # file stems in --eval-dir
    eval_limit: int | None
    max_rounds: int = 20
    checkpoint_every: int = 50


PROFILES: dict[str, StudyProfile] = {
    # Seconds to minutes: exercises every phase and every report section (tests/bench/test_study.py).
    "micro": StudyProfile(
        name="micro", presets=("cpu-xs", "cpu-s", "cpu-m"), tokens=6_000, vocab_size=2048, max_chars=2_000_000,
        val_tokens=4_000, context=64, batch_size=16, epochs=(1,), lrs=(3e-3,), wds=(0.1, 0.8), start=(1, 3e-3, 0.8),
        k_max=3, joint_members=False, budgets=(2_000, 4_000), budget_presets=("cpu-xs", "cpu-s"),
        distill_preset="cpu-xs", synthetic_tokens=3_000, synthetic_shard_tokens=1_500, student_epochs=1,
        student_wd=0.1, distill_w=0.5, eval_tasks=("piqa", "arc_easy", "lambada_openai"), eval_limit=16,
        checkpoint_every=1000),
    # Sized to finish within ~2 hours on this 2-core box: the pilot's (../shared/docs/pilot-cpu-scale.md)
    # context 128, epochs {8, 16}, K = 3, but D = 100k and the ladder hidden 32 / 64 / 128 (the pilot's hidden 192
    # alone would take as long as the other two sizes). One lr (the pilot's 3e-3): the lr axis would triple the
    # runs. wd goes up to the paper's 6.4 and the search starts at the middle of the paper's optima (16 epochs,
    # wd 1.6): at D = 100k a 1M-parameter member has ~10 parameters per token, more than the paper's largest
    # (1.4B on 200M), and a first run with wd <= 1.6 from (8, 0.8) stopped at cpu-s in a local optimum, (8, 0.1)
    # at 5.511, while (16, 3.2) gives 5.267. Synthetic tokens: enough for one pass of the student (782 real windows
    # x 8 epochs x w / (1 - w) = 18.8k windows of 128): with 400k, each was used 6.2 times and the student kept 0%
    # of the ensemble's gain (50% with 2.5M; BENCHMARKS.md, "Distillation").
    "tiny": StudyProfile(
        name="tiny", presets=("cpu-xxs", "cpu-xs", "cpu-s"), tokens=100_000, vocab_size=2048, max_chars=8_000_000,
        val_tokens=50_000, context=128, batch_size=32, epochs=(8, 16), lrs=(3e-3,), wds=(0.1, 0.8, 1.6, 3.2, 6.4),
        start=(16, 3e-3, 1.6), k_max=3, joint_members=False, budgets=(25_000, 50_000),
        budget_presets=("cpu-xxs", "cpu-xs"), distill_preset="cpu-xs", synthetic_tokens=2_500_000,
        synthetic_shard_tokens=250_000, student_epochs=8, student_wd=0.1, distill_w=0.75,
        eval_tasks=("piqa", "arc_easy", "arc_challenge", "openbook_qa", "copa", "lambada_openai"), eval_limit=500),
    # One GPU, hours: the top of the CPU ladder and the smallest paper shape, 20M tokens.
    "small": StudyProfile(
        name="small", presets=("cpu-l", "cpu-xl", "150m"), tokens=20_000_000, vocab_size=16_384, max_chars=None,
        val_tokens=1_000_000, context=512, batch_size=64, epochs=(4, 8, 16, 32), lrs=(1e-3, 3e-3, 1e-2),
        wds=(0.1, 0.4, 0.8, 1.6, 3.2), start=(8, 3e-3, 0.8), k_max=5, joint_members=True,
        budgets=(5_000_000, 10_000_000), budget_presets=("cpu-l", "cpu-xl", "150m"), distill_preset="cpu-xl",
        synthetic_tokens=100_000_000, synthetic_shard_tokens=1_000_000, student_epochs=16, student_wd=0.1,
        distill_w=0.75, eval_tasks=("piqa", "arc_easy", "arc_challenge", "openbook_qa", "copa", "lambada_openai"),
        eval_limit=None),
    # The paper's shapes and 200M-token budget (../shared/docs/paper-recipe.md), on a Ray cluster of GPUs.
    # Needs a corpus of well over 200M tokens (the bundled Wikipedia file is ~88M).
    "paper": StudyProfile(
        name="paper", presets=("150m", "300m", "600m", "1.4b"), tokens=200_000_000, vocab_size=32_768,
        max_chars=None, val_tokens=4_194_304, context=4096, batch_size=64, epochs=(1, 2, 4, 8, 16, 32, 64),
        lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2), wds=(0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4),
        start=(8, 3e-3, 0.8), k_max=5, joint_members=True, budgets=(50_000_000, 100_000_000),
        budget_presets=("150m", "300m", "600m", "1.4b"), distill_preset="300m", synthetic_tokens=800_000_000,
        synthetic_shard_tokens=4_000_000, student_epochs=16, student_wd=0.1, distill_w=0.75,
        eval_tasks=("piqa", "arc_easy", "arc_challenge", "openbook_qa", "copa", "lambada_openai"), eval_limit=None,
        checkpoint_every=100),
}


class StudyError(ValueError):
    """A study that cannot run: bad profile, corpus, output directory or settings."""


@dataclass(frozen=True)
class StudyConfig:
    profile: StudyProfile
    corpus: tuple[str, ...]
    out: str
    eval_dir: str | None = None
    data_dir: str | None = None  # an existing train/ dataset instead of building one from the corpus
    address: str | None = None
    parallel: int = 1
    n_boot: int = 200
    command: str = ""


# ---- bookkeeping: results.json and the evaluation cache --------------------------------------------

def _write_json(path: Path, record) -> None:
    atomic_write_json(path, record)


def model_ids(model_dirs: list[str]) -> list[list]:
    """What an evaluation is of: each model directory with its weights' recorded sha256, so that a model
    retrained in place (same directory, new weights) is evaluated anew, not answered from the cache."""
    from serve.pack import recorded_sha256
    from train.data import sha256_file

    def weights_sha256(d: str) -> str:
        recorded = recorded_sha256(d)  # written when the directory was made; hashing is the fallback
        return recorded[0] if recorded else sha256_file(Path(d) / "model.safetensors")

    return [[str(d), weights_sha256(d)] for d in model_dirs]


class EvalCache(Ledger):
    """Evaluations already done, in the same append-only JSON lines as train/'s run ledger but keyed by what
    was evaluated: a re-run evaluates nothing twice."""

    computed = 0  # evaluations this process actually ran

    def get(self, key: dict, compute):
        k = json.dumps(key, sort_keys=True)
        if k not in self.records:
            record = {"key": k, "value": compute()}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.records[k] = record
            self.computed += 1
        return self.records[k]["value"]


# ---- the phases ----------------------------------------------------------------------------------

class Study:
    """Runs the phases of one study; `results` (results.json) is what the report is written from."""

    def __init__(self, cfg: StudyConfig):
        self.cfg, self.p = cfg, cfg.profile
        self.out = Path(cfg.out)
        self.data_dir = Path(cfg.data_dir) if cfg.data_dir else self.out / "data"
        self.results_path = self.out / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        profile = json.loads(json.dumps(dataclasses.asdict(self.p)))  # as it reads back from results.json
        if self.results.setdefault("profile", profile) != profile:
            diff = sorted(k for k in profile if self.results["profile"].get(k) != profile[k])
            raise StudyError(f"{self.out} holds a study of another profile (differs in: {', '.join(diff)}); "
                             "use another --out or the same settings")
        self.results.setdefault("phases_done", [])
        self.results["command"] = cfg.command
        self.evals = EvalCache(self.out / "evals.jsonl")
        self.trained = 0  # runs this invocation actually trained (0 on a resumed, finished study)

    def save(self, phase: str | None = None) -> None:
        if phase and phase not in self.results["phases_done"]:
            self.results["phases_done"].append(phase)
        _write_json(self.results_path, self.results)

    # -- training through train/'s ledgers

    def base_config(self, preset: str, tokens: int):
        from train.trainer import TrainConfig

        e, lr, wd = self.p.start
        return TrainConfig(data_dir=str(self.data_dir.resolve()), preset=preset, tokens=tokens, epochs=e, lr=lr,
                           weight_decay=wd, batch_size=self.p.batch_size, context=self.p.context,
                           checkpoint_every=self.p.checkpoint_every)

    def ledger_dir(self, preset: str, tokens: int) -> Path:
        return self.out / "runs" / preset / f"d{tokens}"

    def train_configs(self, configs: list, ledger_dir: Path) -> list[dict]:
        """Run whatever of `configs` the ledger at `ledger_dir` does not hold yet; every config's ledger record."""
        from train.members import run_trainings
        from train.search import _run_name  # the search's own run-directory names: one layout per ledger

        ledger_dir.mkdir(parents=True, exist_ok=True)
        ledger = Ledger(ledger_dir / "ledger.jsonl")
        todo = [c for c in configs if ledger.get(c) is None]
        if todo:
            dirs = [ledger_dir / "runs" / _run_name(c) for c in todo]
            fresh = sum(not (d / "result.json").exists() for d in dirs)
            for c, d, r in zip(todo, dirs, run_trainings(todo, dirs, self.cfg.address, self.cfg.parallel)):
                ledger.add(c, r, d)
            self.trained += fresh
        return [ledger.get(c) for c in configs]

    def search(self, preset: str, standard: bool) -> dict:
        from train.search import SearchSpace, coordinate_descent

        space = SearchSpace(epochs=self.p.epochs, lrs=self.p.lrs, wds=(0.1,) if standard else self.p.wds)
        ledger_dir = self.ledger_dir(preset, self.p.tokens)
        before = len(Ledger(ledger_dir / "ledger.jsonl").records)
        outcome = coordinate_descent(self.base_config(preset, self.p.tokens), space, ledger_dir,
                                     start=self.p.start[:2] + ((0.1,) if standard else self.p.start[2:]),
                                     address=self.cfg.address, parallel=self.cfg.parallel,
                                     max_rounds=self.p.max_rounds)
        self.trained += len(Ledger(ledger_dir / "ledger.jsonl").records) - before
        optimum = outcome["optimum"]
        record = Ledger(ledger_dir / "ledger.jsonl").get(self.optimum_config(preset, optimum, self.p.tokens))
        return {**optimum, "certified": outcome["certified"], "rounds": outcome["rounds"],
                "model_dir": str(Path(record["run_dir"]) / "model"),
                "runs": [r for r in outcome["runs"] if not standard or r["wd"] == 0.1]}

    def optimum_config(self, preset: str, optimum: dict, tokens: int, seed: int = 0):
        return dataclasses.replace(self.base_config(preset, tokens), epochs=optimum["epochs"], lr=optimum["lr"],
                                   weight_decay=optimum["wd"], seed=seed)

    def member_config(self, preset: str, seed: int):
        from train.members import joint_recipe

        opt = self.results["search"][preset]["regularized"]
        cfg = self.optimum_config(preset, opt, self.p.tokens, seed)
        if self.p.joint_members:
            epochs, wd = joint_recipe(opt["epochs"], opt["wd"])
            cfg = dataclasses.replace(cfg, epochs=epochs, weight_decay=wd)
        return cfg

    # -- phases

    def phase_data(self) -> None:
        from train.data import DatasetSpec, load_tokens, prepare_dataset, read_manifest

        if self.cfg.data_dir:
            manifest = read_manifest(self.data_dir)
            log.info("using the existing dataset %s (the profile's corpus settings do not apply)", self.data_dir)
        else:
            spec = DatasetSpec(corpus=self.cfg.corpus, vocab_size=self.p.vocab_size, val_max_tokens=self.p.val_tokens,
                               max_chars=self.p.max_chars)
            manifest = prepare_dataset(spec, self.data_dir)
        needed = max((self.p.tokens, *self.p.budgets))
        load_tokens(self.data_dir, "train", needed, verify=False)  # a corpus too small fails here, named
        self.results["dataset"] = {"corpus": [str(self.data_dir)] if self.cfg.data_dir else list(self.cfg.corpus),
                                   "vocab_size": manifest["vocab_size"],
                                   "train_tokens": manifest["splits"]["train"]["tokens"],
                                   "val_tokens": manifest["splits"]["val"]["tokens"]}

    def phase_search(self) -> None:
        from train.model import get_shape

        search = self.results.setdefault("search", {})
        for preset in self.p.presets:
            log.info("search at N = %s (%d tokens): regularized, then standard", preset, self.p.tokens)
            search[preset] = {"params": get_shape(preset).non_embedding_params(),
                              "regularized": self.search(preset, standard=False),
                              "standard": self.search(preset, standard=True)}
            self.save()

    def phase_members(self) -> None:
        members = self.results.setdefault("members", {})
        for preset in self.p.presets:
            configs = [self.member_config(preset, seed) for seed in range(self.p.k_max)]
            records = self.train_configs(configs, self.ledger_dir(preset, self.p.tokens))
            members[preset] = [{"seed": c.seed, "epochs": c.epochs, "wd": c.weight_decay, "val_loss": r["val_loss"],
                                "model_dir": str(Path(r["run_dir"]) / "model")} for c, r in zip(configs, records)]
            self.save()

    def ensemble_loss(self, model_dirs: list[str]) -> float:
        from bench.evaluate import validation_loss

        key = {"kind": "loss", "models": model_ids(model_dirs), "combine": "logits"}
        return self.evals.get(key, lambda: validation_loss(model_dirs, self.data_dir, "logits", progress=False))["loss"]

    def phase_ensembles(self) -> None:
        ensembles = self.results.setdefault("ensembles", {})
        for preset in self.p.presets:
            dirs = [m["model_dir"] for m in self.results["members"][preset]]
            rows = []
            for k in range(1, len(dirs) + 1):
                for subset in itertools.combinations(range(len(dirs)), k):
                    loss = self.ensemble_loss([dirs[i] for i in subset])
                    rows.append({"k": k, "seeds": list(subset), "loss": loss})
            ensembles[preset] = rows
            log.info("ensembles at %s: K=%d loss %.4f (K=1 mean %.4f)", preset, len(dirs), rows[-1]["loss"],
                     sum(r["loss"] for r in rows if r["k"] == 1) / len(dirs))
            self.save()

    def phase_budgets(self) -> None:
        budgets = self.results.setdefault("budgets", {})
        for preset in self.p.budget_presets:
            search = self.results["search"][preset]
            per_d = budgets.setdefault(preset, {})
            per_d[str(self.p.tokens)] = {"standard": search["standard"]["val_loss"],
                                         "regularized": search["regularized"]["val_loss"]}
            for tokens in self.p.budgets:
                configs = [self.optimum_config(preset, search[r], tokens) for r in ("standard", "regularized")]
                std, reg = self.train_configs(configs, self.ledger_dir(preset, tokens))
                per_d[str(tokens)] = {"standard": std["val_loss"], "regularized": reg["val_loss"]}
                self.save()

    def phase_distill(self) -> None:
        from distill.student import DistillConfig, distill
        from serve.pack import pack_ensemble
        from synthdata.job import GenerateConfig, generate

        preset = self.p.distill_preset
        members = self.results["members"][preset]
        root = self.out / "distill"
        root.mkdir(parents=True, exist_ok=True)
        teacher = pack_ensemble([m["model_dir"] for m in members], root / f"teacher-k{len(members)}")
        teachers = {"ensemble": (teacher, len(members)), "self": (Path(members[0]["model_dir"]), 1)}
        record = self.results.setdefault("distill", {"preset": preset})
        for recipe, (teacher_dir, k) in teachers.items():
            synth_dir = root / f"synthetic-{recipe}"
            self._release_ray()  # a local Ray of training workers would hold the cores the engine needs
            summary = generate(GenerateConfig(teacher=str(teacher_dir), tokens=self.p.synthetic_tokens,
                                              out=str(synth_dir), shard_tokens=self.p.synthetic_shard_tokens,
                                              address=self.cfg.address, progress=False))
            student_cfg = dataclasses.replace(self.base_config(preset, self.p.tokens), epochs=self.p.student_epochs,
                                              lr=self.results["search"][preset]["regularized"]["lr"],
                                              weight_decay=self.p.student_wd, threads=self.cfg.parallel)
            run_dir = root / f"student-{recipe}"
            fresh = not (run_dir / "result.json").exists()
            result = distill(DistillConfig(train=student_cfg, synthetic_dir=str(synth_dir), recipe=recipe,
                                           w=self.p.distill_w), run_dir, progress=False)
            self.trained += fresh
            teacher_loss = (self.ensemble_loss([m["model_dir"] for m in members]) if k > 1
                            else members[0]["val_loss"])
            record[recipe] = {"teacher": str(teacher_dir), "teacher_members": k, "teacher_loss": teacher_loss,
                              "synthetic_tokens": summary["tokens"], "w": self.p.distill_w,
                              "student_epochs": self.p.student_epochs, "student_wd": self.p.student_wd,
                              "student_loss": result["val_loss"], "student_steps": result["steps"],
                              "model_dir": result["model_dir"]}
            self.save()

    def _release_ray(self) -> None:
        if self.cfg.address:
            return
        import ray

        if ray.is_initialized():
            ray.shutdown()

    def downstream_models(self) -> dict[str, list[str]]:
        """Each recipe's model at the largest N (distillation at its own size): name -> member dirs."""
        top = self.p.presets[-1]
        search = self.results["search"][top]
        models = {f"standard ({top})": [search["standard"]["model_dir"]],
                  f"regularized ({top})": [search["regularized"]["model_dir"]],
                  f"ensemble K={self.p.k_max} ({top})": [m["model_dir"] for m in self.results["members"][top]]}
        distilled = self.results.get("distill", {})
        if "ensemble" in distilled:
            dp = distilled["preset"]
            models[f"regularized ({dp})"] = [self.results["search"][dp]["regularized"]["model_dir"]]
            models[f"teacher K={distilled['ensemble']['teacher_members']} ({dp})"] = [
                m["model_dir"] for m in self.results["members"][dp]]
            models[f"student ({dp})"] = [distilled["ensemble"]["model_dir"]]
        if "self" in distilled:
            models[f"self-distilled ({distilled['preset']})"] = [distilled["self"]["model_dir"]]
        return models

    def phase_downstream(self) -> None:
        from bench.downstream import evaluate_downstream

        eval_dir = Path(self.cfg.eval_dir) if self.cfg.eval_dir else None
        tasks = [eval_dir / f"{t}.jsonl" for t in self.p.eval_tasks] if eval_dir else []
        missing = [str(t) for t in tasks if not t.exists()]
        if not tasks or missing:
            self.results["downstream"] = {"skipped": f"task files absent: {', '.join(missing) or 'no --eval-dir'}"}
            log.warning("downstream skipped: %s", self.results["downstream"]["skipped"])
            return
        results = {}
        for name, dirs in self.downstream_models().items():
            key = {"kind": "downstream", "models": model_ids(dirs), "tasks": [str(t) for t in tasks],
                   "limit": self.p.eval_limit}
            results[name] = self.evals.get(key, lambda: evaluate_downstream(
                dirs, tasks, "logits", self.p.eval_limit, progress=False))
            log.info("downstream %s: %s", name, ", ".join(f"{t} {r['acc']:.3f}" for t, r in results[name].items()))
        self.results["downstream"] = {"limit": self.p.eval_limit, "models": results}

    def run(self) -> dict:
        if self.p.distill_preset not in self.p.presets:
            raise StudyError(f"distill_preset {self.p.distill_preset} is not in the ladder {self.p.presets}")
        last_report = time.monotonic()
        for phase in PHASES:
            log.info("phase %s", phase)
            getattr(self, f"phase_{phase}")()
            self.save(phase)
            if time.monotonic() - last_report > PARTIAL_REPORT_EVERY_S:  # long studies: a partial report per phase
                write_report(self.results, self.out, self.cfg)
                last_report = time.monotonic()
        self._release_ray()
        self.results["trained_last_invocation"] = self.trained
        self.results["evaluated_last_invocation"] = self.evals.computed
        self.save()
        write_report(self.results, self.out, self.cfg)
        log.info("study complete: %s (this invocation trained %d runs, evaluated %d models)",
                 self.out / "REPORT.md", self.trained, self.evals.computed)
        return self.results


# ---- the report ----------------------------------------------------------------------------------
# N is in non-embedding parameters and D in tokens, scaled as the paper scales them (billions) at GPU sizes and
# in millions at CPU sizes: the fit's p0 = [1, 0.5, 2] only converges when x is of order one.

PAPER = {  # ../shared/docs/paper-recipe.md, at 200M tokens
    "regularized": 3.43, "ensemble": 3.34, "joint": 3.17, "standard": 3.75,
    "efficiency": {"regularized": 2.29, "joint": 5.17}, "student_kept": 0.83,
}


@dataclass
class Analysis:
    """The fits and derived numbers the report prints (all computed from results.json)."""

    std_n: tuple | None = None  # (x, y, fit) over N
    reg_n: tuple | None = None
    per_k: dict | None = None  # preset -> (x, y, fit) over K
    joint: object = None  # JointLimitFit
    data_law: object = None  # PowerLawFit of the standard recipe's best loss over D
    efficiencies: dict | None = None  # name -> DataEfficiency
    budget_rows: list | None = None
    n_unit: str = "billions"
    d_unit: str = "billions"


def _unit(largest: float) -> tuple[float, str]:
    return (1e9, "billions") if largest >= 1e8 else (1e6, "millions")


def analyze(results: dict, n_boot: int) -> Analysis:
    from bench.fits import data_efficiency, fit_joint_limit, fit_power_law

    a = Analysis()
    profile, search = results["profile"], results.get("search", {})
    presets = [p for p in profile["presets"] if p in search]
    n_scale, a.n_unit = _unit(max([search[p]["params"] for p in presets], default=0))
    d_scale, a.d_unit = _unit(profile["tokens"])
    if presets:
        xs = [search[p]["params"] / n_scale for p in presets]
        ys = [search[p]["standard"]["val_loss"] for p in presets]
        a.std_n = (xs, ys, fit_power_law(xs, ys, n_boot=n_boot))
        members = results.get("members", {})
        reg_x, reg_y = [], []
        for p in presets:  # every seed at the optimum when the members are the optimum's seeds, else seed 0
            if p in members and not profile["joint_members"]:
                losses = [m["val_loss"] for m in members[p]]
            else:
                losses = [search[p]["regularized"]["val_loss"]]
            reg_x += [search[p]["params"] / n_scale] * len(losses)
            reg_y += losses
        a.reg_n = (reg_x, reg_y, fit_power_law(reg_x, reg_y, n_boot=n_boot))
    ensembles = results.get("ensembles", {})
    if ensembles:
        a.per_k = {}
        for p, rows in ensembles.items():
            ks, ls = [r["k"] for r in rows], [r["loss"] for r in rows]
            a.per_k[p] = (ks, ls, fit_power_law(ks, ls, n_boot=n_boot))
        a.joint = fit_joint_limit([(search[p]["params"] / n_scale, r["k"], r["loss"]) for p, rows in ensembles.items()
                                   for r in rows], n_boot=n_boot)
    budgets = results.get("budgets", {})
    if budgets:
        ds = sorted({int(d) for per_d in budgets.values() for d in per_d})
        a.budget_rows = []
        for d in ds:
            std = {p: per_d[str(d)]["standard"] for p, per_d in budgets.items() if str(d) in per_d}
            reg = {p: per_d[str(d)]["regularized"] for p, per_d in budgets.items() if str(d) in per_d}
            a.budget_rows.append((d, min(std.items(), key=lambda kv: kv[1]), min(reg.items(), key=lambda kv: kv[1])))
        a.data_law = fit_power_law([d / d_scale for d, _, _ in a.budget_rows], [s[1] for _, s, _ in a.budget_rows],
                                   n_boot=n_boot)
        main_d = profile["tokens"] / d_scale
        eff = {}
        for d, _, (p, loss) in a.budget_rows:
            eff[f"regularized, best N ({p}), D={d:,}"] = data_efficiency(a.data_law, loss, d / d_scale)
        limits = {}
        if a.reg_n and a.reg_n[2].converged:
            limits["regularized, N -> inf"] = a.reg_n[2].C
        if a.per_k:
            top = presets[-1]
            k_rows = [r for r in ensembles[top] if r["k"] == profile["k_max"]]
            if k_rows:
                eff[f"ensemble K={profile['k_max']} ({top}), D={profile['tokens']:,}"] = data_efficiency(
                    a.data_law, k_rows[0]["loss"], main_d)
            if a.per_k[top][2].converged:
                limits[f"ensemble K -> inf ({top})"] = a.per_k[top][2].C
        if a.joint is not None and math.isfinite(a.joint.C):
            limits["joint N, K -> inf"] = a.joint.C
        distilled = results.get("distill", {})
        for recipe, label in (("ensemble", "student"), ("self", "self-distilled student")):
            if recipe in distilled:
                eff[f"{label} ({distilled['preset']}), D={profile['tokens']:,}"] = data_efficiency(
                    a.data_law, distilled[recipe]["student_loss"], main_d)
        for name, c in limits.items():
            eff[f"{name} (asymptote), D={profile['tokens']:,}"] = data_efficiency(a.data_law, c, main_d)
        a.efficiencies = eff
    return a


def _flagged(fit) -> str:
    """A fit's asymptote with its flags beside it, for prose."""
    if fit is None:
        return "n/a (not run yet)"
    text = fit.asymptote()
    return f"{text} [FLAGS: {'; '.join(fit.flags)}]" if fit.flags else f"{text} [no flags]"


def _own_flags(e) -> list[str]:
    """An efficiency's flags less the data law's (printed once, beside the law)."""
    return [f for f in e.flags if not f.startswith("data law:")]


def _eff_text(e) -> str:
    lo, hi = e.interval
    spread = f" [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) and math.isfinite(hi) else ""
    flags = _own_flags(e)
    return f"**{e.efficiency:.2f}x**{spread} (loss {e.loss:.4f})" + (f" [FLAGS: {'; '.join(flags)}]" if flags else "")


def answers(results: dict, a: Analysis) -> list[str]:
    """The issue's questions, answered from the numbers (or 'not run yet')."""
    from bench.report import percent

    out = []
    search = results.get("search", {})
    profile = results["profile"]
    presets = [p for p in profile["presets"] if p in search]
    # 1. the tuned weight decay
    if presets:
        wds = {p: search[p]["regularized"]["wd"] for p in presets}
        cert = {p: search[p]["regularized"]["certified"] for p in presets}
        above = [p for p in presets if wds[p] > 0.1]
        detail = ", ".join(f"{p}: wd {wds[p]:g} (epochs {search[p]['regularized']['epochs']}, lr "
                           f"{search[p]['regularized']['lr']:g}, {'certified' if cert[p] else 'NOT certified'})"
                           for p in presets)
        verdict = ("Yes" if len(above) == len(presets) else "Partly" if above else "No")
        gain = ", ".join(f"{p}: {search[p]['standard']['val_loss'] - search[p]['regularized']['val_loss']:+.4f}"
                         for p in presets)
        out.append(f"**Is the tuned weight decay above 0.1?** {verdict}: {detail}. Loss gained over the standard "
                   f"recipe's best (wd 0.1) at the same N: {gain} nats (positive = regularized better); "
                   f"the paper's optima are 0.8-3.2.")
    # 2. monotone in N
    if a.reg_n and a.std_n:
        reg_means = [float(sum(y for x, y in zip(*a.reg_n[:2]) if x == v) / sum(1 for x in a.reg_n[0] if x == v))
                     for v in a.std_n[0]]
        std = a.std_n[1]
        reg_mono = all(c < b for b, c in zip(reg_means, reg_means[1:]))
        std_over = any(c > b for b, c in zip(std, std[1:]))
        seq = lambda ys: " -> ".join(f"{y:.4f}" for y in ys)  # noqa: E731
        out.append(f"**Does the regularized recipe decrease monotonically in N while the standard one overfits?** "
                   f"Regularized (mean over seeds) {seq(reg_means)}: {'monotone' if reg_mono else 'NOT monotone'}; "
                   f"standard {seq(std)}: {'a larger model is worse (overfits)' if std_over else 'no overfitting in N at this scale'} "
                   f"(N = {', '.join(presets)}). Asymptotes: regularized {_flagged(a.reg_n[2])}; "
                   f"standard {_flagged(a.std_n[2])}.")
    # 3. ensemble vs regularized asymptote
    if a.per_k and a.reg_n:
        parts = ", ".join(f"{p}: {_flagged(fit)}" for p, (_, _, fit) in a.per_k.items())
        top = presets[-1]
        c_k, c_r = a.per_k[top][2].C, a.reg_n[2].C
        cmp = ("n/a" if not (math.isfinite(c_k) and math.isfinite(c_r))
               else f"{'Yes' if c_k < c_r else 'No'} at N={top}: {c_k:.3f} vs {c_r:.3f}")
        out.append(f"**Is the ensemble asymptote below the regularized one?** {cmp}. K -> inf per N: {parts}; "
                   f"regularized N -> inf: {_flagged(a.reg_n[2])}. (Paper: 3.34 for 300M vs 3.43.)")
    # 4. joint lowest
    if a.joint is not None:
        others = {"regularized N -> inf": a.reg_n[2].C if a.reg_n else math.nan}
        others.update({f"ensemble K -> inf ({p})": fit.C for p, (_, _, fit) in (a.per_k or {}).items()})
        finite = {k: v for k, v in others.items() if math.isfinite(v)}
        if math.isfinite(a.joint.C) and finite:
            lowest = all(a.joint.C < v for v in finite.values())
            verdict = f"{'Yes' if lowest else 'No'}: joint {a.joint.C:.3f} vs " + ", ".join(
                f"{k} {v:.3f}" for k, v in finite.items())
        else:
            verdict = "n/a: the joint fit did not converge"
        flags = "; ".join(a.joint.flags) or "no flags"
        members = "joint-recipe members (2x epochs, 0.5x wd)" if profile["joint_members"] else \
            "members at the single-model optimum (the joint recipe's 2x epochs is not in this profile)"
        out.append(f"**Is the joint asymptote lowest?** {verdict}. Joint C = {a.joint.asymptote()} from {members} "
                   f"[FLAGS: {flags}]. (Paper: 3.17.)")
    # 5. data efficiency
    if a.efficiencies:
        lines = "; ".join(f"{name}: {_eff_text(e)}" for name, e in a.efficiencies.items())
        out.append(f"**What data-efficiency multipliers result?** Against the standard recipe's data law "
                   f"{_flagged(a.data_law)} (L = {a.data_law.A:.4g}/D^{a.data_law.B:.3g} + C, D in {a.d_unit} of "
                   f"tokens; its flags apply to every multiplier): {lines}. (Paper: 2.29x regularized, 5.17x joint.)")
    # 6. distillation
    distilled = results.get("distill", {})
    if "ensemble" in distilled:
        dp = distilled["preset"]
        member = results["search"][dp]["regularized"]["val_loss"]
        teacher, student = distilled["ensemble"]["teacher_loss"], distilled["ensemble"]["student_loss"]
        gain = member - teacher
        kept = (member - student) / gain if gain > 0 else math.nan
        text = (f"**How much of the ensemble gain does the student keep?** {percent(kept)} " if math.isfinite(kept)
                else "**How much of the ensemble gain does the student keep?** n/a (no ensemble gain) ")
        text += (f"at N={dp}: member (regularized, seed 0) {member:.4f}, {distilled['ensemble']['teacher_members']}-member "
                 f"teacher {teacher:.4f}, student {student:.4f} (kept = (member - student) / (member - teacher)).")
        seeds = [m["val_loss"] for m in results.get("members", {}).get(dp, [])]
        if len(seeds) > 1 and (sum(seeds) / len(seeds)) > teacher:
            mean = sum(seeds) / len(seeds)
            text += (f" Against the mean of the teacher's {len(seeds)} members ({mean:.4f}; seeds "
                     f"{' / '.join(f'{s:.4f}' for s in seeds)}) it keeps {percent((mean - student) / (mean - teacher))}.")
        if "self" in distilled:
            s = distilled["self"]
            text += (f" Self-distillation: teacher {s['teacher_loss']:.4f} -> student {s['student_loss']:.4f} "
                     f"({'better' if s['student_loss'] < s['teacher_loss'] else 'worse'} than its teacher).")
        out.append(text + " (Paper: 83% kept; the self-distilled student beats its teacher.)")
    return out


def _seeds_text(rows) -> str:
    return ", ".join(f"{r:.4f}" for r in rows)


def runs_so_far(out: Path) -> str:
    """Every finished training run under runs/ (its result.json), for a partial report: what a killed or running
    study has done, including runs of a search round whose ledger lines are written when the round ends."""
    from bench.report import markdown_table

    rows = []
    for path in sorted((out / "runs").glob("*/d*/runs/*/result.json")):
        c = json.loads(path.read_text())["config"]
        rows.append([c["preset"], f"{c['tokens']:,}", c["epochs"], f"{c['lr']:g}", f"{c['weight_decay']:g}",
                     c["seed"], f"{json.loads(path.read_text())['val_loss']:.4f}"])
    if not rows:
        return "No training run has finished yet.\n"
    return (f"Training runs finished so far ({len(rows)}; their result.json under runs/):\n\n"
            + markdown_table(["N", "tokens D", "epochs", "lr", "wd", "seed", "val loss"], rows))


def build_report(results: dict, out: Path, cfg: StudyConfig, n_boot: int) -> Path:
    from bench.report import (
        efficiency_table,
        fit_table,
        joint_limit_table,
        markdown_table,
        plot_data_efficiency,
        plot_scaling,
        write_text,
    )

    a = analyze(results, n_boot)
    profile = results["profile"]
    done = results.get("phases_done", [])
    complete = all(p in done for p in PHASES)
    parts = [f"# Chorus study: profile `{profile['name']}`\n"]
    status = ("complete" if complete else
              f"**PARTIAL**: phases done {', '.join(done) or 'none'}; still to run "
              f"{', '.join(p for p in PHASES if p not in done)}. Sections below say 'not run yet' where data is missing.")
    ds = results.get("dataset", {})
    command = results.get("command") or cfg.command or "python -m bench.study"
    parts.append(
        f"Status: {status}\n\n"
        f"- Command: `{command}` (resumable: the same command continues a killed study)\n"
        f"- Machine: {platform.node() or '?'} / {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; report written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n"
        f"- Corpus: {', '.join(ds.get('corpus', cfg.corpus))}; {ds.get('train_tokens', 0):,} training tokens available, "
        f"{ds.get('val_tokens', 0):,} fixed validation tokens, BPE vocabulary {ds.get('vocab_size', profile['vocab_size'])}\n"
        f"- Grid: N = {', '.join(profile['presets'])}; D = {profile['tokens']:,} tokens; context {profile['context']}, "
        f"batch {profile['batch_size']}; search over epochs {profile['epochs']}, lr {profile['lrs']}, wd {profile['wds']} "
        f"from {tuple(profile['start'])}; ensembles K = 1..{profile['k_max']}; budgets {profile['budgets']} on "
        f"{', '.join(profile['budget_presets'])}; distillation at {profile['distill_preset']} "
        f"({profile['synthetic_tokens']:,} synthetic tokens, w = {profile['distill_w']}, student "
        f"{profile['student_epochs']} epochs, wd {profile['student_wd']})\n"
        f"- Losses are validation cross-entropy in nats/token on the same fixed tokens for every model. Fits are "
        f"L = A/x^B + C (scipy curve_fit, p0 = [1, 0.5, 2], bounds >= 0; bench.fits); C is printed as value ± bootstrap "
        f"std, and every fit's flags are printed beside it.\n")

    if not complete:
        parts.append(runs_so_far(out))
    parts.append("## Answers\n")
    qa = answers(results, a)
    parts += [f"{i}. {t}\n" for i, t in enumerate(qa, 1)] or ["Not run yet.\n"]

    # the main table
    parts.append("## Main table (mirrors the paper's)\n")
    if a.std_n:
        search = results["search"]
        presets = [p for p in profile["presets"] if p in search]
        rows = []
        best_std = min(presets, key=lambda p: search[p]["standard"]["val_loss"])
        best_reg = min(presets, key=lambda p: search[p]["regularized"]["val_loss"])
        effs = a.efficiencies or {}

        def eff_of(prefix):
            hit = [e for n, e in effs.items() if n.startswith(prefix)]
            if hit:
                return f"{hit[0].efficiency:.2f}x", "; ".join(_own_flags(hit[0])) or "ok (data law's flags: below)"
            return ("not run yet" if not effs else "n/a (no asymptote or loss to convert)"), ""

        rows.append(["standard (wd 0.1)", f"{search[best_std]['standard']['val_loss']:.4f} ({best_std})",
                     a.std_n[2].asymptote(), "; ".join(a.std_n[2].flags) or "ok", "1.00x (by definition)", ""])
        rows.append(["regularized", f"{search[best_reg]['regularized']['val_loss']:.4f} ({best_reg})",
                     a.reg_n[2].asymptote(), "; ".join(a.reg_n[2].flags) or "ok", *eff_of("regularized, N -> inf")])
        if a.per_k:
            top = presets[-1]
            k_rows = [r for r in results["ensembles"][top] if r["k"] == profile["k_max"]]
            fit = a.per_k[top][2]
            rows.append([f"ensemble ({top}, K -> inf)", f"{k_rows[0]['loss']:.4f} (K={profile['k_max']})",
                         fit.asymptote(), "; ".join(fit.flags) or "ok", *eff_of("ensemble K -> inf")])
        if a.joint is not None:
            rows.append(["joint (N, K -> inf)", "", a.joint.asymptote(), "; ".join(a.joint.flags) or "ok",
                         *eff_of("joint")])
        distilled = results.get("distill", {})
        for recipe, label in (("ensemble", "student"), ("self", "self-distilled student")):
            if recipe in distilled:
                rows.append([f"{label} ({distilled['preset']})", f"{distilled[recipe]['student_loss']:.4f}", "", "",
                             *eff_of(label)])
        parts.append(markdown_table(["recipe", "best loss at D", "asymptote C ± std", "fit flags",
                                     "data efficiency", "efficiency flags"], rows))
        parts.append(f"\nPaper, 200M tokens: standard best {PAPER['standard']}, regularized C {PAPER['regularized']} "
                     f"(2.29x), 300M ensemble K -> inf {PAPER['ensemble']}, joint {PAPER['joint']} (5.17x).\n")
    else:
        parts.append("Not run yet.\n")

    # search
    parts.append("## Recipe search (coordinate descent; train.search)\n")
    if a.std_n:
        rows = []
        for p in [p for p in profile["presets"] if p in results["search"]]:
            s = results["search"][p]
            for r in ("standard", "regularized"):
                o = s[r]
                rows.append([p, f"{s['params']:,}", r, o["epochs"], f"{o['lr']:g}", f"{o['wd']:g}", f"{o['val_loss']:.4f}",
                             "yes" if o["certified"] else "NO", len(o["runs"])])
        parts.append(markdown_table(["N", "non-embedding params", "recipe", "epochs", "lr", "wd", "val loss",
                                     "certified", "runs seen"], rows))
        all_runs = []
        for p in [p for p in profile["presets"] if p in results["search"]]:
            for r in results["search"][p]["regularized"]["runs"]:
                all_runs.append([p, r["epochs"], f"{r['lr']:g}", f"{r['wd']:g}", r["seed"], f"{r['val_loss']:.4f}"])
        parts.append("\n<details><summary>every search run</summary>\n\n"
                     + markdown_table(["N", "epochs", "lr", "wd", "seed", "val loss"], all_runs) + "\n</details>\n")
    else:
        parts.append("Not run yet.\n")

    # over N
    parts.append("## Standard vs regularized recipe over N\n")
    if a.std_n:
        parts.append(fit_table({"standard": a.std_n[2], "regularized": a.reg_n[2]}, f"N, {a.n_unit}"))
        plot_scaling({"standard (wd 0.1)": a.std_n, "regularized": a.reg_n}, out / "loss_vs_n.png",
                     f"non-embedding parameters N ({a.n_unit})", "standard vs regularized recipe")
        parts.append("\n![loss vs N](loss_vs_n.png)\n")
    else:
        parts.append("Not run yet.\n")

    # over K
    parts.append("## Ensembles over K at each N (logit average)\n")
    if a.per_k:
        rows = []
        for p, (ks, ls, _) in a.per_k.items():
            for k in sorted(set(ks)):
                vals = [l for kk, l in zip(ks, ls) if kk == k]
                rows.append([p, k, len(vals), f"{sum(vals) / len(vals):.4f}", _seeds_text(vals)])
        parts.append(markdown_table(["N", "K", "subsets", "mean loss", "every subset's loss"], rows))
        parts.append("\nEach K uses every K-subset of the members (seeds), so the fit over K bootstraps over subsets.\n\n")
        parts.append(fit_table({f"N={p}": fit for p, (_, _, fit) in a.per_k.items()}, "K"))
        plot_scaling({f"N={p}": v for p, v in a.per_k.items()}, out / "loss_vs_k.png", "ensemble members K",
                     "ensembles over K at each N")
        parts.append("\n![loss vs K](loss_vs_k.png)\n")
        parts.append("## Joint limit (K -> inf at each N, then N -> inf)\n")
        parts.append(joint_limit_table(a.joint, "N"))
        if a.joint.flags:
            parts.append("\nFlags: " + "; ".join(a.joint.flags) + "\n")
        if a.joint.over_n is not None:
            over = a.joint.over_n
            plot_scaling({"K-limit C_N": (list(over.x), list(over.y), over)}, out / "joint_limit.png",
                         f"non-embedding parameters N ({a.n_unit})", "joint limit: K -> inf at each N, then N -> inf")
            parts.append("\n![joint limit](joint_limit.png)\n")
    else:
        parts.append("Not run yet.\n")

    # data efficiency
    parts.append("## Data efficiency at several budgets D\n")
    if a.budget_rows:
        rows = [[f"{d:,}", f"{s[1]:.4f} ({s[0]})", f"{r[1]:.4f} ({r[0]})"] for d, s, r in a.budget_rows]
        parts.append(markdown_table(["budget D", "standard best (N)", "regularized best (N)"], rows))
        parts.append(f"\nAt each smaller D the main budget's optima are retrained (not re-searched) on "
                     f"{', '.join(profile['budget_presets'])}. The standard recipe's data law (D in {a.d_unit} of tokens):\n\n")
        parts.append(fit_table({"standard, best over N": a.data_law}, "D"))
        parts.append("\n" + efficiency_table(a.efficiencies))
        plot_data_efficiency(a.data_law, {n: e for n, e in a.efficiencies.items() if math.isfinite(e.loss)},
                             out / "data_efficiency.png", xlabel=f"training tokens D ({a.d_unit})")
        parts.append("\n![data efficiency](data_efficiency.png)\n")
    else:
        parts.append("Not run yet.\n")

    # distillation
    parts.append("## Distillation (synthdata + distill)\n")
    distilled = results.get("distill", {})
    if "ensemble" in distilled or "self" in distilled:
        rows = []
        for recipe in ("ensemble", "self"):
            if recipe in distilled:
                d = distilled[recipe]
                rows.append([recipe, d["teacher_members"], f"{d['teacher_loss']:.4f}", f"{d['synthetic_tokens']:,}",
                             d["w"], d["student_epochs"], d["student_wd"], d["student_steps"],
                             f"{d['student_loss']:.4f}"])
        parts.append(markdown_table(["recipe", "teacher members", "teacher loss", "synthetic tokens", "w",
                                     "student epochs (real)", "student wd", "steps", "student loss"], rows))
        parts.append(f"\nStudents are {distilled['preset']}, the members' size; the synthetic tokens are sampled from "
                     "BOS at temperature 1 from the logit-averaged ensemble (or the single member).\n")
    else:
        parts.append("Not run yet.\n")

    # downstream
    parts.append("## Downstream (zero-shot; bench.downstream)\n")
    down = results.get("downstream", {})
    if "models" in down:
        tasks = sorted({t for r in down["models"].values() for t in r})
        rows = []
        for name, r in down["models"].items():
            cells = []
            for t in tasks:
                v = r.get(t)
                cells.append("" if v is None else f"{v['acc']:.3f} ± {v['acc_stderr']:.3f}"
                             + (f" / {v['acc_norm']:.3f}" if "acc_norm" in v else ""))
            mc = [r[t]["acc"] for t in tasks if t in r and "acc_norm" in r[t]]
            rows.append([name, *cells, f"{sum(mc) / len(mc):.3f}" if mc else ""])
        parts.append(markdown_table(["model", *tasks, "mean acc (multiple choice)"], rows))
        n_items = {t: next(iter(down["models"].values()))[t]["items"] for t in tasks}
        parts.append(f"\nacc ± stderr / acc_norm; LAMBADA: greedy-match acc. Items per task: "
                     f"{', '.join(f'{t} {n}' for t, n in n_items.items())} (limit {down['limit']}). Chance: PIQA 0.5, "
                     "ARC and OpenBookQA 0.25, COPA 0.5.\n")
    elif "skipped" in down:
        parts.append(f"Skipped: {down['skipped']}.\n")
    else:
        parts.append("Not run yet.\n")

    parts.append("## Where this disagrees with the paper, and why\n")
    parts.append(scale_notes(results))
    return write_text(out / "REPORT.md", "\n".join(parts))


def grid_edges(profile: dict, search: dict) -> str:
    """'; at the edge here: ...' naming each regularized optimum that sits on the top of a searched axis."""
    edges = []
    for preset in profile["presets"]:
        opt = search.get(preset, {}).get("regularized")
        if opt is None:
            continue
        for axis, key in (("epochs", "epochs"), ("lrs", "lr"), ("wds", "wd")):
            values = profile[axis]
            if len(values) > 1 and opt[key] == max(values):
                edges.append(f"{preset} at the top {key} ({opt[key]:g})")
    return "; at the edge here: " + ", ".join(edges) if edges else ""


def scale_notes(results: dict) -> str:
    """Why numbers at this profile's scale can differ from the paper's: what the grid leaves out."""
    p = results["profile"]
    search = results.get("search", {})
    params = [search[n]["params"] for n in p["presets"] if n in search]
    size = (f"{min(params) / 1e6:.2g}M-{max(params) / 1e6:.2g}M" if params else "?")
    notes = [
        f"- Scale: members of {size} non-embedding parameters on {p['tokens']:,} tokens; the paper's have 150M-1.4B "
        "on 200M tokens. Losses are in nats/token of this corpus and this tokenizer (vocabulary "
        f"{p['vocab_size']}), not comparable in level with the paper's ~3.4.",
        f"- Points per curve: {len(p['presets'])} sizes and K <= {p['k_max']}. With 3 distinct x a 3-parameter law is an "
        "exact fit (flagged): its asymptote is a 3-point extrapolation and ranks recipes only roughly.",
        f"- Search grid: epochs {p['epochs']}, lr {p['lrs']}, wd {p['wds']} (the paper's: 7 x 6 x 8), from "
        f"(epochs, lr, wd) = {tuple(p['start'])}. Coordinate descent is local: an optimum is certified against its "
        "one-step neighbours in this grid only, so another start can certify another point, and one at the grid's "
        f"edge may lie beyond it{grid_edges(p, search)}.",
        "- Ensemble members: " + ("the joint recipe (2x epochs, 0.5x wd of the single-model optimum)." if p["joint_members"]
                                  else "seeds of the single-model optimum, not the joint recipe (2x epochs would double "
                                       "the cost): the joint limit here is the K -> inf, N -> inf limit of those members."),
        f"- Data law: budgets {p['budgets']} plus {p['tokens']:,} on {', '.join(p['budget_presets'])}, with the main "
        "budget's optima retrained (not re-searched) at each budget; multipliers beyond the largest budget are "
        "extrapolations (flagged).",
        f"- Distillation: a {p['distill_preset']} student, {p['student_epochs']} real epochs at w = {p['distill_w']}, "
        f"on {p['synthetic_tokens']:,} synthetic tokens (repeated when the student needs more: distill logs it), "
        "against the paper's 300M student with 16 epochs on hundreds of millions of synthetic tokens.",
        "- Downstream: models this small score near chance on PIQA / ARC / OpenBookQA / COPA; read the stderr before "
        "reading differences. The validation loss is the measurement that separates recipes at this scale.",
    ]
    return "\n".join(notes) + "\n"


def write_report(results: dict, out: str | Path, cfg: StudyConfig) -> Path:
    return build_report(results, Path(out), cfg, cfg.n_boot)


def run_study(cfg: StudyConfig) -> dict:
    """Run (or finish) the study in cfg.out and write its report; return results.json's content."""
    for c in cfg.corpus:
        if not Path(c).exists():
            raise StudyError(f"corpus {c} does not exist")
    if not cfg.corpus and not cfg.data_dir:
        raise StudyError("give a corpus or an existing dataset directory")
    if cfg.parallel < 1:
        raise StudyError(f"--parallel must be >= 1 (got {cfg.parallel})")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(cfg.parallel)  # evaluation in this process: as many cores as training may use
    with OutputLock(cfg.out):  # one study per directory: a second is refused, naming the first
        return Study(cfg).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=list(PROFILES), default="tiny",
                        help="grid size: micro (tests, minutes), tiny (2-core CPU, hours), small (one GPU), "
                             "paper (the paper's shapes on a Ray cluster)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", nargs="+", help="corpus files or directories (train.data formats)")
    source.add_argument("--data-dir", help="an existing dataset directory (`python -m train data`) instead of --corpus")
    parser.add_argument("--max-chars", type=int, help="read at most this many corpus characters (default: the profile's)")
    parser.add_argument("--out", required=True, help="study directory (data, runs, REPORT.md, plots, results.json)")
    parser.add_argument("--eval-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"),
                        help="directory of downstream task files (JSON lines); absent: downstream is skipped")
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    parser.add_argument("--parallel", type=int, default=1, help="training runs at once (default 1)")
    parser.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples per fit (default 200)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite REPORT.md and plots from OUT/results.json; train and evaluate nothing")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    profile = PROFILES[args.profile]
    if args.max_chars is not None:
        profile = dataclasses.replace(profile, max_chars=args.max_chars)
    command = "python -m bench.study " + " ".join(a for a in (sys.argv[1:] if argv is None else argv)
                                                  if a != "--report-only")
    cfg = StudyConfig(profile=profile, corpus=tuple(args.corpus or ()), out=args.out, eval_dir=args.eval_dir,
                      data_dir=args.data_dir,
                      address=args.address, parallel=args.parallel, n_boot=args.n_boot, command=command)
    from distill.student import DistillError
    from synthdata.job import JobError
    from train.data import DataError
    from train.model import ShapeError

    with exit_on(StudyError, DataError, ShapeError, JobError, DistillError):
        if args.report_only:
            path = Path(args.out) / "results.json"
            if not path.exists():
                raise StudyError(f"{path} does not exist: run the study first")
            print(write_report(json.loads(path.read_text()), args.out, cfg))
            return
        results = run_study(cfg)
    print(json.dumps({"report": str(Path(args.out) / "REPORT.md"), "phases_done": results["phases_done"],
                      "trained": results["trained_last_invocation"],
                      "evaluated": results["evaluated_last_invocation"]}))


if __name__ == "__main__":
    main()
