"""The soft-label loss (distill/kd.py) against independent computations, and its effect on a small fixed problem."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from distill.kd import bucket_kl, bucket_log_probs, kd_token_loss, teacher_buckets
from synthdata.soft_targets import SoftTargets, read_columns, tail_mass, topk_arrays

V = 48


def random_log_probs(*shape: int, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, V, generator=g) * scale, dim=-1)


def stored_topk(teacher: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a shard stores: top-k ids and log-probs (float32) and the tail mass (synthdata.soft_targets)."""
    top = teacher.topk(k, dim=-1)
    return top.indices, top.values, torch.from_numpy(tail_mass(top.values.numpy()))


def test_kl_with_the_whole_vocabulary_equals_the_full_kl():
    teacher, student = random_log_probs(4, 7, seed=1), random_log_probs(4, 7, seed=2)
    ids, lps, tail = stored_topk(teacher, V)
    ours = bucket_kl(teacher_buckets(lps, tail), bucket_log_probs(student, ids))
    full = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-6)
    # control: the teacher's columns of another position give another value
    wrong = bucket_kl(teacher_buckets(lps.roll(1, 1), tail.roll(1, 1)), bucket_log_probs(student, ids.roll(1, 1)))
    assert (wrong - full).abs().max() > 1e-2


@pytest.mark.parametrize("k", [1, 5, 20])
def test_tail_bucket_is_exact_for_the_bucketed_distributions(k):
    teacher, student = random_log_probs(3, 5, seed=3), random_log_probs(3, 5, seed=4)
    ids, lps, tail = stored_topk(teacher, k)
    ours = bucket_kl(teacher_buckets(lps, tail), bucket_log_probs(student, ids)).double()
    # independently, in float64: the two distributions over {k tokens, everything else}
    p, q = teacher.double().exp(), student.double().exp()
    p_top, q_top = p.gather(-1, ids), q.gather(-1, ids)
    p_b = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    expected = (p_b * (p_b.log() - q_b.log())).sum(-1)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert (expected - F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)).abs().max() > 1e-4 \
        or k == V, "the bucketed KL should differ from the full one when k < V (else this test shows nothing)"


def test_temperature_one_is_the_plain_kl_and_others_scale():
    teacher, student = random_log_probs(2, 3, seed=5), random_log_probs(2, 3, seed=6)
    ids, lps, tail = stored_topk(teacher, 8)
    t, s = teacher_buckets(lps, tail), bucket_log_probs(student, ids)
    torch.testing.assert_close(bucket_kl(t, s, 1.0), bucket_kl(t, s))
    soft = bucket_kl(t, s, 2.0)
    expected = 4 * (torch.softmax(t / 2, -1) * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum(-1)
    torch.testing.assert_close(soft, expected)


def test_stored_columns_round_trip_and_damage_is_named():
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, V, (n, 4)).astype(np.int32) for n in (3, 5)]
    lps = [np.sort(rng.normal(-3, 1, (n, 4)).astype(np.float32))[:, ::-1] for n in (3, 5)]
    import pyarrow as pa

    table = pa.table(topk_arrays(rows, lps, 4))
    got = read_columns(table, 4, np.array([3, 5]), "test")
    np.testing.assert_array_equal(got.ids, np.concatenate(rows))
    np.testing.assert_array_equal(got.logprobs, np.concatenate(lps))
    np.testing.assert_allclose(got.tail, tail_mass(np.concatenate(lps)))
    with pytest.raises(ValueError, match="rows disagree"):
        read_columns(table, 4, np.array([3, 4]), "test")
    with pytest.raises(ValueError, match="top-4"):
        read_columns(table, 8, np.array([3, 5]), "test")


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))


def full_kl(student: LlamaForCausalLM, teacher_lp: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        s = torch.log_softmax(student(input_ids=x).logits, -1)
    return float(F.kl_div(s, teacher_lp, log_target=True, reduction="none").sum(-1).mean())


def train_kd(x, y, soft: SoftTargets, steps: int = 80) -> LlamaForCausalLM:
    student = tiny_llama(1)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    arrays = [torch.from_numpy(a) for a in (soft.ids, soft.logprobs, soft.tail, soft.valid)]
    for _ in range(steps):
        loss, n = kd_token_loss(student, x, y, *arrays, blend=1.0)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
    return student


def test_a_student_trained_with_kd_moves_toward_the_teacher_and_shuffled_columns_do_not():
    teacher = tiny_llama(0)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(4.0)  # a sharp teacher, far from the student's near-uniform start
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (16, 16), generator=g)
    y = torch.randint(0, V, (16, 16), generator=g)  # CE weight is 0 (blend 1): the tokens do not matter
    with torch.no_grad():
        teacher_lp = torch.log_softmax(teacher(input_ids=x).logits, -1)
    ids, lps, tail = stored_topk(teacher_lp, 8)
    soft = SoftTargets(ids.int().numpy(), lps.numpy(), tail.numpy(), np.ones(x.shape, bool))
    before = full_kl(tiny_llama(1), teacher_lp, x)
    trained = full_kl(train_kd(x, y, soft), teacher_lp, x)
    shuffled = full_kl(train_kd(x, y, soft.rows(np.roll(np.arange(16), 1))), teacher_lp, x)
    assert trained < 0.5 * before, (before, trained)
    assert shuffled > 2 * trained, (before, trained, shuffled)
