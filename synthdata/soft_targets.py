"""Teacher soft targets: the one owner of their format (synthetic shards with --topk, real-data annotations).

At a position j of a token sequence, the teacher's distribution of the NEXT token (given tokens 0..j) is kept as
its k most likely token ids, their log-probabilities (descending) and the probability mass they leave out, the
tail. A KD loss then compares k + 1 buckets: the k tokens and "everything else" (distill/kd.py). Parquet columns,
one entry per position, beside `tokens`:

    topk_ids       list<fixed_size_list<int32, k>>
    topk_logprobs  list<fixed_size_list<float32, k>>
    topk_tail      list<float32>        1 - sum(exp(topk_logprobs)), computed in float64, clipped to [0, 1]

A synthetic row of L tokens has L - 1 entries (the distributions that produced tokens 1 .. L-1; nothing follows
its last token); an annotation window of T input tokens has T (one per target of train.data.windows).

The distribution is the teacher's own at temperature 1 with no top-p: the logit average for a packed ensemble, the
member itself for a single member (mixture mode: the member that drew the sequence), whatever the sampling
settings were. It is what a student should learn; sampling settings only choose which sequences it sees.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from plumbing.console import ChorusError

COLUMNS = ("topk_ids", "topk_logprobs", "topk_tail")
METHOD = ("vLLM prompt_logprobs (flat) over the finished sequence through the teacher's engine: one prefill "
          "pass, temperature 1, no top-p")


class SoftTargetError(ChorusError):
    """Top-k columns that are missing, of another k, or not aligned with their tokens."""


def tail_mass(logprobs: np.ndarray) -> np.ndarray:
    """1 - the top-k mass at each position ([..., k] log-probs -> [...]), in float64, clipped to [0, 1]."""
    return np.clip(1.0 - np.exp(logprobs.astype(np.float64)).sum(-1), 0.0, 1.0).astype(np.float32)


def topk_arrays(ids: list[np.ndarray], logprobs: list[np.ndarray], k: int) -> dict[str, pa.Array]:
    """The three columns for rows whose top-k are given as [n_i, k] arrays (n_i entries in row i)."""
    offsets = pa.array(np.concatenate([[0], np.cumsum([len(a) for a in ids])]).astype(np.int32))
    flat_ids = np.concatenate([a.reshape(-1, k) for a in ids]).astype(np.int32) if ids else np.zeros((0, k), np.int32)
    flat_lps = (np.concatenate([a.reshape(-1, k) for a in logprobs]).astype(np.float32) if logprobs
                else np.zeros((0, k), np.float32))
    return {
        "topk_ids": pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(flat_ids.reshape(-1), k)),
        "topk_logprobs": pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(flat_lps.reshape(-1), k)),
        "topk_tail": pa.ListArray.from_arrays(offsets, pa.array(tail_mass(flat_lps))),
    }


@dataclass
class SoftTargets:
    """Soft targets aligned with the positions of a token stream: position p holds the teacher's distribution of
    token p + 1 where `valid[p]` (a position with none, e.g. the last token of a synthetic row, has CE only)."""

    ids: np.ndarray  # [P, k] int32
    logprobs: np.ndarray  # [P, k] float32
    tail: np.ndarray  # [P] float32
    valid: np.ndarray  # [P] bool

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def __len__(self) -> int:
        return len(self.valid)

    @classmethod
    def empty(cls, positions: int, k: int) -> "SoftTargets":
        return cls(np.zeros((positions, k), np.int32), np.zeros((positions, k), np.float32),
                   np.zeros(positions, np.float32), np.zeros(positions, bool))

    @classmethod
    def concat(cls, parts: list["SoftTargets"]) -> "SoftTargets":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "logprobs", "tail", "valid")))

    def truncate(self, positions: int) -> "SoftTargets":
        return SoftTargets(self.ids[:positions], self.logprobs[:positions], self.tail[:positions],
                           self.valid[:positions])

    def windows(self, context: int, n_windows: int) -> "SoftTargets":
        """Cut like train.data.windows' inputs: window i is positions i*context .. i*context + context - 1, padded
        (invalid) past the end. Result arrays are [n_windows, context, ...]."""
        n = n_windows * context
        pad = n - len(self)
        if pad < 0:
            src = self.truncate(n)
        else:
            src = SoftTargets.concat([self, SoftTargets.empty(pad, self.k)]) if pad else self
        return SoftTargets(src.ids.reshape(n_windows, context, -1), src.logprobs.reshape(n_windows, context, -1),
                           src.tail.reshape(n_windows, context), src.valid.reshape(n_windows, context))

    def rows(self, idx: np.ndarray) -> "SoftTargets":
        return SoftTargets(self.ids[idx], self.logprobs[idx], self.tail[idx], self.valid[idx])


def read_columns(table: pa.Table, k: int, entries: np.ndarray, where: str) -> SoftTargets:
    """The top-k columns of `table` as flat [sum(entries), k] arrays, after checking that row i has entries[i]
    positions of k each (a shard whose columns disagree with its tokens is named, not used)."""
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise SoftTargetError(f"{where} has no teacher top-k columns ({', '.join(missing)} missing): made without "
                              "--topk")
    arrays = {}
    for name in COLUMNS:
        column = table.column(name).combine_chunks()
        lengths = np.diff(column.offsets.to_numpy())
        if len(lengths) != len(entries) or not np.array_equal(lengths, entries):
            raise SoftTargetError(f"{where}: column {name} has {lengths.sum()} positions where the tokens need "
                                  f"{int(entries.sum())} (rows disagree): the file is damaged")
        values = column.flatten()
        if name != "topk_tail":
            if values.type.list_size != k:
                raise SoftTargetError(f"{where}: column {name} holds top-{values.type.list_size}, the manifest says "
                                      f"k = {k}")
            values = values.flatten()
        arrays[name] = values.to_numpy(zero_copy_only=False)
    total = int(entries.sum())
    return SoftTargets(arrays["topk_ids"].reshape(total, k).astype(np.int32),
                       arrays["topk_logprobs"].reshape(total, k).astype(np.float32),
                       arrays["topk_tail"].astype(np.float32), np.ones(total, bool))
