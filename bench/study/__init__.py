"""The one orchestrator: a study is a profile (bench/profiles/<name>.json) run by one resumable job.

    python -m bench.study --profile wiki --out studies/wiki          # the committed CPU study (~4 h)
    python -m bench.pipeline                                         # the main job: the profile `main`

Phases, each resumable, each followed by a (partial) report when the profile is long:
    data        corpus -> tokenizer + token shards (train.data.prepare_dataset); a calibration profile generates its
                corpus (bench.science.calibration: an order-2 Markov source) and computes its Bayes floor first
    gate        (profiles with gate_epochs) a few runs that check the regime shows the paper's effects at all: the
                largest size beats the smallest, the standard recipe overfits in epochs; a failed gate stops the
                study (its report says why) unless --past-gate
    search      per model size N: the same coordinate descent for both recipes (train.search: the regularized
                recipe searches epochs, lr and wd; the standard one epochs and lr at wd 0.1), or the profile's
                fixed settings when it does not search
    members     per N: 3 seeds (`seeds`) at both optima, and the ensemble's members (K = 1..k_max seeds at the
                joint recipe, 2x epochs and 0.5x wd of the single-model optimum, or at the optimum itself)
    ensembles   per N: validation loss of every K-subset of the ensemble's members (logit average)
    budgets     the data law: at each smaller budget D both recipes searched again, 3 seeds at each optimum
    serve       the members packed into one model behind the Ray Serve endpoint, checked with real requests
    distill     synthetic tokens from the ensemble (and from `self_teachers` single members), a budget fixed
                before the run so no synthetic window is used twice; students on real + synthetic tokens
                (`student_seeds` seeds), and the control: the same student recipe on real data only, same steps
    downstream  zero-shot accuracy (task files in --eval-dir, and a held-out next-word task)

Training goes through train/'s ledgers (train.search.train_ledgered), so a killed study continues where it
stopped and a finished run is never repeated; every evaluation is cached in OUT/evals.jsonl. What was measured
is collected in OUT/results.json; the analysis (bench.science.analysis, over an EvaluationTable built from it) and the
report (bench.science.report) are computed from that file alone: `--report-only` rewrites them without training.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plumbing.artifacts import Ledger, OutputLock, atomic_write_json, atomic_write_text, read_json
from plumbing.console import ChorusError, exit_on, setup_logging
from train.search import run_ledger

log = logging.getLogger("bench.study")

ROOT = Path(__file__).resolve().parents[1]
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
PHASES = ("data", "gate", "search", "members", "ensembles", "budgets", "serve", "distill", "downstream")
PARTIAL_REPORT_EVERY_S = 300  # a phase ending this long after the last report writes a partial one
SYNTHETIC_MARGIN = 1.1  # synthetic windows generated per window a student is expected to draw (plus 16)


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


def gate_verdict(small: float, large: float, standard_by_epochs: dict[int, float], min_gap: float,
                 overfit: float) -> dict:
    """Does the regime show the effects? (a) the largest size (regularized) beats the smallest by >= min_gap nats;
    (b) the standard recipe overfits in epochs: its loss at the most epochs is >= `overfit` nats above its best,
    and that best is not at the most epochs. One seed per run: the margins are several seed SDs by design."""
    epochs = sorted(standard_by_epochs)
    best = min(epochs, key=lambda n: standard_by_epochs[n])
    rise = standard_by_epochs[epochs[-1]] - standard_by_epochs[best]
    ladder = ", ".join(f"{n}: {standard_by_epochs[n]:.4f}" for n in epochs)
    checks = [
        {"name": "loss falls with N", "passed": small - large >= min_gap,
         "detail": f"largest - smallest = {large - small:+.4f} nats (needs <= {-min_gap:+.3f})"},
        {"name": "the standard recipe overfits in epochs", "passed": best != epochs[-1] and rise >= overfit,
         "detail": f"standard loss by epochs {ladder}; best at {best}, {rise:+.4f} nats at {epochs[-1]} "
                   f"(needs >= {overfit:+.3f})"},
    ]
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def synthetic_budget(real_tokens: int, context: int, batch_size: int, epochs: int, w: float) -> int:
    """The stated rule, fixed before a run: enough synthetic tokens for one pass of one student.

    A student draws steps x batch x w synthetic windows in expectation (steps = real windows x epochs / (1 - w) /
    batch, distill.mixture); the teacher makes SYNTHETIC_MARGIN times that plus 16 windows of `context` tokens,
    so no synthetic window is used twice (distill records the passes it made in mixture.json)."""
    from distill.mixture import mixture_steps

    real_windows = -(-(real_tokens - 1) // context)
    steps = mixture_steps(real_windows, batch_size, epochs, w)
    return (math.ceil(SYNTHETIC_MARGIN * steps * batch_size * w) + 16) * context


@dataclass(frozen=True)
class StudyConfig:
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


# ---- bookkeeping: the evaluation cache --------------------------------------------------------------

def model_ids(model_dirs: list[str]) -> list[list]:
    """What an evaluation is of: each model directory with its weights' recorded sha256, so that a model
    retrained in place (same directory, new weights) is evaluated anew, not answered from the cache."""
    from serve.pack import recorded_sha256
    from plumbing.artifacts import sha256_file

    def weights_sha256(d: str) -> str:
        recorded = recorded_sha256(d)  # written when the directory was made; hashing is the fallback
        return recorded[0] if recorded else sha256_file(Path(d) / "model.safetensors")

    return [[str(d), weights_sha256(d)] for d in model_dirs]


# ---- the main job's own checks: the endpoint and a held-out task ---------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_endpoint(model_dir: Path, port: int, address: str | None) -> dict:
    """Start the Ray Serve app, send a completion, a streamed completion and a scoring request, stop it."""
    import httpx

    from serve.app import EnsembleConfig, start_app, stop_app

    config = EnsembleConfig(model_dir=str(model_dir), served_model_name="chorus-ensemble", port=port)
    url = start_app(config, address=address)
    try:
        models = httpx.get(f"{url}/v1/models", timeout=60).json()
        body = {"model": config.model_name, "prompt": "The function returns", "max_tokens": 16, "temperature": 0}
        completion = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        completion.raise_for_status()
        score = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "model": config.model_name, "prompt": "Python is a programming language.", "max_tokens": 1,
            "echo": True, "logprobs": 1, "temperature": 0})
        score.raise_for_status()
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=300) as r:
            r.raise_for_status()
            chunks = sum(1 for line in r.iter_lines() if line.startswith("data: {"))
        token_logprobs = score.json()["choices"][0]["logprobs"]["token_logprobs"]
        return {"url": url, "models": [m["id"] for m in models["data"]],
                "completion": completion.json()["choices"][0]["text"], "stream_chunks": chunks,
                "prompt_tokens_scored": sum(lp is not None for lp in token_logprobs)}
    finally:
        stop_app()


def heldout_next_word(data_dir: Path, n: int, choices: int = 4, seed: int = 0) -> list[dict]:
    """A multiple-choice next-word task made from the held-out validation text: which of `choices` words follows?

    The product must not need outside eval sets, so the main job builds one from text no model trained on.
    Distractors are other words of the same text, so a model must read the context to beat chance (1/choices);
    a LAMBADA-style greedy match scores ~0 for models this small, which separates nothing."""
    from train.data import load_tokenizer, load_tokens

    tokenizer = load_tokenizer(data_dir / "tokenizer")
    text = tokenizer.decode(load_tokens(data_dir, "val").tolist(), skip_special_tokens=True)
    words = [w for w in text.split() if len(w) >= 4 and w.isalpha()]
    if len(set(words)) < 10 * choices:
        raise StudyError(f"the validation text of {data_dir} has too few distinct words for a {choices}-way task")
    rng = np.random.default_rng(seed)
    items, tries = [], 0
    while len(items) < n and tries < 100 * n:
        tries += 1
        pos = int(rng.integers(400, max(401, len(text) - 20)))
        start = text.rfind(" ", 0, pos)
        end = text.find(" ", start + 1)
        word = text[start + 1 : end] if start > 0 and end > 0 else ""
        if len(word) < 4 or not word.isalpha():
            continue
        distractors = set()
        while len(distractors) < choices - 1:
            candidate = words[int(rng.integers(len(words)))]
            if candidate.lower() != word.lower():
                distractors.add(candidate)
        options = [word, *sorted(distractors)]
        rng.shuffle(options)
        context = text[max(0, start - 300) : start]
        items.append({"query": context[context.find(" ") + 1 :], "choices": options, "gold": options.index(word)})
    return items


# ---- the phases ----------------------------------------------------------------------------------

class Study:
    """Runs the phases of one study; `results` (results.json) is what the analysis and report read."""

    def __init__(self, cfg: StudyConfig):
        self.cfg, self.p = cfg, cfg.profile
        self.out = Path(cfg.out)
        self.data_dir = Path(cfg.data_dir) if cfg.data_dir else self.out / "data"
        self.results_path = self.out / "results.json"
        self.results = read_json(self.results_path, "study results") if self.results_path.exists() else {}
        profile = json.loads(json.dumps(dataclasses.asdict(self.p)))  # as it reads back from results.json
        stored = self.results.setdefault("profile", profile)
        defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(StudyProfile)
                                          if f.default is not dataclasses.MISSING}))
        for k in set(profile) - set(stored):  # a field added since the study started, at its default: the same study
            if k in defaults and profile[k] == defaults[k]:
                stored[k] = profile[k]
        if stored != profile:
            diff = sorted(k for k in profile if self.results["profile"].get(k) != profile[k])
            raise StudyError(f"{self.out} holds a study of another profile (differs in: {', '.join(diff)}); "
                             "use another --out or the same settings")
        self.results.setdefault("phases_done", [])
        self.results.setdefault("seconds", {})
        self.results["command"] = cfg.command
        self.evals = Ledger(self.out / "evals.jsonl")  # evaluations done: a re-run evaluates nothing twice
        self.trained = 0  # runs this invocation actually trained (0 on a resumed, finished study)

    def save(self, phase: str | None = None) -> None:
        if phase and phase not in self.results["phases_done"]:
            self.results["phases_done"].append(phase)
        atomic_write_json(self.results_path, self.results)

    # -- training through train/'s ledgers

    def base_config(self, preset: str, tokens: int):
        from train.trainer import TrainConfig

        e, lr, wd = self.p.start
        return TrainConfig(data_dir=str(self.data_dir.resolve()), preset=preset, tokens=tokens, epochs=e, lr=lr,
                           weight_decay=wd, batch_size=self.p.batch_size, context=self.p.context,
                           checkpoint_every=self.p.checkpoint_every)

    def ledger_dir(self, preset: str, tokens: int) -> Path:
        return self.out / "runs" / preset / f"d{tokens}"

    def train(self, configs: list, ledger_dir: Path, desc: str = "runs") -> list[dict]:
        """Every config's ledger record, training (as stacks where they share a shape and schedule) the missing."""
        from train.search import train_ledgered

        before = len(run_ledger(ledger_dir).records)
        records = train_ledgered(configs, ledger_dir, self.cfg.address, desc=desc)
        self.trained += len(run_ledger(ledger_dir).records) - before
        return records

    def at(self, preset: str, tokens: int, epochs: int, lr: float, wd: float, seed: int = 0):
        return dataclasses.replace(self.base_config(preset, tokens), epochs=int(epochs), lr=lr, weight_decay=wd,
                                   seed=seed)

    def optimum(self, preset: str, tokens: int, standard: bool) -> dict:
        """The recipe's optimum at (preset, tokens): searched, or the profile's fixed point."""
        from train.search import DEFAULT_LIMITS, SearchSpace, coordinate_descent

        e, lr, wd = self.p.start
        if not self.p.search:
            wd = 0.1 if standard else wd
            return {"epochs": e, "lr": lr, "wd": wd, "certified": False, "rounds": 0, "runs": [],
                    "reason": "fixed by the profile, not searched"}
        space = SearchSpace(epochs=self.p.epochs, lrs=self.p.lrs, wds=(0.1,) if standard else self.p.wds,
                            fixed=("wd",) if standard else (), limits=self.p.limits or DEFAULT_LIMITS)
        start = self.p.start
        if tokens != self.p.tokens:  # the data law: epochs and wd searched again at each budget, lr kept
            start = self._main_optimum(preset, standard)
            space = dataclasses.replace(space, lrs=(start[1],), fixed=tuple({*space.fixed, "lr"}))
        ledger_dir = self.ledger_dir(preset, tokens)
        before = len(run_ledger(ledger_dir).records)
        outcome = coordinate_descent(self.base_config(preset, tokens), space, ledger_dir,
                                     start=(start[0], start[1], 0.1 if standard else start[2]),
                                     address=self.cfg.address, max_rounds=self.p.max_rounds)
        self.trained += len(run_ledger(ledger_dir).records) - before
        o = outcome["optimum"]
        return {"epochs": o["epochs"], "lr": o["lr"], "wd": o["wd"], "certified": outcome["certified"],
                "rounds": outcome["rounds"], "reason": outcome["reason"], "runs": outcome["runs"]}

    def _main_optimum(self, preset: str, standard: bool) -> tuple:
        o = self.results["search"][preset]["standard" if standard else "regularized"]
        return o["epochs"], o["lr"], o["wd"]

    def seeds_at(self, preset: str, tokens: int, o: dict, n: int) -> list[dict]:
        configs = [self.at(preset, tokens, o["epochs"], o["lr"], o["wd"], s) for s in range(n)]
        return [{"seed": c.seed, "val_loss": r["val_loss"], "model_dir": str(Path(r["run_dir"]) / "model")}
                for c, r in zip(configs, self.train(configs, self.ledger_dir(preset, tokens), "seeds"))]

    def ensemble_setting(self, preset: str) -> dict:
        from train.members import joint_recipe

        o = self.results["search"][preset]["regularized"]
        if not self.p.joint_members:
            return {"epochs": o["epochs"], "lr": o["lr"], "wd": o["wd"], "recipe": "the single-model optimum"}
        epochs, wd = joint_recipe(o["epochs"], o["wd"])
        return {"epochs": epochs, "lr": o["lr"], "wd": wd, "recipe": "joint (2x epochs, 0.5x wd of the optimum)"}

    # -- phases

    def phase_data(self) -> None:
        from train.corpus import default_corpus
        from train.data import DatasetSpec, load_tokens, prepare_dataset, read_manifest

        if self.cfg.data_dir:
            manifest = read_manifest(self.data_dir)
            corpus = [str(self.data_dir)]
            log.info("using the existing dataset %s (the profile's corpus settings do not apply)", self.data_dir)
        else:
            corpus = list(self.cfg.corpus)
            if not corpus and self.p.calibration is not None:
                from bench.science.calibration import MarkovSource, write_corpus

                corpus = [str(write_corpus(MarkovSource.from_record(self.p.calibration), self.out / "calibration"))]
            elif not corpus:
                corpus = [str(default_corpus(ROOT / ".cache" / "corpus")) if self.p.corpus == "default"
                          else str((ROOT / self.p.corpus).resolve())]
            for c in corpus:
                if not Path(c).exists():
                    raise StudyError(f"corpus {c} does not exist")
            spec = DatasetSpec(corpus=tuple(corpus), vocab_size=self.p.vocab_size, val_max_tokens=self.p.val_tokens,
                               max_chars=self.p.max_chars, chunk_tokens=self.p.chunk_tokens)
            manifest = prepare_dataset(spec, self.data_dir)
        needed = max((self.p.tokens, *self.p.budgets))
        load_tokens(self.data_dir, "train", needed, verify=False)  # a corpus too small fails here, named
        val = manifest["splits"]["val"]
        self.results["dataset"] = {"corpus": corpus, "vocab_size": manifest["vocab_size"],
                                   "train_tokens": manifest["splits"]["train"]["tokens"],
                                   "val_tokens": val["tokens"], "val_documents": val["documents"],
                                   "chunk_tokens": manifest["inputs"]["spec"].get("chunk_tokens")}
        if self.p.calibration is not None:
            self.results["calibration"] = self.calibration_floor(manifest)

    def calibration_floor(self, manifest: dict) -> dict:
        """The Bayes floor of the calibration source on this dataset's validation stream (bench.science.calibration)."""
        from bench.science.calibration import MarkovSource, draw_chain, symbol_tokens, validation_floor
        from train.data import load_tokenizer, load_tokens

        source = MarkovSource.from_record(self.p.calibration)
        start, token_symbol = symbol_tokens(load_tokenizer(self.data_dir / "tokenizer"), source.symbols)
        floor = validation_floor(draw_chain(source), source.p_end, load_tokens(self.data_dir, "val"), self.p.context,
                                 manifest["bos_token_id"], manifest["eos_token_id"], start, token_symbol)
        log.info("calibration floor %.4f nats/token on %d validation targets (entropy rate %.4f)", floor["floor"],
                 floor["targets"], floor["entropy_rate"])
        return floor

    def phase_gate(self) -> None:
        """A few runs at the main budget (in the search's ledgers, so its start points are not trained twice)."""
        p = self.p
        if not p.gate_epochs:
            return
        e, lr, wd = p.start
        small, large = p.presets[0], p.presets[-1]
        regularized = {preset: self.train([self.at(preset, p.tokens, e, lr, wd)], self.ledger_dir(preset, p.tokens),
                                          f"gate {preset}")[0]["val_loss"] for preset in (small, large)}
        standard = self.train([self.at(large, p.tokens, n, lr, 0.1) for n in p.gate_epochs],
                              self.ledger_dir(large, p.tokens), f"gate {large} standard")
        verdict = gate_verdict(regularized[small], regularized[large],
                               {n: r["val_loss"] for n, r in zip(p.gate_epochs, standard)}, p.gate_min_gap,
                               p.gate_overfit)
        self.results["gate"] = {**verdict, "small": small, "large": large, "recipe": [e, lr, wd], "tokens": p.tokens}
        for check in verdict["checks"]:
            log.info("gate: %s: %s (%s)", check["name"], "passed" if check["passed"] else "FAILED", check["detail"])
        if not verdict["passed"] and not self.cfg.past_gate:
            self.save("gate")
            write_report(self.results, self.out, self.cfg.n_boot)
            raise StudyError(f"the gate failed: this regime does not show the effects the study measures "
                             f"({'; '.join(c['detail'] for c in verdict['checks'] if not c['passed'])}); "
                             f"{self.out / 'REPORT.md'} says so. Change the profile, or re-run with --past-gate to "
                             "run the study anyway")

    def phase_search(self) -> None:
        from train.model import get_shape

        search = self.results.setdefault("search", {})
        for preset in self.p.presets:
            log.info("search at N = %s (D = %d): regularized, then standard", preset, self.p.tokens)
            search[preset] = {"params": get_shape(preset).non_embedding_params(),
                              "regularized": self.optimum(preset, self.p.tokens, standard=False),
                              "standard": self.optimum(preset, self.p.tokens, standard=True)}
            self.save()

    def phase_members(self) -> None:
        """Seeds at both optima and the ensemble's members, one training call per N (so they stack)."""
        members = self.results.setdefault("members", {})
        for preset in self.p.presets:
            s = self.results["search"][preset]
            ens = self.ensemble_setting(preset)
            n_reg = self.p.seeds if self.p.joint_members else max(self.p.seeds, self.p.k_max)
            plan = ([("standard", s["standard"], seed) for seed in range(self.p.seeds)]
                    + [("regularized", s["regularized"], seed) for seed in range(n_reg)]
                    + ([("ensemble", ens, seed) for seed in range(self.p.k_max)] if self.p.joint_members else []))
            configs = [self.at(preset, self.p.tokens, o["epochs"], o["lr"], o["wd"], seed) for _, o, seed in plan]
            records = self.train(configs, self.ledger_dir(preset, self.p.tokens), f"{preset} members")
            rows = {"standard": [], "regularized": [], "ensemble": []}
            for (recipe, _, seed), r in zip(plan, records):
                rows[recipe].append({"seed": seed, "val_loss": r["val_loss"], "model_dir": str(Path(r["run_dir"]) / "model")})
            if not self.p.joint_members:
                rows["ensemble"] = rows["regularized"][: self.p.k_max]
            members[preset] = {**rows, "ensemble_setting": ens}
            log.info("%s: standard %s; regularized %s", preset, _losses(rows["standard"]), _losses(rows["regularized"]))
            self.save()

    def ensemble_loss(self, model_dirs: list[str]) -> float:
        from bench.evaluation.loss import validation_loss

        key = {"kind": "loss", "models": model_ids(model_dirs), "combine": "logits"}
        return self.evals.value(key, lambda: validation_loss(model_dirs, self.data_dir, "logits", progress=False))["loss"]

    def phase_ensembles(self) -> None:
        from tqdm import tqdm

        ensembles = self.results.setdefault("ensembles", {})
        for preset in self.p.presets:
            dirs = [m["model_dir"] for m in self.results["members"][preset]["ensemble"]]
            subsets = [s for k in range(1, len(dirs) + 1) for s in itertools.combinations(range(len(dirs)), k)]
            rows = [{"k": len(s), "seeds": list(s), "loss": self.ensemble_loss([dirs[i] for i in s])}
                    for s in tqdm(subsets, desc=f"{preset} ensembles", unit="subset")]
            ensembles[preset] = rows
            log.info("ensembles at %s: K=%d loss %.4f (K=1 mean %.4f)", preset, len(dirs), rows[-1]["loss"],
                     np.mean([r["loss"] for r in rows if r["k"] == 1]))
            self.save()

    def phase_budgets(self) -> None:
        budgets = self.results.setdefault("budgets", {})
        for preset in self.p.budget_presets:
            per_d = budgets.setdefault(preset, {})
            main = self.results["members"][preset]
            per_d[str(self.p.tokens)] = {r: {**{k: self.results["search"][preset][r][k] for k in ("epochs", "lr", "wd")},
                                             "seeds": [m["val_loss"] for m in main[r][: self.p.seeds]]}
                                         for r in ("standard", "regularized")}
            for tokens in self.p.budgets:
                row = {}
                for recipe in ("standard", "regularized"):
                    o = self.optimum(preset, tokens, standard=recipe == "standard")
                    seeds = self.seeds_at(preset, tokens, o, self.p.budget_seeds or self.p.seeds)
                    row[recipe] = {**{k: o[k] for k in ("epochs", "lr", "wd", "certified", "reason")},
                                   "seeds": [m["val_loss"] for m in seeds]}
                per_d[str(tokens)] = row
                self.save()

    def _release_ray(self) -> None:
        if self.cfg.address:
            return
        import ray

        if ray.is_initialized():
            ray.shutdown()  # the endpoint and the synthetic job start their own

    def teacher_dirs(self) -> list[str]:
        return [m["model_dir"] for m in self.results["members"][self.p.distill_preset or self.p.presets[-1]]["ensemble"]]

    def phase_serve(self) -> None:
        from serve.pack import pack_ensemble

        if not self.p.serve_check:
            return
        ensemble_dir = pack_ensemble(self.teacher_dirs(), self.out / "ensemble", combine="logits")
        key = {"kind": "endpoint", "models": model_ids([str(ensemble_dir)])}
        self._release_ray()
        endpoint = self.evals.value(key, lambda: check_endpoint(ensemble_dir, _free_port(), self.cfg.address))
        log.info("endpoint answered: models %s, completion %r, %d stream chunks", endpoint["models"],
                 endpoint["completion"][:60], endpoint["stream_chunks"])
        self.results["serve"] = {**endpoint, "ensemble_dir": str(ensemble_dir)}

    def phase_distill(self) -> None:
        from distill.student import DistillConfig, distill

        preset = self.p.distill_preset
        if not preset:
            return
        members = self.results["members"][preset]
        root = self.out / "distill"
        root.mkdir(parents=True, exist_ok=True)
        p = self.p
        budget = synthetic_budget(p.tokens, p.context, p.batch_size, p.student_epochs, p.distill_w)
        soft_budget = synthetic_budget(p.tokens, p.context, p.batch_size, p.soft_epochs, p.soft_w) if p.soft_w else 0
        reg = self.results["search"][preset]["regularized"]
        student = dataclasses.replace(self.base_config(preset, p.tokens), epochs=p.student_epochs, lr=reg["lr"],
                                      weight_decay=p.student_wd)
        soft_student = dataclasses.replace(student, epochs=p.soft_epochs, weight_decay=p.soft_wd)
        record = self.results.setdefault("distill", {})
        record.update({"preset": preset, "synthetic_tokens_rule": (
            f"(ceil({SYNTHETIC_MARGIN} x steps x batch x w) + 16) x context, steps = real windows x student epochs "
            f"/ (1 - w) / batch: {budget:,} tokens per teacher, fixed before the run"),
            "synthetic_tokens": budget, "w": p.distill_w, "student_epochs": p.student_epochs,
            "student_wd": p.student_wd, "student_lr": reg["lr"]})
        if p.soft_students or p.soft_self_teachers:
            record["soft_recipe"] = {"epochs": p.soft_epochs, "w": p.soft_w, "blend": p.soft_blend, "wd": p.soft_wd,
                              "lr": reg["lr"], "topk": p.topk, "synthetic_tokens": soft_budget}

        # (kind, index, teacher member or None, soft labels?): seq-level students, then soft-label ones
        students = [("ensemble", i, None, False) for i in range(p.student_seeds)]
        students += [("self", i, i, False) for i in range(p.self_teachers)]
        students += [("soft", i, None, True) for i in range(p.soft_students)]
        students += [("soft-self", i, i, True) for i in range(p.soft_self_teachers)]
        synthetic, annotated = {}, {}  # teacher name -> its synthetic job / annotations, prepared on first use
        for kind, i, member, soft in students:
            teacher, name = self.distill_teacher(member)
            if name not in synthetic:  # once per teacher, not once per student (each call re-verifies every shard)
                synthetic[name] = self.synthetic_for(teacher, name, member, budget, soft_budget)
            synth_dir = synthetic[name]
            if soft and name not in annotated:
                annotated[name] = self.annotations_for(teacher, name)
            annotations = annotated[name] if soft else None
            recipe = "ensemble" if member is None else "self"
            seed = {"ensemble": 1000, "self": 2000, "soft": 4000, "soft-self": 5000}[kind] + i
            cfg = DistillConfig(train=dataclasses.replace(soft_student if soft else student, seed=seed),
                                synthetic_dir=str(synth_dir) if synth_dir else None, recipe=recipe,
                                w=p.soft_w if soft else p.distill_w, blend=p.soft_blend if soft else 0.0,
                                annotations=str(annotations) if annotations else None)
            run_dir = root / f"student-{kind}-{i}"
            fresh = not (run_dir / "result.json").exists()
            result = distill(cfg, run_dir)
            self.trained += fresh
            rows = record.setdefault(kind, [])
            rows[:] = [r for r in rows if r["index"] != i] + [{
                "index": i, "seed": seed, "teacher": str(teacher), "teacher_seed": member,
                "teacher_members": 1 if member is not None else len(self.teacher_dirs()),
                "synthetic_generated": result["mixture"]["synthetic_tokens"],
                "synthetic_passes": result["mixture"]["synthetic_passes"],
                "steps": result["steps"], "val_loss": result["val_loss"], "model_dir": result["model_dir"]}]
            rows.sort(key=lambda r: r["index"])
            self.save()
        if p.distill_control:  # the same student recipe on real data only, at the same number of optimizer steps
            record["control"] = self.control(record["ensemble"][0]["steps"], student, root / "control", 3000,
                                             p.student_seeds)
            self.save()
        if p.soft_control and record.get("soft"):  # the soft recipe's schedule, CE on real data only, same steps
            record["control-soft"] = self.control(record["soft"][0]["steps"], soft_student, root / "control-soft", 6000,
                                                  p.soft_students)
            self.save()

    def distill_teacher(self, member: int | None) -> tuple[Path, str]:
        """The packed ensemble (member None) or one member at the regularized optimum, and its short name."""
        from serve.pack import pack_ensemble

        if member is not None:
            preset = self.p.distill_preset
            return Path(self.results["members"][preset]["regularized"][member]["model_dir"]), f"self-{member}"
        if "serve" in self.results:
            return Path(self.results["serve"]["ensemble_dir"]), "ensemble"
        return pack_ensemble(self.teacher_dirs(), self.out / "distill" / "teacher-ensemble"), "ensemble"

    def synthetic_for(self, teacher: Path, name: str, member: int | None, budget: int, soft_budget: int) -> Path | None:
        """The teacher's one synthetic job, sized for every student that reads it (sequence-level: `budget`, soft:
        `soft_budget`) and carrying top-k when a soft student reads it; None when no student needs one."""
        from synthdata.job import GenerateConfig, generate

        p = self.p
        seq = p.student_seeds if member is None else int(member < p.self_teachers)
        soft = p.soft_students if member is None else int(member < p.soft_self_teachers)
        tokens = max(budget if seq else 0, soft_budget if soft else 0)
        if not tokens:
            return None
        out = self.out / "distill" / f"synthetic-{name}"
        self._release_ray()  # a local Ray of training workers would hold the cores the engine needs
        generate(GenerateConfig(teacher=str(teacher), tokens=tokens, out=str(out), shard_tokens=p.synthetic_shard_tokens,
                                address=self.cfg.address, topk=p.topk if soft and p.soft_w else 0))
        return out

    def annotations_for(self, teacher: Path, name: str) -> Path:
        from synthdata.annotate import AnnotateConfig, annotate

        out = self.out / "distill" / f"annotations-{name}"
        self._release_ray()
        annotate(AnnotateConfig(teacher=str(teacher), data_dir=str(self.data_dir), out=str(out),
                                context=self.p.context, tokens=self.p.tokens, topk=self.p.topk,
                                address=self.cfg.address))
        return out

    def control(self, steps: int, student, ledger_dir: Path, seed0: int, seeds: int) -> list[dict]:
        """A student's schedule on real data only (cross-entropy), at the same number of optimizer steps."""
        p = self.p
        per_epoch = math.ceil(math.ceil((p.tokens - 1) / p.context) / p.batch_size)
        epochs = max(1, round(steps / per_epoch))
        configs = [dataclasses.replace(student, epochs=epochs, seed=seed0 + i) for i in range(seeds)]
        records = self.train(configs, ledger_dir, "control")
        return [{"seed": c.seed, "epochs": epochs, "steps": per_epoch * epochs, "val_loss": r["val_loss"]}
                for c, r in zip(configs, records)]

    def downstream_models(self) -> dict[str, list[str]]:
        """Each recipe's model at the largest N (distillation at its own size): name -> member dirs."""
        top = self.p.presets[-1]
        m = self.results["members"][top]
        models = {f"standard ({top}, seed 0)": [m["standard"][0]["model_dir"]],
                  f"regularized ({top}, seed 0)": [m["regularized"][0]["model_dir"]],
                  f"ensemble K={self.p.k_max} ({top})": [r["model_dir"] for r in m["ensemble"]]}
        distilled = self.results.get("distill", {})
        for recipe, label in (("ensemble", "student"), ("self", "self-distilled student"),
                              ("soft", "soft-label student")):
            if distilled.get(recipe):
                models[f"{label} ({distilled['preset']}, seed {distilled[recipe][0]['seed']})"] = [
                    distilled[recipe][0]["model_dir"]]
        return models

    def phase_downstream(self) -> None:
        from bench.evaluation.downstream import evaluate_downstream

        eval_dir = Path(self.cfg.eval_dir) if self.cfg.eval_dir else None
        tasks = [eval_dir / f"{t}.jsonl" for t in self.p.eval_tasks] if eval_dir else []
        missing = [str(t) for t in tasks if not t.exists()]
        if missing or (self.p.eval_tasks and not eval_dir):
            log.warning("downstream tasks absent, skipped: %s", ", ".join(missing) or "no --eval-dir")
            self.results["downstream_skipped"] = f"task files absent: {', '.join(missing) or 'no --eval-dir'}"
            tasks = []
        tasks += [Path(t) for t in self.cfg.tasks]
        if self.p.next_word_items:
            path = self.out / "heldout_next_word.jsonl"
            if not path.exists():  # a re-run trusts it: every run of the job scores the same items
                items = heldout_next_word(self.data_dir, self.p.next_word_items)
                atomic_write_text(path, "".join(json.dumps(i) + "\n" for i in items))
            tasks.append(path)
        if not tasks:
            return
        results = {}
        for name, dirs in self.downstream_models().items():
            key = {"kind": "downstream", "models": model_ids(dirs), "tasks": [str(t) for t in tasks],
                   "limit": self.p.eval_limit}
            results[name] = self.evals.value(key, lambda dirs=dirs: evaluate_downstream(
                dirs, tasks, "logits", self.p.eval_limit, progress=False))
            log.info("downstream %s: %s", name, ", ".join(f"{t} {r['acc']:.3f}" for t, r in results[name].items()))
        self.results["downstream"] = {"limit": self.p.eval_limit, "models": results}

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


