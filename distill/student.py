"""Student pre-training on real + synthetic tokens, through train/'s loop (optimizer, checkpoints, metrics).

Recipes (the paper's distillation experiments):
    ensemble        teacher = a K >= 2 member ensemble, student one member-sized (or smaller) model; w = 0.75
    self            teacher = one member, student the same size; w = 0.75
    synthetic-only  every row synthetic, for the same number of steps as weight w: the ablation that is
                    expected to collapse (it warns)

Soft labels (`blend` > 0, distill/kd.py): wherever the teacher's top-k is known, the loss blends cross-entropy with
the KL from the teacher's distribution: on synthetic rows made with `synthdata generate --topk`, and on real rows
with `annotations` (`synthdata annotate`, the teacher's view of the real windows). With annotations the synthetic
data may be left out (w = 0): the student then learns the ensemble's distribution on the real tokens alone.
blend = 0 is the paper's sequence-level distillation.

The mixture is part of the run's identity (TrainConfig.extra): teacher hash, synthetic manifest hash, w,
recipe, and the soft-label settings. After training, OUT/mixture.json records what the student actually consumed.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from distill.mixture import MixtureBatches
from distill.kd import kd_token_loss
from synthdata.annotate import Annotations
from synthdata.loader import TokenShards
from plumbing.artifacts import atomic_write_json
from plumbing.config_flags import setting
from train.data import DataError, load_tokens, read_manifest, windows
from train.run_dir import RunDir
from train.trainer import TrainConfig, token_loss_on_device, train_loop, validation_windows
from plumbing.console import ChorusError

log = logging.getLogger(__name__)

RECIPES = {"ensemble": 0.75, "self": 0.75, "synthetic-only": 0.5}  # recipe -> default w


class DistillError(ChorusError):
    """Inputs that cannot make a student: found before any training starts."""


@dataclass(frozen=True)
class DistillConfig:
    """A student's distillation; a field's help is its command-line flag's (distill/cli.py derives them)."""
    train: TrainConfig  # the student: data_dir is the real data, epochs are passes over its `tokens`
    synthetic_dir: str | None = setting(  # None: real tokens only (w = 0), with their teacher annotations
        help="synthetic data directory (synthdata's output); may be left out with --w 0 and --annotations")
    recipe: str = setting("ensemble", "ensemble: teacher is a K>=2 ensemble; self: teacher is one member of the "
                                      "student's size; synthetic-only: the collapse ablation (default %(default)s)",
                          choices=RECIPES)
    w: float | None = setting(  # None: the recipe's
        None, "synthetic weight in [0, 1) (default: " + ", ".join(f"{r} {w}" for r, w in RECIPES.items()) + ")")
    blend: float = setting(  # KD weight (distill/kd.py)
        0.0, "soft labels: loss = (1 - blend) x CE + blend x KL(teacher top-k || student) where the teacher's top-k "
             "is known (synthetic shards made with --topk, --annotations); default %(default)g: the paper's "
             "sequence-level recipe (CE on sampled tokens)")
    temperature: float = setting(1.0, "KD temperature (default %(default)g)")
    annotations: str | None = setting(
        None, "the teacher's top-k over the real training windows (`python -m synthdata annotate`)")

    def soft_labels(self) -> dict | None:
        """The KD settings, recorded in the run's identity (None for the sequence-level recipe)."""
        if not self.blend:
            return None
        return {"blend": self.blend, "temperature": self.temperature,
                "annotations": str(Path(self.annotations).resolve()) if self.annotations else None}


@dataclass(frozen=True)
class Teachers:
    """What the student learns from, checked: synthetic shards (None without), real-data annotations (None without)."""
    synthetic: TokenShards | None
    annotations: Annotations | None
    w: float

    @property
    def sha256(self) -> str:
        return self.synthetic.teacher_sha256 if self.synthetic else self.annotations.job["teacher_sha256"]

    @property
    def members(self) -> int:
        return self.synthetic.teacher_members if self.synthetic else self.annotations.job["teacher_members"]


