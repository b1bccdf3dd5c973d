"""The Python-loop baselines of bench.perf.serve_throughput decode what they claim to.

The static-batch loop left-pads requests of different lengths into one batch; padding, its attention mask and
position ids must change no request's tokens. Greedy decoding makes that checkable: each request's tokens
must equal those of the per-request loop, which serves it alone at batch size 1 with no padding. (What this
guards is the attention mask: RoPE attention depends only on relative positions, so position ids that
ignored the padding would shift a row uniformly and change nothing but rounding.)

The sequential engine the benchmark measures beside the fused one (bench/perf/sequential_engine.py) is registered
by its own vLLM plugin, in the engine's processes too, when the benchmark's switch is set; one engine start on a
K=2 pack checks that it loads and serves the ensemble (prompt log-probabilities equal the reference's).
"""
from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from bench.perf.sequential_engine import SEQUENTIAL_ARCHITECTURE, SEQUENTIAL_ENV, register
from bench.perf.serve_throughput import greedy, make_load, per_request_loop, sequential_copy, static_batch_loop
from serve.engine import offline_engine, prompt_logprobs
from serve.pack import read_config
from serve.reference import ReferenceEnsemble
from train.data import load_tokenizer, load_tokens


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


def test_sequential_engine_serves_the_ensemble(tiny_ensemble, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(SEQUENTIAL_ENV, "1")  # what measure() sets; the engine's processes inherit it
    register()  # this process may have loaded vLLM's plugins before the switch was set
    model_dir = sequential_copy(tiny_ensemble, tmp_path / "sequential-k2")
    assert read_config(model_dir)["architectures"] == [SEQUENTIAL_ARCHITECTURE]
    stream = load_tokens(tiny_dataset, "val")
    ids = torch.stack([torch.as_tensor(stream[i * 128: i * 128 + 64]) for i in range(3)]).long()

    with offline_engine(model_dir, max_model_len=128, kv_cache_bytes=256 << 20) as llm:
        served = torch.tensor(prompt_logprobs(llm, ids.tolist()))

    expected = ReferenceEnsemble.from_dir(tiny_ensemble).log_probs(ids)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    assert (served - expected).abs().max().item() <= 1e-4