def _losses(rows: list[dict]) -> str:
    return " / ".join(f"{r['val_loss']:.4f}" for r in rows)


# ---- the analysis: an EvaluationTable from results.json, then bench.science.analysis ----------------------------

def size_unit(params: float) -> tuple[float, str]:
    """N and D are fitted in billions at GPU sizes and millions at CPU sizes: the fit's p0 assumes x ~ 1."""
    return (1e9, "billions") if params >= 1e8 else (1e6, "millions")


def evaluation_rows(results: dict) -> list[dict]:
    """What was measured, as bench.science.analysis's rows (recipe, x, seeds, loss). Recipes: 'standard' and
    'regularized' (members at each N), 'ensemble' (every K-subset of the ensemble's members at each N),
    'data:standard' / 'data:regularized' (each budget D's best N, its seeds), 'student:ensemble',
    'student:self', 'control' (at the distillation size)."""
    p, search = results["profile"], results.get("search", {})
    n_scale, _ = size_unit(max([s["params"] for s in search.values()], default=0))
    d_scale, _ = size_unit(p["tokens"])
    rows = []
    for preset, m in results.get("members", {}).items():
        x = search[preset]["params"] / n_scale
        for recipe in ("standard", "regularized"):
            rows += [{"recipe": recipe, "x": x, "seeds": [r["seed"]], "loss": r["val_loss"]} for r in m[recipe]]
    for preset, subsets in results.get("ensembles", {}).items():
        x = search[preset]["params"] / n_scale
        rows += [{"recipe": "ensemble", "x": x, "seeds": r["seeds"], "loss": r["loss"]} for r in subsets]
    for d, best in best_per_budget(results).items():
        for recipe, (_, losses) in best.items():
            rows += [{"recipe": f"data:{recipe}", "x": d / d_scale, "seeds": [s], "loss": v}
                     for s, v in enumerate(losses)]
    distilled = results.get("distill", {})
    if distilled.get("preset") in search:
        x = search[distilled["preset"]]["params"] / n_scale
        for recipe, name in (("ensemble", "student:ensemble"), ("self", "student:self"), ("control", "control"),
                             ("soft", "student:soft"), ("soft-self", "student:soft-self"),
                             ("control-soft", "control:soft")):
            rows += [{"recipe": name, "x": x, "seeds": [r["seed"]], "loss": r["val_loss"]}
                     for r in distilled.get(recipe, [])]
    return rows


