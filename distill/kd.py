"""The soft-label student loss: cross-entropy on the stored tokens blended with the KL divergence from the
teacher's top-k distribution (synthdata/soft_targets.py).

The teacher's distribution at a position is known as k + 1 buckets: its k most likely tokens and the tail (all
other tokens as one). The student's distribution is bucketed the same way (its probability of each of the k
tokens, and of everything else), and

    KL(teacher || student) = sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)

which is the exact KL between the two bucketed distributions, and equals the full-vocabulary KL when k = V. With
a temperature tau both bucketed distributions are softened (log-probs / tau, renormalized over the buckets; the
tail is softened as one bucket, so for tau != 1 this is the KL of softened buckets, not of softened full
distributions) and the KL is scaled by tau^2 (Hinton et al.) so its gradients keep their size.

Per target: loss = (1 - blend) x CE + blend x KL where the position has a teacher distribution, CE alone where it
has none (the last token of a synthetic row, rows without annotations). blend = 0 is the paper's sequence-level
recipe (CE on sampled tokens); blend = 1 is pure KD.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from train.data import IGNORE_INDEX

TINY = 1e-30  # the student's tail when the k tokens hold (up to rounding) everything, e.g. k = V: log stays finite
TAIL_FLOOR = 1e-6


def bucket_log_probs(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Full log-probs [..., V] -> bucketed [..., k + 1]: the k given tokens, then the rest as one bucket.

    The rest is 1 - (the k probabilities), summed in float64: O(k) per position, where a logsumexp over the other
    V - k entries would copy the whole [..., V] tensor once more (memory traffic the size of the logits)."""
    top = log_probs.gather(-1, ids.long())
    rest = (1 - top.double().exp().sum(-1, keepdim=True)).clamp_min(TINY).log().to(top.dtype)
    return torch.cat([top, rest], dim=-1)


def teacher_buckets(logprobs: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """The teacher's stored top-k log-probs [..., k] and tail mass [...] -> bucketed log-probs [..., k + 1].

    A tail under TAIL_FLOOR is 0: it is 1 - (a sum of float32 probabilities), so rounding alone leaves ~1e-7 where
    the top-k hold everything, and against a student whose tail is truly empty (k = V) that noise would dominate."""
    tail = torch.where(tail >= TAIL_FLOOR, tail.float(), torch.zeros_like(tail, dtype=torch.float32))
    return torch.cat([logprobs.float(), tail.log().unsqueeze(-1)], dim=-1)


def bucket_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per position from bucketed log-probs [..., k + 1] (0 log 0 = 0), x tau^2."""
    if temperature != 1.0:
        teacher = torch.log_softmax(teacher / temperature, dim=-1)
        student = torch.log_softmax(student / temperature, dim=-1)
    p = teacher.exp()
    terms = torch.where(p > 0, p * (teacher - student), torch.zeros_like(p))
    return terms.sum(-1) * temperature ** 2


def kd_token_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, soft_ids: torch.Tensor,
                  soft_logprobs: torch.Tensor, soft_tail: torch.Tensor, soft_valid: torch.Tensor, blend: float,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over non-ignored targets of the blended loss, and their count (train.trainer's loss signature)."""
    logits = model(input_ids=inputs).logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    counted = targets != IGNORE_INDEX
    ce = F.nll_loss(log_probs.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                    reduction="none").view_as(targets)
    has_soft = soft_valid & counted
    kl = bucket_kl(teacher_buckets(soft_logprobs, soft_tail), bucket_log_probs(log_probs, soft_ids), temperature)
    per_target = torch.where(has_soft, (1 - blend) * ce + blend * kl, ce)
    return per_target.masked_fill(~counted, 0.0).sum(), counted.sum()
