"""Zero-shot downstream accuracy: multiple choice by log-likelihood, and LAMBADA by greedy match.

Conventions are lm-evaluation-harness's (0.4.x, its HF model with add_bos_token=True, which is how
Chorus models were trained: every document starts with BOS), so the numbers agree item for item:
- a request is (context, continuation) with continuation = target_delimiter + choice, delimiter " "
  unless the item says otherwise ("target_delimiter" key);
- trailing whitespace of the context moves to the front of the continuation; the continuation's
  tokens are those of encode(context + continuation) after the tokens of encode(context);
- contexts too long for the model are cut from the left: the input is the last max_length + 1
  tokens of context + continuation, minus the last;
- acc = argmax of the summed log-likelihood; acc_norm = argmax of it divided by the choice's
  length in characters; LAMBADA acc = the continuation is the greedy (argmax) continuation.

Task files are JSON lines (../shared/data/README.md): {"query", "choices", "gold"} for multiple choice,
{"context", "continuation"} for LAMBADA-style cloze. Any file in either format is a task.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from serve.evaluation import EvalError, LogProbModel, context_length, load_model
from plumbing.artifacts import read_json_lines
from train.data import load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_DELIMITER = " "


@dataclass(frozen=True)
class MultipleChoiceItem:
    query: str
    choices: tuple[str, ...]
    gold: int
    target_delimiter: str = DEFAULT_DELIMITER


@dataclass(frozen=True)
class ClozeItem:
    context: str
    continuation: str
    target_delimiter: str = DEFAULT_DELIMITER


def read_task(path: str | Path, limit: int | None = None) -> list[MultipleChoiceItem] | list[ClozeItem]:
    """The items of a task file (the first `limit`), all of one format; a bad line is named."""
    path = Path(path)
    items: list = []
    for where, record in read_json_lines(path, EvalError):
        if limit is not None and len(items) >= limit:
            break
        items.append(_parse_item(record, where))
    if not items:
        raise EvalError(f"task file {path} holds no items")
    if len({type(i) for i in items}) > 1:
        raise EvalError(f"{path} mixes multiple-choice and cloze items")
    return items


def _parse_item(record: dict, where: str) -> MultipleChoiceItem | ClozeItem:
    delimiter = record.get("target_delimiter", DEFAULT_DELIMITER)
    if {"query", "choices", "gold"} <= record.keys():
        choices = record["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise EvalError(f"{where}: 'choices' must be a list of at least two strings")
        gold = record["gold"]
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise EvalError(f"{where}: 'gold' must be an index into the {len(choices)} choices (got {gold!r})")
        return MultipleChoiceItem(record["query"], tuple(choices), gold, delimiter)
    if {"context", "continuation"} <= record.keys():
        if not record["continuation"]:
            raise EvalError(f"{where}: empty 'continuation'")
        return ClozeItem(record["context"], record["continuation"], delimiter)
    raise EvalError(f"{where}: expected keys query/choices/gold (multiple choice) or context/continuation "
                    f"(cloze); got {sorted(record)}")


# ---- scoring (context, continuation) requests ---------------------------------------------------

def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split the way lm-evaluation-harness splits them."""
    if not context:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [bos], tokenizer.encode(continuation, add_special_tokens=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # "a word ends where a space starts": keep the space with the word that follows it
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=add_bos)
    context_ids = tokenizer.encode(context, add_special_tokens=add_bos)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def score_requests(model: LogProbModel, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 64,
                   add_bos: bool = True, progress: bool = True) -> list[tuple[float, bool]]:
    """(sum of log-probs of the continuation, whether it is the greedy continuation) per request.

    Contexts are cut from the left to fit the window; a continuation longer than the window scores NaN.
    """
    max_length = context_length(model)
    encoded = [encode_pair(tokenizer, c, x, add_bos) for c, x in requests]
    for (context, continuation), (_, cont) in zip(requests, encoded):
        if not cont:
            raise EvalError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
    # A continuation longer than the model's window cannot be scored whole (lm-eval stops there): such a
    # request scores NaN and its item is left out by the caller, counted as skipped.
    scorable = [i for i, (_, cont) in enumerate(encoded) if len(cont) <= max_length]
    # Longest first: batches of similar length waste little padding.
    order = sorted(scorable, key=lambda i: -len(encoded[i][0]) - len(encoded[i][1]))
    results: list[tuple[float, bool]] = [(math.nan, False)] * len(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", disable=not progress,
                      leave=False):
        chunk = order[start : start + batch_size]
        inputs = [(encoded[i][0] + encoded[i][1])[-(max_length + 1):][:-1] for i in chunk]
        width = max(len(x) for x in inputs)
        # Right padding: under causal attention, pads after a sequence cannot change its log-probs.
        batch = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, x in enumerate(inputs):
            batch[row, : len(x)] = torch.tensor(x)
        log_probs = model.log_probs(batch)
        for row, i in enumerate(chunk):
            cont = torch.tensor(encoded[i][1])
            end = len(inputs[row])
            scores = log_probs[row, end - len(cont) : end]
            logprob = float(scores.gather(-1, cont.unsqueeze(-1)).double().sum())
            results[i] = (logprob, bool((scores.argmax(-1) == cont).all()))
    return results