def budget_candidates(results: dict) -> dict[int, dict[str, dict[str, list[float]]]]:
    """Per budget D and recipe: every size measured there -> its seeds' losses. At the main budget every size's
    members count too, so the standard baseline there is the best over all sizes, not the budget phase's one."""
    out: dict[int, dict] = {}
    for preset, per_d in results.get("budgets", {}).items():
        for d, row in per_d.items():
            for recipe in ("standard", "regularized"):
                out.setdefault(int(d), {}).setdefault(recipe, {})[preset] = row[recipe]["seeds"]
    if out:  # the main budget joins the data law only where the study measured a data law
        main = out.setdefault(int(results["profile"]["tokens"]), {})
        for preset, m in results.get("members", {}).items():
            for recipe in ("standard", "regularized"):
                if m.get(recipe):
                    main.setdefault(recipe, {}).setdefault(preset, [r["val_loss"] for r in m[recipe]])
    return dict(sorted(out.items()))


def best_per_budget(results: dict) -> dict[int, dict[str, tuple[str, list[float]]]]:
    """Per budget D and recipe: the size with the lowest seed mean (over `budget_candidates`), its seeds' losses."""
    return {d: {recipe: min(sizes.items(), key=lambda kv: np.mean(kv[1])) for recipe, sizes in per_r.items()}
            for d, per_r in budget_candidates(results).items()}


