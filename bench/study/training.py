"""The study's training phases (data, gate, search, members, ensembles, joint, budgets) and the helpers they share:
every run goes through train/'s ledgers, every evaluation through the study's evaluation cache."""
from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path

import numpy as np

from bench.study.analysis import write_report
from bench.study.profile import ROOT, StudyError
from train.run_dir import RunDir
from train.search import run_ledger

log = logging.getLogger("bench.study")


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


class TrainingPhases:
    """The phases that train and evaluate single models and their ensembles; mixed into bench.study.job.Study,
    which holds the state they use (cfg, p, out, data_dir, results, evals, trained)."""

    # -- training through train/'s ledgers

    def base_config(self, preset: str, tokens: int):
        from train.trainer import TrainConfig

        e, lr, wd = self.p.recipes.start
        return TrainConfig(data_dir=str(self.data_dir.resolve()), preset=preset, tokens=tokens, epochs=e, lr=lr,
                           weight_decay=wd, batch_size=self.p.runs.batch_size, context=self.p.runs.context,
                           checkpoint_every=self.p.runs.checkpoint_every)

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

        recipes = self.p.recipes
        e, lr, wd = recipes.start
        if not recipes.search:
            wd = 0.1 if standard else wd
            return {"epochs": e, "lr": lr, "wd": wd, "certified": False, "rounds": 0, "runs": [],
                    "reason": "fixed by the profile, not searched"}
        space = SearchSpace(epochs=recipes.epochs, lrs=recipes.lrs, wds=(0.1,) if standard else recipes.wds,
                            fixed=("wd",) if standard else (), limits=recipes.limits or DEFAULT_LIMITS)
        start = recipes.start
        if tokens != self.p.runs.tokens:  # the data law: epochs and wd searched again at each budget, lr kept
            start = self._main_optimum(preset, standard)
            space = dataclasses.replace(space, lrs=(start[1],), fixed=tuple({*space.fixed, "lr"}))
        ledger_dir = self.ledger_dir(preset, tokens)
        before = len(run_ledger(ledger_dir).records)
        outcome = coordinate_descent(self.base_config(preset, tokens), space, ledger_dir,
                                     start=(start[0], start[1], 0.1 if standard else start[2]),
                                     address=self.cfg.address, max_rounds=recipes.max_rounds)
        self.trained += len(run_ledger(ledger_dir).records) - before
        o = outcome["optimum"]
        return {"epochs": o["epochs"], "lr": o["lr"], "wd": o["wd"], "certified": outcome["certified"],
                "rounds": outcome["rounds"], "reason": outcome["reason"], "runs": outcome["runs"]}

    def _main_optimum(self, preset: str, standard: bool) -> tuple:
        o = self.results["search"][preset]["standard" if standard else "regularized"]
        return o["epochs"], o["lr"], o["wd"]

    def seeds_at(self, preset: str, tokens: int, o: dict, n: int, desc: str = "seeds") -> list[dict]:
        configs = [self.at(preset, tokens, o["epochs"], o["lr"], o["wd"], s) for s in range(n)]
        return [{"seed": c.seed, "val_loss": r["val_loss"], "model_dir": str(RunDir(r["run_dir"]).model_dir)}
                for c, r in zip(configs, self.train(configs, self.ledger_dir(preset, tokens), desc))]

    def ensemble_setting(self, preset: str) -> dict:
        from train.members import joint_recipe

        o = self.results["search"][preset]["regularized"]
        if not self.p.members.joint_members:
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
            data = self.p.data
            if not corpus and data.calibration is not None:
                from bench.science.calibration import MarkovSource, write_corpus

                corpus = [str(write_corpus(MarkovSource.from_record(data.calibration), self.out / "calibration"))]
            elif not corpus:
                corpus = [str(default_corpus(ROOT / ".cache" / "corpus")) if data.corpus == "default"
                          else str((ROOT / data.corpus).resolve())]
            for c in corpus:
                if not Path(c).exists():
                    raise StudyError(f"corpus {c} does not exist")
            spec = DatasetSpec(corpus=tuple(corpus), vocab_size=data.vocab_size, val_max_tokens=data.val_tokens,
                               max_chars=data.max_chars, chunk_tokens=data.chunk_tokens)
            manifest = prepare_dataset(spec, self.data_dir)
        needed = max((self.p.runs.tokens, *self.p.data_law.budgets))
        load_tokens(self.data_dir, "train", needed, verify=False)  # a corpus too small fails here, named
        val = manifest["splits"]["val"]
        self.results["dataset"] = {"corpus": corpus, "vocab_size": manifest["vocab_size"],
                                   "train_tokens": manifest["splits"]["train"]["tokens"],
                                   "val_tokens": val["tokens"], "val_documents": val["documents"],
                                   "chunk_tokens": manifest["inputs"]["spec"].get("chunk_tokens")}
        if self.p.data.calibration is not None:
            self.results["calibration"] = self.calibration_floor(manifest)

    def calibration_floor(self, manifest: dict) -> dict:
        """The Bayes floor of the calibration source on this dataset's validation stream (bench.science.calibration)."""
        from bench.science.calibration import MarkovSource, draw_chain, symbol_tokens, validation_floor
        from train.data import load_tokenizer, load_tokens

        source = MarkovSource.from_record(self.p.data.calibration)
        start, token_symbol = symbol_tokens(load_tokenizer(self.data_dir / "tokenizer"), source.symbols)
        floor = validation_floor(draw_chain(source), source.p_end, load_tokens(self.data_dir, "val"),
                                 self.p.runs.context, manifest["bos_token_id"], manifest["eos_token_id"], start,
                                 token_symbol)
        log.info("calibration floor %.4f nats/token on %d validation targets (entropy rate %.4f)", floor["floor"],
                 floor["targets"], floor["entropy_rate"])
        return floor

    def phase_gate(self) -> None:
        """A few runs at the main budget (in the search's ledgers, so its start points are not trained twice)."""
        gate, tokens = self.p.gate, self.p.runs.tokens
        if not gate.gate_epochs:
            return
        e, lr, wd = self.p.recipes.start
        small, large = self.p.runs.presets[0], self.p.runs.presets[-1]
        regularized = {preset: self.train([self.at(preset, tokens, e, lr, wd)], self.ledger_dir(preset, tokens),
                                          f"gate {preset}")[0]["val_loss"] for preset in (small, large)}
        standard = self.train([self.at(large, tokens, n, lr, 0.1) for n in gate.gate_epochs],
                              self.ledger_dir(large, tokens), f"gate {large} standard")
        verdict = gate_verdict(regularized[small], regularized[large],
                               {n: r["val_loss"] for n, r in zip(gate.gate_epochs, standard)}, gate.gate_min_gap,
                               gate.gate_overfit)
        self.results["gate"] = {**verdict, "small": small, "large": large, "recipe": [e, lr, wd], "tokens": tokens}
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
        for preset in self.p.runs.presets:
            log.info("search at N = %s (D = %d): regularized, then standard", preset, self.p.runs.tokens)
            search[preset] = {"params": get_shape(preset).non_embedding_params(),
                              "regularized": self.optimum(preset, self.p.runs.tokens, standard=False),
                              "standard": self.optimum(preset, self.p.runs.tokens, standard=True)}
            self.save()

    def phase_members(self) -> None:
        """Seeds at both optima and the ensemble's members, one training call per N (so they stack)."""
        members, setting = self.results.setdefault("members", {}), self.p.members
        for preset in self.p.runs.presets:
            s = self.results["search"][preset]
            ens = self.ensemble_setting(preset)
            n_reg = setting.seeds if setting.joint_members else max(setting.seeds, setting.k_max)
            plan = ([("standard", s["standard"], seed) for seed in range(setting.seeds)]
                    + [("regularized", s["regularized"], seed) for seed in range(n_reg)]
                    + ([("ensemble", ens, seed) for seed in range(setting.k_max)] if setting.joint_members else []))
            configs = [self.at(preset, self.p.runs.tokens, o["epochs"], o["lr"], o["wd"], seed) for _, o, seed in plan]
            records = self.train(configs, self.ledger_dir(preset, self.p.runs.tokens), f"{preset} members")
            rows = {"standard": [], "regularized": [], "ensemble": []}
            for (recipe, _, seed), r in zip(plan, records):
                rows[recipe].append({"seed": seed, "val_loss": r["val_loss"], "model_dir": str(RunDir(r["run_dir"]).model_dir)})
            if not setting.joint_members:
                rows["ensemble"] = rows["regularized"][: setting.k_max]
            members[preset] = {**rows, "ensemble_setting": ens}
            log.info("%s: standard %s; regularized %s", preset, _losses(rows["standard"]), _losses(rows["regularized"]))
            self.save()

    def ensemble_loss(self, model_dirs: list[str]) -> float:
        from serve.evaluation import validation_loss

        key = {"kind": "loss", "models": model_ids(model_dirs), "combine": "logits"}
        return self.evals.value(key, lambda: validation_loss(model_dirs, self.data_dir, "logits", progress=False))["loss"]

    def subset_ensembles(self, dirs: list[str], desc: str) -> list[dict]:
        """The loss of every K-subset ensemble (K = 1 .. len(dirs)) of these members: the curve over K and its
        member-seed bootstrap (bench.science.analysis) need every subset."""
        from tqdm import tqdm

        subsets = [s for k in range(1, len(dirs) + 1) for s in itertools.combinations(range(len(dirs)), k)]
        rows = [{"k": len(s), "seeds": list(s), "loss": self.ensemble_loss([dirs[i] for i in s])}
                for s in tqdm(subsets, desc=desc, unit="subset")]
        log.info("%s: K=%d loss %.4f (K=1 mean %.4f)", desc, len(dirs), rows[-1]["loss"],
                 np.mean([r["loss"] for r in rows if r["k"] == 1]))
        return rows

    def phase_ensembles(self) -> None:
        ensembles = self.results.setdefault("ensembles", {})
        for preset in self.p.runs.presets:
            dirs = [m["model_dir"] for m in self.results["members"][preset]["ensemble"]]
            ensembles[preset] = self.subset_ensembles(dirs, f"{preset} ensembles")
            self.save()

    def phase_joint(self) -> None:
        """k_max members at the joint recipe (train.members.joint_recipe of the regularized optimum) at each of
        joint.joint_presets, and every K-subset ensemble of them: beside the optimum members' ensembles at the same
        N, whether members trained for an ensemble make a better one (the paper: K -> inf 3.27 vs 3.34 at 300M)."""
        from train.members import joint_recipe

        if not self.p.joint.joint_presets:
            return
        joint, tokens = self.results.setdefault("joint", {}), self.p.runs.tokens
        for preset in self.p.joint.joint_presets:
            o = self.results["search"][preset]["regularized"]
            epochs, wd = joint_recipe(o["epochs"], o["wd"])
            setting = {"epochs": epochs, "lr": o["lr"], "wd": wd}
            members = self.seeds_at(preset, tokens, setting, self.p.members.k_max, f"{preset} joint-recipe members")
            joint[preset] = {"setting": setting, "members": members,
                             "ensembles": self.subset_ensembles([m["model_dir"] for m in members],
                                                                f"{preset} joint-recipe ensembles")}
            self.save()

    def phase_budgets(self) -> None:
        budgets = self.results.setdefault("budgets", {})
        for preset in self.p.data_law.budget_presets:
            per_d = budgets.setdefault(preset, {})
            main = self.results["members"][preset]
            per_d[str(self.p.runs.tokens)] = {
                r: {**{k: self.results["search"][preset][r][k] for k in ("epochs", "lr", "wd")},
                    "seeds": [m["val_loss"] for m in main[r][: self.p.members.seeds]]}
                for r in ("standard", "regularized")}
            for tokens in self.p.data_law.budgets:
                row = {}
                for recipe in ("standard", "regularized"):
                    o = self.optimum(preset, tokens, standard=recipe == "standard")
                    seeds = self.seeds_at(preset, tokens, o, self.p.data_law.budget_seeds or self.p.members.seeds)
                    row[recipe] = {**{k: o[k] for k in ("epochs", "lr", "wd", "certified", "reason")},
                                   "seeds": [m["val_loss"] for m in seeds]}
                per_d[str(tokens)] = row
                self.save()

def _losses(rows: list[dict]) -> str:
    return " / ".join(f"{r['val_loss']:.4f}" for r in rows)

