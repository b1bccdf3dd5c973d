"""The fused vLLM ensemble engine (serve/ensemble_model.py) against the PyTorch reference (serve/reference.py).

Default run: the head layout on paper (GQA grouping stays member-local), and one engine start on K=3 members
with grouped-query attention (4 query heads, 2 KV heads): prompt log-probabilities within 1e-4 of the reference
and the same greedy continuations. Slow run: K in {1, 2, 3, 4} x both combine rules on trained members, K=1
against the member served alone, and GQA under the `probs` rule. Every comparison carries negative controls:
the same reference with one weight perturbed, with two members' layer-0 attention swapped (the member-axis
mix-up a wrong head layout would make), and with the other combine rule, must differ from the engine by far more
than the tolerance. The HTTP log-prob test's looser tolerance (1e-3, tests/serve/test_app.py) is shown here to
tell the two combine rules apart on its own rows.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from transformers import LlamaForCausalLM

from serve.engine import offline_engine, prompt_logprobs
from serve.pack import member_state_dicts, pack_ensemble, read_config
from serve.reference import ReferenceEnsemble, member_config
from train.data import load_tokens, read_manifest
from train.model import Shape, llama_config

TOLERANCE = 1e-4  # fp32 end to end
NEW_TOKENS = 12  # greedy continuation length
OTHER_RULE = {"logits": "probs", "probs": "logits"}
HTTP_TOLERANCE = 1e-3  # tests/serve/test_app.py::test_prompt_logprobs_equal_reference


@pytest.fixture(scope="module")
def rows(tiny_dataset) -> list[list[int]]:
    """Four rows of validation text (the generated corpus), 120 tokens each (the members' context is 128)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    stream = load_tokens(tiny_dataset, "val")
    return [stream[i * 128 : i * 128 + 120].tolist() for i in range(4)]


def scores(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from next-token log-probabilities [B, T, V]."""
    return log_probs[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


def reference_greedy(reference: ReferenceEnsemble, prompts: list[list[int]], steps: int) -> list[list[int]]:
    ids = torch.tensor(prompts)
    for _ in range(steps):
        ids = torch.cat([ids, reference.log_probs(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, len(prompts[0]):].tolist()


def engine_run(model_dir, rows: list[list[int]], prompts: list[list[int]]) -> tuple[torch.Tensor, list[list[int]]]:
    """Prompt log-probabilities of `rows` and greedy continuations of `prompts`, from one engine start."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with offline_engine(model_dir, max_model_len=128, kv_cache_bytes=256 << 20) as llm:
        logprobs = torch.tensor(prompt_logprobs(llm, rows))
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    return logprobs, [list(o.outputs[0].token_ids) for o in outs]


def variant(model_dir, combine: str, edit) -> ReferenceEnsemble:
    """The reference of `model_dir` with its members' state dicts changed by `edit(states)` (a negative control)."""
    states = member_state_dicts(model_dir)
    edit(states)
    members = []
    for state in states:
        model = LlamaForCausalLM(member_config(read_config(model_dir)))
        model.load_state_dict(state)
        members.append(model)
    return ReferenceEnsemble(members, combine)


def perturb_one_weight(states) -> None:
    states[-1]["model.layers.0.self_attn.q_proj.weight"][0, 0] += 2.0


def swap_layer0_attention(states) -> None:
    for proj in "qkvo":
        name = f"model.layers.0.self_attn.{proj}_proj.weight"
        states[0][name], states[1][name] = states[1][name], states[0][name]


def check_engine_against_reference(packed, rows, combine: str) -> dict:
    ids = torch.tensor(rows)
    prompts = [r[:16] for r in rows]
    engine, engine_greedy = engine_run(packed, rows, prompts)
    reference = ReferenceEnsemble.from_dir(packed)
    diff = (engine - scores(reference.log_probs(ids), ids)).abs().max().item()
    controls = {"one weight perturbed": perturb_one_weight}
    if reference.k > 1:
        controls["members' layer-0 attention swapped"] = swap_layer0_attention
    control_diffs = {name: (engine - scores(variant(packed, combine, edit).log_probs(ids), ids)).abs().max().item()
                     for name, edit in controls.items()}
    if reference.k > 1:  # the other combine rule: the engine must be told apart from it too
        other = ReferenceEnsemble.from_dir(packed, combine=OTHER_RULE[combine])
        control_diffs[f"the {OTHER_RULE[combine]} rule"] = (engine - scores(other.log_probs(ids), ids)).abs().max().item()
    print(f"K={reference.k} {combine}: engine vs reference max abs diff {diff:.2e}; negative controls "
          + ", ".join(f"{n} {d:.2e}" for n, d in control_diffs.items()))
    assert diff <= TOLERANCE
    for name, d in control_diffs.items():
        assert d > 10 * TOLERANCE, f"negative control '{name}' moved the result by only {d:.2e}"
    assert engine_greedy == reference_greedy(reference, prompts, NEW_TOKENS)
    return {"diff": diff, "controls": control_diffs}


def test_gqa_head_layout_is_member_local():
    """On paper: vLLM's attention maps query head h to KV head h // (num_heads // num_kv_heads). With member k's
    heads in one block ([member 0's heads..., member 1's heads...]) every query head reads a KV head of its own
    member; the head-interleaved layout (head i of every member side by side) would not."""
    def kv_head(h: int, heads: int, kv_heads: int) -> int:
        return h // (heads // kv_heads)

    for k, heads, kv_heads in [(1, 4, 2), (2, 4, 2), (3, 4, 1), (4, 16, 8), (8, 8, 8)]:
        member_blocks = all(kv_head(m * heads + i, k * heads, k * kv_heads) // kv_heads == m
                            for m in range(k) for i in range(heads))
        assert member_blocks
        interleaved = all(kv_head(i * k + m, k * heads, k * kv_heads) % k == m for m in range(k) for i in range(heads))
        assert interleaved == (k == 1 or kv_heads == heads), (k, heads, kv_heads)  # the control fails under GQA


def gqa_members(tiny_dataset, root, n: int) -> list:
    """`n` untrained members with grouped-query attention (4 query heads of size 32, 2 KV heads) on the tiny
    dataset's tokenizer. Initialised with std 0.1 so that their next-token distributions are far from uniform."""
    manifest = read_manifest(tiny_dataset)
    config = llama_config(Shape(hidden=128, mlp=256, heads=4, kv_heads=2, layers=2), manifest["vocab_size"], 128,
                          manifest["bos_token_id"], manifest["eos_token_id"])
    config.initializer_range = 0.1
    dirs = []
    for seed in range(n):
        torch.manual_seed(seed)
        out = root / f"gqa-{seed}"
        LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
        shutil.copytree(tiny_dataset / "tokenizer", out, dirs_exist_ok=True)
        dirs.append(out)
    return dirs


def test_fused_engine_with_gqa_members_equals_reference(tiny_dataset, rows, tmp_path):
    packed = pack_ensemble(gqa_members(tiny_dataset, tmp_path, 3), tmp_path / "gqa-k3", combine="logits")
    assert read_config(packed)["num_key_value_heads"] < read_config(packed)["num_attention_heads"]
    check_engine_against_reference(packed, rows, "logits")


@pytest.fixture(scope="module")
def four_members(tiny_members, tiny_dataset, tmp_path_factory) -> list:
    """The three tiny members and a fourth trained the same way (seed 3), for K=4."""
    from train.trainer import TrainConfig, train_member

    cfg = TrainConfig(data_dir=str(tiny_dataset), preset="cpu-xs", tokens=40_000, epochs=2, lr=3e-3,
                      weight_decay=0.4, seed=3, batch_size=16, context=128)
    fourth = train_member(cfg, tmp_path_factory.mktemp("fourth") / "seed-3", progress=False)["model_dir"]
    return [*tiny_members, fourth]


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_fused_engine_equals_reference(four_members, rows, tmp_path, k, combine):
    packed = pack_ensemble(four_members[:k], tmp_path / f"k{k}-{combine}", combine=combine)
    check_engine_against_reference(packed, rows, combine)


@pytest.mark.slow
def test_gqa_members_probs_rule_k4(tiny_dataset, rows, tmp_path):
    packed = pack_ensemble(gqa_members(tiny_dataset, tmp_path, 4), tmp_path / "gqa-k4", combine="probs")
    check_engine_against_reference(packed, rows, "probs")


@pytest.mark.slow
def test_k1_ensemble_equals_member_served_alone(tiny_members, rows, tmp_path):
    packed = pack_ensemble(tiny_members[:1], tmp_path / "k1")
    prompts = [r[:16] for r in rows]
    (fused, fused_greedy), (alone, alone_greedy) = engine_run(packed, rows, prompts), engine_run(tiny_members[0], rows, prompts)
    diff = (fused - alone).abs().max().item()
    print(f"K=1 ensemble vs member served alone: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE and fused_greedy == alone_greedy


def test_http_logprob_tolerance_tells_the_combine_rules_apart(tiny_ensemble, tiny_dataset):
    """The negative control of test_app's HTTP log-prob test: on its rows (4 x 96 validation tokens, every 100th)
    and its K=2 logit-averaged ensemble, the `probs` rule's log-probs differ from the `logits` rule's by more than
    its tolerance, so an endpoint that combined with the wrong rule would fail it."""
    stream = load_tokens(tiny_dataset, "val")
    ids = torch.tensor([stream[i * 100 : i * 100 + 96].tolist() for i in range(4)])  # test_app's rows
    right = ReferenceEnsemble.from_dir(tiny_ensemble)
    assert right.combine == "logits" and right.k == 2
    wrong = ReferenceEnsemble.from_dir(tiny_ensemble, combine="probs")
    diff = (scores(right.log_probs(ids), ids) - scores(wrong.log_probs(ids), ids)).abs().max().item()
    print(f"K=2 tiny ensemble: logits vs probs rule, max abs diff {diff:.2e} (HTTP tolerance {HTTP_TOLERANCE:g})")
    assert diff > 10 * HTTP_TOLERANCE