# ---- tasks --------------------------------------------------------------------------------------

def evaluate_items(model: LogProbModel, tokenizer, items: list, batch_size: int = 64, add_bos: bool = True,
                   progress: bool = True) -> dict:
    """Accuracy on one task's items: acc and acc_norm (multiple choice) or acc and perplexity (cloze).

    Items with a continuation longer than the model's window are left out and counted in "skipped".
    """
    cloze = isinstance(items[0], ClozeItem)
    if cloze:
        requests = [[(i.context, i.target_delimiter + i.continuation)] for i in items]
    else:
        requests = [[(i.query, i.target_delimiter + c) for c in i.choices] for i in items]
    flat = score_requests(model, tokenizer, [r for item in requests for r in item], batch_size, add_bos, progress)
    scored, start = [], 0
    for item, item_requests in zip(items, requests):
        scores = flat[start : start + len(item_requests)]
        start += len(item_requests)
        if all(math.isfinite(lp) for lp, _ in scores):
            scored.append((item, scores))
    skipped = len(items) - len(scored)
    if skipped:
        log.warning("%d of %d items left out: a continuation is longer than the model's %d positions",
                    skipped, len(items), context_length(model))
    if not scored:
        raise EvalError(f"none of the {len(items)} items fits the model's {context_length(model)} positions")
    if cloze:
        greedy = np.array([scores[0][1] for _, scores in scored], dtype=float)
        return {"items": len(scored), "skipped": skipped, "acc": float(greedy.mean()), "acc_stderr": _stderr(greedy),
                "perplexity": math.exp(-np.mean([scores[0][0] for _, scores in scored]))}
    correct, correct_norm = [], []
    for item, scores in scored:
        lls = np.array([lp for lp, _ in scores])
        lengths = np.array([float(len(c)) for c in item.choices])
        correct.append(float(np.argmax(lls) == item.gold))
        correct_norm.append(float(np.argmax(lls / lengths) == item.gold))
    correct, correct_norm = np.array(correct), np.array(correct_norm)
    return {"items": len(scored), "skipped": skipped, "acc": float(correct.mean()), "acc_stderr": _stderr(correct),
            "acc_norm": float(correct_norm.mean()), "acc_norm_stderr": _stderr(correct_norm)}


def _stderr(outcomes: np.ndarray) -> float:
    """Standard error of a mean of 0/1 outcomes (sample standard deviation, as lm-eval reports)."""
    return float(outcomes.std(ddof=1) / math.sqrt(len(outcomes))) if len(outcomes) > 1 else math.nan


def evaluate_downstream(model_dirs: Sequence[str | Path], task_files: Sequence[str | Path],
                        combine: str | None = None, limit: int | None = None, batch_size: int = 64,
                        add_bos: bool = True, progress: bool = True) -> dict[str, dict]:
    """Zero-shot accuracy of a member, student or ensemble on each task file, keyed by the file's stem."""
    tasks = {Path(t).stem: read_task(t, limit) for t in task_files}  # read all first: a bad file fails fast
    if len(tasks) != len(task_files):
        raise EvalError("two task files share a name; rename one")
    model = load_model(model_dirs, combine)
    tokenizer = load_tokenizer(model_dirs[0])
    results = {}
    for name, items in tasks.items():
        results[name] = evaluate_items(model, tokenizer, items, batch_size, add_bos, progress)
        log.info("%s: %s", name, ", ".join(f"{k} {v:.4g}" for k, v in results[name].items()))
    return results