def check_inputs(cfg: DistillConfig) -> Teachers:
    """The synthetic shards, annotations and the weight w, after every check that can fail before training."""
    if cfg.recipe not in RECIPES:
        raise DistillError(f"unknown recipe {cfg.recipe!r}; choose one of {', '.join(RECIPES)}")
    w = RECIPES[cfg.recipe] if cfg.w is None else cfg.w
    if not 0 <= w < 1:
        raise DistillError(f"synthetic weight w must be in [0, 1) (got {w}); "
                           "for training on synthetic tokens only use --recipe synthetic-only")
    if not 0 <= cfg.blend <= 1:
        raise DistillError(f"blend (the KD weight) must be in [0, 1] (got {cfg.blend})")
    if not cfg.temperature > 0:
        raise DistillError(f"temperature must be > 0 (got {cfg.temperature})")
    try:
        dataset = read_manifest(cfg.train.data_dir)
    except DataError as e:
        raise DistillError(f"real data: {e}") from None
    annotations = None
    if cfg.annotations:
        if not cfg.blend:
            raise DistillError("--annotations are soft labels: give --blend > 0 to use them")
        try:
            annotations = Annotations.open(cfg.annotations)
        except DataError as e:
            raise DistillError(f"teacher annotations: {e}") from None
        if annotations.job["tokenizer_sha256"] != dataset["tokenizer_sha256"]:
            raise DistillError(f"teacher annotations in {cfg.annotations} come from another tokenizer than the real "
                               f"data in {cfg.train.data_dir}")
    if cfg.synthetic_dir is None:
        if w or cfg.recipe == "synthetic-only":
            raise DistillError(f"no synthetic data: the synthetic weight must be 0 (got {w}); give --synthetic")
        if annotations is None:
            raise DistillError("a student needs a teacher: give --synthetic, or --annotations with --blend")
        members = annotations.job["teacher_members"]
        if (cfg.recipe == "ensemble") != (members >= 2):
            raise DistillError(f"recipe {cfg.recipe!r} does not fit the annotations' {members}-member teacher (ensemble: "
                               "K >= 2, self: one member)")
        return Teachers(None, annotations, w)
    if not Path(cfg.synthetic_dir).is_dir():
        raise DistillError(f"synthetic data directory {cfg.synthetic_dir} does not exist")
    try:
        synthetic = TokenShards.open(cfg.synthetic_dir)
    except DataError as e:
        raise DistillError(f"synthetic data: {e}") from None
    if synthetic.kind != "synthetic":
        raise DistillError(f"{cfg.synthetic_dir} is a real dataset, not a synthdata job's output")
    if synthetic.tokenizer_sha256 != dataset["tokenizer_sha256"] or synthetic.vocab_size != dataset["vocab_size"]:
        raise DistillError(
            f"synthetic shards in {cfg.synthetic_dir} come from another tokenizer than the real data in "
            f"{cfg.train.data_dir} (tokenizer sha256 {synthetic.tokenizer_sha256[:12]} vs "
            f"{dataset['tokenizer_sha256'][:12]}, vocab {synthetic.vocab_size} vs {dataset['vocab_size']})")
    if annotations is not None and annotations.job["teacher_sha256"] != synthetic.teacher_sha256:
        raise DistillError(f"synthetic data in {cfg.synthetic_dir} and annotations in {cfg.annotations} come from "
                           "different teachers")
    if cfg.blend and not synthetic.topk and w:
        log.warning("synthetic data in %s has no teacher top-k (made without --topk): its rows train with "
                    "cross-entropy alone", cfg.synthetic_dir)
    if cfg.recipe == "ensemble" and synthetic.teacher_members < 2:
        raise DistillError(f"recipe 'ensemble' needs an ensemble teacher; {cfg.synthetic_dir} was sampled from "
                           "a single member (use --recipe self)")
    if cfg.recipe == "self" and synthetic.teacher_members != 1:
        raise DistillError(f"recipe 'self' needs a single-member teacher; {cfg.synthetic_dir} was sampled from "
                           f"a {synthetic.teacher_members}-member ensemble (use --recipe ensemble)")
    return Teachers(synthetic, annotations, w)