@dataclass
class Analysis:
    """Every fitted or derived number the report prints, computed from results.json alone."""

    table: object  # bench.science.analysis.EvaluationTable
    n_unit: str
    d_unit: str
    size_laws: dict  # recipe -> PowerLawFit over N
    per_k: dict  # preset -> PowerLawFit over K (member-seed bootstrap)
    joint: object  # JointLimitFit or None
    data_law: object  # PowerLawFit of the standard recipe's best loss over D, or None
    efficiencies: dict  # name -> DataEfficiency
    headline: dict  # the efficiencies a headline may quote (bench.science.fits.headline_efficiencies)
    gains: dict  # name -> Gain: each recipe's gain with its member-seed interval, at the largest N
    gains_per_n: dict  # preset -> {name: Gain} (regularization and ensemble gains at every N)
    local_efficiencies: dict = dataclasses.field(default_factory=dict)  # name -> DataEfficiency between budgets


@dataclass(frozen=True)
class Gain:
    """A difference of losses (or a share) with a bootstrap interval over the seeds behind it."""

    value: float
    interval: object  # bench.science.fits.Interval
    note: str = ""


def seed_mean_draws(losses: list[float], n_boot: int, rng: np.random.Generator,
                    pool_with: tuple[list[float], ...] = ()) -> np.ndarray:
    """Bootstrap draws of the mean of seed losses (bench.science.fits.resample_seeds: unbiased, t-widened), the seed
    deviations pooled with those of `pool_with` (models of the same size whose seed noise is taken to be the
    same: 2 students alone have 1 degree of freedom, with 3 members beside them 3)."""
    from bench.science.fits import resample_seeds

    groups = [np.asarray(g, dtype=float) for g in (losses, *pool_with) if len(g)]
    if sum(len(g) - 1 for g in groups) < 1:
        return np.full(n_boot, np.nan)
    return resample_seeds(groups, n_boot, rng)[:, 0]


