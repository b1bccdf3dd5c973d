"""Student pre-training on real + synthetic tokens, through train/'s loop (optimizer, checkpoints, metrics).

Recipes (the paper's distillation experiments):
    ensemble        teacher = a K >= 2 member ensemble, student one member-sized (or smaller) model; w = 0.75
    self            teacher = one member, student the same size; w = 0.75
    synthetic-only  every row synthetic, for the same number of steps as weight w: the ablation that is
                    expected to collapse (it warns)

The mixture is part of the run's identity (TrainConfig.extra): teacher hash, synthetic manifest hash, w,
recipe. After training, OUT/mixture.json records what the student actually consumed.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from distill.mixture import MixtureBatches
from synthdata.loader import TokenShards
from train.artifacts import atomic_write_json
from train.data import DataError, load_tokens, read_manifest, windows
from train.trainer import TrainConfig, train_loop, validation_windows

log = logging.getLogger(__name__)

RECIPES = {"ensemble": 0.75, "self": 0.75, "synthetic-only": 0.5}  # recipe -> default w


class DistillError(ValueError):
    """Inputs that cannot make a student: found before any training starts."""


@dataclass(frozen=True)
class DistillConfig:
    train: TrainConfig  # the student: data_dir is the real data, epochs are passes over its `tokens`
    synthetic_dir: str
    recipe: str = "ensemble"
    w: float | None = None  # default: the recipe's


def check_inputs(cfg: DistillConfig) -> tuple[TokenShards, float]:
    """The synthetic shards and the weight w, after every check that can fail before training."""
    if cfg.recipe not in RECIPES:
        raise DistillError(f"unknown recipe {cfg.recipe!r}; choose one of {', '.join(RECIPES)}")
    w = RECIPES[cfg.recipe] if cfg.w is None else cfg.w
    if not 0 <= w < 1:
        raise DistillError(f"synthetic weight w must be in [0, 1) (got {w}); "
                           "for training on synthetic tokens only use --recipe synthetic-only")
    try:
        dataset = read_manifest(cfg.train.data_dir)
    except DataError as e:
        raise DistillError(f"real data: {e}") from None
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
    if cfg.recipe == "ensemble" and synthetic.teacher_members < 2:
        raise DistillError(f"recipe 'ensemble' needs an ensemble teacher; {cfg.synthetic_dir} was sampled from "
                           "a single member (use --recipe self)")
    if cfg.recipe == "self" and synthetic.teacher_members != 1:
        raise DistillError(f"recipe 'self' needs a single-member teacher; {cfg.synthetic_dir} was sampled from "
                           f"a {synthetic.teacher_members}-member ensemble (use --recipe ensemble)")
    return synthetic, w


def distill(cfg: DistillConfig, run_dir: str | Path, progress: bool = True) -> dict:
    """Train the student in run_dir (resumable); return train/'s result with the mixture consumed."""
    synthetic, w = check_inputs(cfg)
    if cfg.recipe == "synthetic-only":
        log.warning("synthetic-only training: expected to collapse (the paper: 4.07 vs 3.44 with real data mixed in)")
    tc = cfg.train
    real = windows(load_tokens(tc.data_dir, "train", tc.tokens), tc.context)
    syn = windows(synthetic.stream(), tc.context)
    batches = MixtureBatches(real, syn, tc.batch_size, tc.epochs, w, tc.seed,
                             synthetic_only=cfg.recipe == "synthetic-only")
    plan = batches.consumed()
    log.info("mixture: w=%.2f, %d steps (%d real windows x %d epochs / (1 - w) / batch %d); the draws give "
             "%d real + %d synthetic rows (synthetic share %.3f)", w, batches.steps, len(real[0]), tc.epochs,
             tc.batch_size, plan["real_rows"], plan["synthetic_rows"], plan["synthetic_fraction"])
    if plan["synthetic_passes"] > 1:
        log.warning("the teacher data (%d windows) is smaller than the student needs: it is repeated %.2f times",
                    len(syn[0]), plan["synthetic_passes"])
    else:
        log.info("the student uses %d of the %d synthetic windows (%.2f of one pass)", plan["synthetic_rows"],
                 len(syn[0]), plan["synthetic_passes"])
    mixture = {"recipe": cfg.recipe, "w": w, "teacher_sha256": synthetic.teacher_sha256,
               "teacher_members": synthetic.teacher_members, "synthetic_dir": str(Path(cfg.synthetic_dir).resolve()),
               "synthetic_manifest_sha256": synthetic.manifest_sha256, "synthetic_tokens": synthetic.tokens}
    student = dataclasses.replace(tc, extra={**tc.extra, "distill": mixture})
    result = train_loop(student, run_dir, batches, validation_windows(tc.data_dir, tc.context), progress)
    consumed = {**mixture, **plan, "synthetic_windows": len(syn[0]), "real_windows": len(real[0])}
    path = Path(run_dir) / "mixture.json"
    atomic_write_json(path, consumed)
    log.info("student %s: val loss %.4f; consumed %d real rows (%.2f epochs) and %d synthetic rows (%.2f passes)",
             result["model_dir"], result["val_loss"], plan["real_rows"], plan["real_epochs"],
             plan["synthetic_rows"], plan["synthetic_passes"])
    return {**result, "mixture": consumed}