def distill(cfg: DistillConfig, run_dir: str | Path, progress: bool = True) -> dict:
    """Train the student in run_dir (resumable); return train/'s result with the mixture consumed."""
    teachers = check_inputs(cfg)
    synthetic, w = teachers.synthetic, teachers.w
    if cfg.recipe == "synthetic-only":
        log.warning("synthetic-only training: expected to collapse (the paper: 4.07 vs 3.44 with real data mixed in)")
    tc = cfg.train
    real = windows(load_tokens(tc.data_dir, "train", tc.tokens), tc.context)
    # Without synthetic data (w = 0) no synthetic row is ever drawn: the real windows stand in for the source.
    syn = windows(synthetic.stream(), tc.context) if synthetic else real
    real_soft = syn_soft = None
    if cfg.blend:
        if teachers.annotations is not None:
            real_soft = teachers.annotations.windows(tc.data_dir, tc.context, len(real[0]))
        if synthetic is not None and synthetic.topk and w:
            syn_soft = synthetic.soft_targets().windows(tc.context, len(syn[0]))
        if real_soft is None and syn_soft is None:
            raise DistillError("--blend > 0 needs soft labels: --annotations, or synthetic data made with --topk")
    batches = MixtureBatches(real, syn, tc.batch_size, tc.epochs, w, tc.seed,
                             synthetic_only=cfg.recipe == "synthetic-only", real_soft=real_soft,
                             synthetic_soft=syn_soft)
    plan = batches.consumed()
    log.info("mixture: w=%.2f, %d steps (%d real windows x %d epochs / (1 - w) / batch %d); the draws give "
             "%d real + %d synthetic rows (synthetic share %.3f)", w, batches.steps, len(real[0]), tc.epochs,
             tc.batch_size, plan["real_rows"], plan["synthetic_rows"], plan["synthetic_fraction"])
    if synthetic is not None and plan["synthetic_passes"] > 1:
        log.warning("the teacher data (%d windows) is smaller than the student needs: it is repeated %.2f times",
                    len(syn[0]), plan["synthetic_passes"])
    elif synthetic is not None:
        log.info("the student uses %d of the %d synthetic windows (%.2f of one pass)", plan["synthetic_rows"],
                 len(syn[0]), plan["synthetic_passes"])
    mixture = {"recipe": cfg.recipe, "w": w, "teacher_sha256": teachers.sha256, "teacher_members": teachers.members,
               "synthetic_dir": str(Path(cfg.synthetic_dir).resolve()) if synthetic else None,
               "synthetic_manifest_sha256": synthetic.manifest_sha256 if synthetic else None,
               "synthetic_tokens": synthetic.tokens if synthetic else 0}
    step_loss = token_loss_on_device
    if cfg.soft_labels():  # part of the run's identity; absent for the sequence-level recipe (older runs unchanged)
        mixture["soft_labels"] = {**cfg.soft_labels(), "k": batches.k,
                                  "real": real_soft is not None, "synthetic": syn_soft is not None}
        step_loss = functools.partial(kd_token_loss, blend=cfg.blend, temperature=cfg.temperature)
        log.info("soft labels: loss = %.2f x CE + %.2f x KL(teacher top-%d || student) at temperature %g, on %s rows",
                 1 - cfg.blend, cfg.blend, batches.k, cfg.temperature,
                 " and ".join(n for n, x in (("real", real_soft), ("synthetic", syn_soft)) if x is not None))
    student = dataclasses.replace(tc, extra={**tc.extra, "distill": mixture})
    result = train_loop(student, run_dir, batches, validation_windows(tc.data_dir, tc.context), progress,
                        step_loss=step_loss)
    consumed = {**mixture, **plan, "synthetic_windows": len(syn[0]) if synthetic else 0, "real_windows": len(real[0])}
    if synthetic is None:
        consumed["synthetic_passes"] = 0.0
    atomic_write_json(RunDir(run_dir).mixture_file, consumed)
    log.info("student %s: val loss %.4f; consumed %d real rows (%.2f epochs) and %d synthetic rows (%.2f passes)",
             result["model_dir"], result["val_loss"], plan["real_rows"], plan["real_epochs"],
             plan["synthetic_rows"], consumed["synthetic_passes"])
    return {**result, "mixture": consumed}