def story_gains(table, k_max: int, top_x: float, distill_x: float | None, n_boot: int,
                seed: int = 0) -> dict[str, Gain]:
    """The main story's gains at one size, each with a 95% interval from its seeds:
    regularization (standard - regularized seed means), the ensemble (members' mean - K=k_max ensemble, the
    member-seed bootstrap of bench.science.analysis), the student (members' mean - students' mean) and the share of
    the ensemble's gain it keeps, self-distillation (teacher - its student, paired by teacher), and the
    synthetic tokens' worth (control - student)."""
    from bench.science.analysis import loss_with_draws
    from bench.science.fits import Interval

    rng = np.random.default_rng(seed)

    def singles(recipe, x):
        try:
            return [v for s, v in sorted(table.cell(recipe, x).items(), key=lambda kv: min(kv[0])) if len(s) == 1]
        except ValueError:
            return []

    gains = {}
    std, reg = singles("standard", top_x), singles("regularized", top_x)
    if len(std) > 1 and len(reg) > 1:
        d = seed_mean_draws(std, n_boot, rng, (reg,)) - seed_mean_draws(reg, n_boot, rng, (std,))
        gains["regularization"] = Gain(float(np.mean(std) - np.mean(reg)), Interval.from_draws(d),
                                       f"standard {len(std)} seeds - regularized {len(reg)} seeds")
    if ("ensemble", top_x) in table.cells:
        m1, d1 = loss_with_draws(table, "ensemble", top_x, 1, n_boot, seed)
        mk, dk = loss_with_draws(table, "ensemble", top_x, k_max, n_boot, seed)
        gains["ensemble"] = Gain(m1 - mk, Interval.from_draws(d1 - dk), f"members' mean - K={k_max} ensemble")
    if distill_x is not None and ("ensemble", distill_x) in table.cells:
        m1, d1 = loss_with_draws(table, "ensemble", distill_x, 1, n_boot, seed)
        mk, dk = loss_with_draws(table, "ensemble", distill_x, k_max, n_boot, seed)
        gains["teacher"] = Gain(m1 - mk, Interval.from_draws(d1 - dk), f"members' mean - K={k_max} teacher")
        students = singles("student:ensemble", distill_x)
        if students:
            members = singles("ensemble", distill_x)
            ds = seed_mean_draws(students, n_boot, rng, (members,))
            s = float(np.mean(students))
            gains["student"] = Gain(m1 - s, Interval.from_draws(d1 - ds), f"members' mean - {len(students)} students")
            # the kept share is measured from the best single model of the student's size (the regularized
            # recipe's seeds), not from the joint-recipe members, which are overfit by design (2x epochs)
            best = singles("regularized", distill_x)
            if len(best) > 1:
                b, db = float(np.mean(best)), seed_mean_draws(best, n_boot, rng, (students,))
                gains["ensemble_over_best"] = Gain(b - mk, Interval.from_draws(db - dk),
                                                   f"best single (regularized seeds' mean) - K={k_max} ensemble")
                gains["kept"] = kept_share(b, db, s, ds, mk, dk, "student")
            control = singles("control", distill_x)
            if len(control) > 1 and len(students) > 1:
                gains["synthetic"] = Gain(float(np.mean(control)) - s,
                                          Interval.from_draws(seed_mean_draws(control, n_boot, rng, (students,))
                                                              - ds),
                                          "real-data-only control - student, same steps")
        gains.update(soft_gains(singles, distill_x, mk, dk, k_max, n_boot, rng))
        selfs = singles("student:self", distill_x)
        if len(selfs) > 1:
            teachers = singles("regularized", distill_x)[: len(selfs)]  # teacher i is the optimum's seed i
            diffs = [t - s for t, s in zip(teachers, selfs)]
            gains["self"] = Gain(float(np.mean(diffs)), Interval.from_draws(seed_mean_draws(diffs, n_boot, rng)),
                                 f"teacher - its self-distilled student, {len(diffs)} teachers")
    return gains


