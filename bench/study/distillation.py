"""The study's last phases: the packed ensemble behind the endpoint (serve), students distilled from it and from
single members (distill), and zero-shot accuracy of every recipe's model (downstream)."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np

from bench.study.profile import StudyError
from bench.study.training import model_ids
from distill.budget import SYNTHETIC_MARGIN, synthetic_budget
from plumbing.artifacts import atomic_write_text
from serve.endpoint_check import check_endpoint, free_port
from train.run_dir import RunDir

log = logging.getLogger("bench.study")


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


class DistillationPhases:
    """The phases that use the trained members as teachers and products; mixed into bench.study.job.Study, which
    holds the state they use (cfg, p, out, data_dir, results, evals, trained, train, base_config)."""

    def _release_ray(self) -> None:
        if self.cfg.address:
            return
        import ray

        if ray.is_initialized():
            ray.shutdown()  # the endpoint and the synthetic job start their own

    def teacher_dirs(self) -> list[str]:
        preset = self.p.distill.distill_preset or self.p.runs.presets[-1]
        return [m["model_dir"] for m in self.results["members"][preset]["ensemble"]]

    def phase_serve(self) -> None:
        from serve.pack import pack_ensemble

        if not self.p.serve.serve_check:
            return
        ensemble_dir = pack_ensemble(self.teacher_dirs(), self.out / "ensemble", combine="logits")
        key = {"kind": "endpoint", "models": model_ids([str(ensemble_dir)])}
        self._release_ray()
        endpoint = self.evals.value(key, lambda: check_endpoint(ensemble_dir, free_port(), self.cfg.address))
        log.info("endpoint answered: models %s, completion %r, %d stream chunks", endpoint["models"],
                 endpoint["completion"][:60], endpoint["stream_chunks"])
        self.results["serve"] = {**endpoint, "ensemble_dir": str(ensemble_dir)}

    def phase_distill(self) -> None:
        from distill.student import DistillConfig, distill

        preset = self.p.distill.distill_preset
        if not preset:
            return
        root = self.out / "distill"
        root.mkdir(parents=True, exist_ok=True)
        runs, d = self.p.runs, self.p.distill
        budget = synthetic_budget(runs.tokens, runs.context, runs.batch_size, d.student_epochs, d.distill_w)
        soft_budget = (synthetic_budget(runs.tokens, runs.context, runs.batch_size, d.soft_epochs, d.soft_w)
                       if d.soft_w else 0)
        reg = self.results["search"][preset]["regularized"]
        student = dataclasses.replace(self.base_config(preset, runs.tokens), epochs=d.student_epochs, lr=reg["lr"],
                                      weight_decay=d.student_wd)
        soft_student = dataclasses.replace(student, epochs=d.soft_epochs, weight_decay=d.soft_wd)
        record = self.results.setdefault("distill", {})
        record.update({"preset": preset, "synthetic_tokens_rule": (
            f"(ceil({SYNTHETIC_MARGIN} x steps x batch x w) + 16) x context, steps = real windows x student epochs "
            f"/ (1 - w) / batch: {budget:,} tokens per teacher, fixed before the run"),
            "synthetic_tokens": budget, "w": d.distill_w, "student_epochs": d.student_epochs,
            "student_wd": d.student_wd, "student_lr": reg["lr"]})
        if d.soft_students or d.soft_self_teachers:
            record["soft_recipe"] = {"epochs": d.soft_epochs, "w": d.soft_w, "blend": d.soft_blend, "wd": d.soft_wd,
                                     "lr": reg["lr"], "topk": d.topk, "synthetic_tokens": soft_budget}

        # (kind, index, teacher member or None, soft labels?): seq-level students, then soft-label ones
        students = [("ensemble", i, None, False) for i in range(d.student_seeds)]
        students += [("self", i, i, False) for i in range(d.self_teachers)]
        students += [("soft", i, None, True) for i in range(d.soft_students)]
        students += [("soft-self", i, i, True) for i in range(d.soft_self_teachers)]
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
                                w=d.soft_w if soft else d.distill_w, blend=d.soft_blend if soft else 0.0,
                                annotations=str(annotations) if annotations else None)
            run_dir = root / f"student-{kind}-{i}"
            fresh = not RunDir(run_dir).complete
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
        if d.distill_control:  # the same student recipe on real data only, at the same number of optimizer steps
            record["control"] = self.control(record["ensemble"][0]["steps"], student, root / "control", 3000,
                                             d.student_seeds)
            self.save()
        if d.soft_control and record.get("soft"):  # the soft recipe's schedule, CE on real data only, same steps
            record["control-soft"] = self.control(record["soft"][0]["steps"], soft_student, root / "control-soft", 6000,
                                                  d.soft_students)
            self.save()

    def distill_teacher(self, member: int | None) -> tuple[Path, str]:
        """The packed ensemble (member None) or one member at the regularized optimum, and its short name."""
        from serve.pack import pack_ensemble

        if member is not None:
            preset = self.p.distill.distill_preset
            return Path(self.results["members"][preset]["regularized"][member]["model_dir"]), f"self-{member}"
        if "serve" in self.results:
            return Path(self.results["serve"]["ensemble_dir"]), "ensemble"
        return pack_ensemble(self.teacher_dirs(), self.out / "distill" / "teacher-ensemble"), "ensemble"

    def synthetic_for(self, teacher: Path, name: str, member: int | None, budget: int, soft_budget: int) -> Path | None:
        """The teacher's one synthetic job, sized for every student that reads it (sequence-level: `budget`, soft:
        `soft_budget`) and carrying top-k when a soft student reads it; None when no student needs one."""
        from synthdata.job import GenerateConfig, generate

        d = self.p.distill
        seq = d.student_seeds if member is None else int(member < d.self_teachers)
        soft = d.soft_students if member is None else int(member < d.soft_self_teachers)
        tokens = max(budget if seq else 0, soft_budget if soft else 0)
        if not tokens:
            return None
        out = self.out / "distill" / f"synthetic-{name}"
        self._release_ray()  # a local Ray of training workers would hold the cores the engine needs
        generate(GenerateConfig(teacher=str(teacher), tokens=tokens, out=str(out),
                                shard_tokens=d.synthetic_shard_tokens, address=self.cfg.address, topk=d.topk if soft and d.soft_w else 0))
        return out

    def annotations_for(self, teacher: Path, name: str) -> Path:
        from synthdata.annotate import AnnotateConfig, annotate

        out = self.out / "distill" / f"annotations-{name}"
        self._release_ray()
        annotate(AnnotateConfig(teacher=str(teacher), data_dir=str(self.data_dir), out=str(out),
                                context=self.p.runs.context, tokens=self.p.runs.tokens, topk=self.p.distill.topk,
                                address=self.cfg.address))
        return out

    def control(self, steps: int, student, ledger_dir: Path, seed0: int, seeds: int) -> list[dict]:
        """A student's schedule on real data only (cross-entropy), at the same number of optimizer steps."""
        runs = self.p.runs
        per_epoch = math.ceil(math.ceil((runs.tokens - 1) / runs.context) / runs.batch_size)
        epochs = max(1, round(steps / per_epoch))
        configs = [dataclasses.replace(student, epochs=epochs, seed=seed0 + i) for i in range(seeds)]
        records = self.train(configs, ledger_dir, "control")
        return [{"seed": c.seed, "epochs": epochs, "steps": per_epoch * epochs, "val_loss": r["val_loss"]}
                for c, r in zip(configs, records)]

    def downstream_models(self) -> dict[str, list[str]]:
        """Each recipe's model at the largest N (distillation at its own size): name -> member dirs."""
        top = self.p.runs.presets[-1]
        m = self.results["members"][top]
        models = {f"standard ({top}, seed 0)": [m["standard"][0]["model_dir"]],
                  f"regularized ({top}, seed 0)": [m["regularized"][0]["model_dir"]],
                  f"ensemble K={self.p.members.k_max} ({top})": [r["model_dir"] for r in m["ensemble"]]}
        distilled = self.results.get("distill", {})
        for recipe, label in (("ensemble", "student"), ("self", "self-distilled student"),
                              ("soft", "soft-label student")):
            if distilled.get(recipe):
                models[f"{label} ({distilled['preset']}, seed {distilled[recipe][0]['seed']})"] = [
                    distilled[recipe][0]["model_dir"]]
        return models

    def phase_downstream(self) -> None:
        from serve.downstream import evaluate_downstream

        eval_dir = Path(self.cfg.eval_dir) if self.cfg.eval_dir else None
        tasks = [eval_dir / f"{t}.jsonl" for t in self.p.downstream.eval_tasks] if eval_dir else []
        missing = [str(t) for t in tasks if not t.exists()]
        if missing or (self.p.downstream.eval_tasks and not eval_dir):
            log.warning("downstream tasks absent, skipped: %s", ", ".join(missing) or "no --eval-dir")
            self.results["downstream_skipped"] = f"task files absent: {', '.join(missing) or 'no --eval-dir'}"
            tasks = []
        tasks += [Path(t) for t in self.cfg.tasks]
        if self.p.downstream.next_word_items:
            path = self.out / "heldout_next_word.jsonl"
            if not path.exists():  # a re-run trusts it: every run of the job scores the same items
                items = heldout_next_word(self.data_dir, self.p.downstream.next_word_items)
                atomic_write_text(path, "".join(json.dumps(i) + "\n" for i in items))
            tasks.append(path)
        if not tasks:
            return
        results = {}
        for name, dirs in self.downstream_models().items():
            key = {"kind": "downstream", "models": model_ids(dirs), "tasks": [str(t) for t in tasks],
                   "limit": self.p.downstream.eval_limit}
            results[name] = self.evals.value(key, lambda dirs=dirs: evaluate_downstream(
                dirs, tasks, "logits", self.p.downstream.eval_limit, progress=False))
            log.info("downstream %s: %s", name, ", ".join(f"{t} {r['acc']:.3f}" for t, r in results[name].items()))
        self.results["downstream"] = {"limit": self.p.downstream.eval_limit, "models": results}
