"""Validation loss: mean next-token cross-entropy (nats/token) on a dataset's fixed validation tokens.

One code path for every kind of model: a member directory, a student directory, a packed ensemble
directory, or several member directories combined on the fly. All are opened as serve's
`ReferenceEnsemble` (a plain model directory is an ensemble of one), which runs the K members in one
batched (vmapped) pass and returns normalized next-token log-probabilities under either combine rule:
"logits" (softmax of the mean logit, the paper's ensemble) or "probs" (the mixture).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from serve.reference import ReferenceEnsemble
from train.data import IGNORE_INDEX, load_tokens, read_manifest, tokenizer_hash, windows
from plumbing.console import ChorusError

log = logging.getLogger(__name__)


class EvalError(ChorusError):
    """A model and a dataset (or task) that cannot be evaluated together, named."""


class LogProbModel(Protocol):
    """What scoring needs of a model: its config (for the context length) and next-token log-probs."""

    config: object

    def log_probs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """LongTensor[B, T] -> normalized next-token log-probabilities FloatTensor[B, T, V]."""
        ...


def load_model(model_dirs: Sequence[str | Path], combine: str | None = None) -> ReferenceEnsemble:
    """One directory (member, student or packed ensemble), or several members combined by `combine`."""
    dirs = [Path(d) for d in model_dirs]
    if not dirs:
        raise EvalError("no model directory given")
    for d in dirs:
        if not (d / "config.json").exists():
            raise EvalError(f"{d} is not a model directory (no config.json)")
    if len(dirs) == 1:
        return ReferenceEnsemble.from_dir(dirs[0], combine)
    return ReferenceEnsemble.from_members(dirs, combine or "logits")


def context_length(model: LogProbModel) -> int:
    return int(model.config.max_position_embeddings)


def check_tokenizer(model_dir: str | Path, data_dir: str | Path) -> None:
    """Refuse a model whose tokenizer is not the dataset's: its losses would be on other tokens."""
    manifest = read_manifest(data_dir)
    tok = Path(model_dir) / "tokenizer.json"
    if not tok.exists():
        log.warning("%s has no tokenizer.json: cannot check it matches the dataset's tokenizer", model_dir)
        return
    if tokenizer_hash(model_dir) != manifest["tokenizer_sha256"]:
        raise EvalError(f"{model_dir} was trained with another tokenizer than the dataset {data_dir} "
                        "(tokenizer.json sha256 differs): its loss on these tokens means nothing")


@torch.no_grad()
def mean_token_loss(model: LogProbModel, inputs: np.ndarray, targets: np.ndarray, batch_size: int = 64,
                    progress: bool = True) -> tuple[float, int]:
    """Mean next-token cross-entropy over the windows' non-ignored targets, and the number of targets."""
    total, count = 0.0, 0
    for i in tqdm(range(0, len(inputs), batch_size), desc="validation loss", unit="batch", disable=not progress,
                  leave=False):
        x = torch.from_numpy(inputs[i : i + batch_size])
        y = torch.from_numpy(targets[i : i + batch_size])
        mask = y != IGNORE_INDEX
        picked = model.log_probs(x).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total -= float(picked[mask].double().sum())
        count += int(mask.sum())
    if count == 0:
        raise EvalError("no validation targets to evaluate")
    return total / count, count


def validation_loss(model_dirs: Sequence[str | Path], data_dir: str | Path, combine: str | None = None,
                    batch_size: int = 64, context: int | None = None, progress: bool = True) -> dict:
    """The validation loss of a member, student or ensemble on `data_dir`'s fixed validation tokens."""
    model_dirs = [Path(d) for d in model_dirs]
    for d in model_dirs:
        check_tokenizer(d, data_dir)
    model = load_model(model_dirs, combine)
    context = context or context_length(model)
    if context > context_length(model):
        raise EvalError(f"context {context} exceeds the model's {context_length(model)} positions")
    inputs, targets = windows(load_tokens(data_dir, "val"), context)
    loss, tokens = mean_token_loss(model, inputs, targets, batch_size, progress)
    record = {"loss": loss, "tokens": tokens, "context": context, "members": model.k, "combine": model.combine,
              "model": [str(d) for d in model_dirs], "data_dir": str(data_dir)}
    log.info("validation loss %.4f nats/token over %d tokens (%d member(s), combine %s)", loss, tokens, model.k,
             model.combine)
    return record