def kept_share(best: float, best_draws: np.ndarray, student: float, student_draws: np.ndarray, ensemble: float,
               ensemble_draws: np.ndarray, who: str) -> Gain:
    """The share of the ensemble's gain over the best single model that a student keeps, with its interval."""
    from bench.science.fits import Interval

    with np.errstate(divide="ignore", invalid="ignore"):
        draws = (best_draws - student_draws) / (best_draws - ensemble_draws)
    return Gain((best - student) / (best - ensemble) if best != ensemble else math.nan, Interval.from_draws(draws),
                f"(best single - {who}) / (best single - ensemble)")


def soft_gains(singles, x: float, mk: float, dk: np.ndarray, k_max: int, n_boot: int,
               rng: np.random.Generator) -> dict[str, Gain]:
    """The soft-label students against the paper's baselines: the best single model of their size (the regularized
    recipe's seeds), the K=k_max ensemble they learned from (mean mk, draws dk), and the real-data-only control at
    the same steps; the share of the ensemble's gain kept; self-distillation with soft labels (teacher - student)."""
    from bench.science.fits import Interval

    gains = {}
    softs, best = singles("student:soft", x), singles("regularized", x)
    if softs and len(best) > 1:
        sv, ds = float(np.mean(softs)), seed_mean_draws(softs, n_boot, rng, (best,))
        b, db = float(np.mean(best)), seed_mean_draws(best, n_boot, rng, (softs,))
        gains["soft_student"] = Gain(b - sv, Interval.from_draws(db - ds),
                                     f"best single (regularized seeds' mean) - {len(softs)} soft-label students")
        gains["soft_kept"] = kept_share(b, db, sv, ds, mk, dk, "soft-label student")
        gains["soft_vs_ensemble"] = Gain(mk - sv, Interval.from_draws(dk - ds),
                                         f"K={k_max} ensemble - soft-label students")
        control = singles("control:soft", x)
        if len(control) > 1:
            gains["soft_teacher"] = Gain(float(np.mean(control)) - sv,
                                         Interval.from_draws(seed_mean_draws(control, n_boot, rng, (softs,)) - ds),
                                         "real-data-only control (same schedule, CE) - soft-label students")
    selfs = singles("student:soft-self", x)
    if len(selfs) > 1:
        diffs = [t - s for t, s in zip(best, selfs)]  # teacher i is the optimum's seed i
        gains["soft_self"] = Gain(float(np.mean(diffs)), Interval.from_draws(seed_mean_draws(diffs, n_boot, rng)),
                                  f"teacher - its soft-label self-distilled student, {len(diffs)} teachers")
    return gains


