"""The Python-loop baselines of bench.perf.serve_throughput decode what they claim to.

The static-batch loop left-pads requests of different lengths into one batch; padding, its attention mask and
position ids must change no request's tokens. Greedy decoding makes that checkable: each request's tokens
must equal those of the per-request loop, which serves it alone at batch size 1 with no padding. (What this
guards is the attention mask: RoPE attention depends only on relative positions, so position ids that
ignored the padding would shift a row uniformly and change nothing but rounding.)
"""
from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from bench.perf.serve_throughput import greedy, make_load, per_request_loop, static_batch_loop
from train.data import load_tokenizer


def test_static_batch_loop_matches_per_request_loop(tiny_members):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_members[0])
    members = [LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval() for d in tiny_members[:2]]
    load = make_load(tokenizer, requests=6, prompt_lens=(2, 24), new_tokens=(3, 16), seed=0)
    # The check only means something if the batch really is ragged on both sides.
    assert len({len(r.prompt) for r in load}) > 1 and len({r.max_tokens for r in load}) > 1
    assert all(r.prompt[0] == tokenizer.bos_token_id for r in load)
    assert not set(tokenizer.all_special_ids) & {t for r in load for t in r.prompt[1:]}

    alone = per_request_loop(members, load, greedy)
    batched = static_batch_loop(members, load, tokenizer.pad_token_id, greedy)

    assert [len(tokens) for tokens in alone] == [r.max_tokens for r in load]
    assert batched == alone