def analyze(results: dict, n_boot: int = 200) -> Analysis:
    from bench.science.analysis import (
        EvaluationTable,
        efficiency_of_asymptote,
        efficiency_of_loss,
        fit_joint,
        fit_over_k,
        fit_over_x,
        local_efficiency_of_loss,
    )
    from bench.science.fits import headline_efficiencies

    p, search = results["profile"], results.get("search", {})
    rows = evaluation_rows(results)
    n_scale, n_unit = size_unit(max([s["params"] for s in search.values()], default=0))
    d_scale, d_unit = size_unit(p["tokens"])
    if not rows:
        return Analysis(None, n_unit, d_unit, {}, {}, None, None, {}, {}, {}, {})
    table = EvaluationTable(rows, "results.json")
    recipes = set(table.recipes())
    size_laws = {r: fit_over_x(table, r, n_boot) for r in ("standard", "regularized") if r in recipes}
    per_k, joint = {}, None
    if "ensemble" in recipes:
        per_k = {preset: fit_over_k(table, "ensemble", search[preset]["params"] / n_scale, n_boot)
                 for preset in results.get("ensembles", {})}
        joint = fit_joint(table, "ensemble", n_boot)
    data_law, effs, local = None, {}, {}
    main_d = p["tokens"] / d_scale
    top = [q for q in p["presets"] if q in results.get("members", {})]
    if "data:standard" in recipes:
        data_law = fit_over_x(table, "data:standard", n_boot)
    floor = results.get("calibration", {}).get("floor")
    if floor is not None:  # a limit below the source's Bayes floor is flagged, so no headline is derived from it
        from bench.science.calibration import flag_below_floor

        size_laws = {r: flag_below_floor(f, floor) for r, f in size_laws.items()}
        per_k = {q: flag_below_floor(f, floor) for q, f in per_k.items()}
        joint, data_law = flag_below_floor(joint, floor), flag_below_floor(data_law, floor)
    if data_law is not None:
        for d, best in best_per_budget(results).items():
            if "regularized" in best:
                name = f"regularized, best N ({best['regularized'][0]}), D={d:,}"
                effs[name] = efficiency_of_loss(data_law, table, "data:regularized", d / d_scale, 1, d / d_scale, n_boot)
                local[name] = local_efficiency_of_loss(table, "data:standard", "data:regularized", d / d_scale, 1,
                                                       d / d_scale, n_boot)
        if top and "ensemble" in recipes:
            x = search[top[-1]]["params"] / n_scale
            name = f"ensemble K={p['k_max']} ({top[-1]}), D={p['tokens']:,}"
            effs[name] = efficiency_of_loss(data_law, table, "ensemble", x, p["k_max"], main_d, n_boot)
            local[name] = local_efficiency_of_loss(table, "data:standard", "ensemble", x, p["k_max"], main_d, n_boot)
        distilled = results.get("distill", {})
        if distilled.get("ensemble"):
            x = search[distilled["preset"]]["params"] / n_scale
            name = f"student ({distilled['preset']}), D={p['tokens']:,}"
            effs[name] = efficiency_of_loss(data_law, table, "student:ensemble", x, 1, main_d, n_boot)
            local[name] = local_efficiency_of_loss(table, "data:standard", "student:ensemble", x, 1, main_d, n_boot)
        if "regularized" in size_laws:
            effs["regularized, N -> inf (asymptote)"] = efficiency_of_asymptote(data_law, size_laws["regularized"], main_d)
        if joint is not None:
            effs["joint N, K -> inf (asymptote)"] = efficiency_of_asymptote(data_law, joint, main_d)
    top_x = search[top[-1]]["params"] / n_scale if top else math.nan
    dp = results.get("distill", {}).get("preset")
    distill_x = search[dp]["params"] / n_scale if dp in search else None
    gains = story_gains(table, p["k_max"], top_x, distill_x, n_boot) if top else {}
    per_n = {q: story_gains(table, p["k_max"], search[q]["params"] / n_scale, None, n_boot) for q in top}
    return Analysis(table, n_unit, d_unit, size_laws, per_k, joint, data_law, effs, headline_efficiencies(effs), gains,
                    per_n, local)


def write_report(results: dict, out: str | Path, n_boot: int = 200) -> Path:
    """Analyse results.json's content and write OUT/REPORT.md and its plots (bench.science.report renders)."""
    from bench.science.report import render_report, write_text

    out = Path(out)
    return write_text(out / "REPORT.md", render_report(results, analyze(results, n_boot), out, PHASES))


# ---- entry points ------------------------------------------------------------------------------

def run_study(cfg: StudyConfig) -> dict:
    """Run (or finish) the study in cfg.out and write its report; return results.json's content."""
    for c in cfg.corpus:
        if not Path(c).exists():
            raise StudyError(f"corpus {c} does not exist")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    with OutputLock(cfg.out):  # one study per directory: a second is refused, naming the first
        return Study(cfg).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="wiki",
                        help=f"a profile name ({', '.join(profile_names())}) or a profile JSON file (default wiki)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--corpus", nargs="+", help="corpus files or directories (default: the profile's corpus)")
    source.add_argument("--data-dir", help="an existing dataset directory (`python -m train data`) instead of a corpus")
    parser.add_argument("--out", required=True, help="study directory (data, runs, REPORT.md, plots, results.json)")
    parser.add_argument("--eval-dir", default=str(ROOT.parent / "shared" / "data" / "eval"),
                        help="directory of downstream task files (JSON lines); absent: those tasks are skipped")
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    parser.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples per fit (default 200)")
    parser.add_argument("--past-gate", action="store_true",
                        help="run the study on after a failed gate phase (its report keeps the verdict)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite REPORT.md and plots from OUT/results.json; train and evaluate nothing")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    with exit_on():
        if args.report_only:
            path = Path(args.out) / "results.json"
            if not path.exists():
                raise StudyError(f"{path} does not exist: run the study first")
            print(write_report(read_json(path, "study results"), args.out, args.n_boot).read_text())
            return
        command = "python -m bench.study " + " ".join(sys.argv[1:] if argv is None else argv)
        cfg = StudyConfig(profile=load_profile(args.profile), out=args.out, corpus=tuple(args.corpus or ()),
                          eval_dir=args.eval_dir, data_dir=args.data_dir, address=args.address, n_boot=args.n_boot,
                          command=command, past_gate=args.past_gate)
        results = run_study(cfg)
    print(json.dumps({"report": str(Path(args.out) / "REPORT.md"), "phases_done": results["phases_done"],
                      "trained": results["trained_last_invocation"],
                      "evaluated": results["evaluated_last_invocation"]}))


if __name__ == "__main__":
    main()
