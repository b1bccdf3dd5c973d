"""The Ray Serve endpoint, end to end: one real vLLM engine behind one real Ray Serve app for the module.

The app serves the K=2 logit-averaging tiny ensemble behind an API key. Its prompt log-probabilities
must equal the PyTorch reference's; the official openai client, streaming, bad requests and
lm-evaluation-harness's local-completions model are exercised against it.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import httpx
import openai
import pytest
import torch

from serve.app import EngineSettings, EnsembleConfig, HttpSettings, ServeError, start_app, stop_app
from serve.reference import ReferenceEnsemble, combine_member_logits
from train.data import load_tokens

API_KEY = "test-key"
NAME = "tiny-ensemble"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(tiny_ensemble):
    os.environ["HF_HUB_OFFLINE"] = "1"
    url = start_app(EnsembleConfig(model_dir=str(tiny_ensemble), served_model_name=NAME,
                                   engine=EngineSettings(kv_cache_gib=0.25, max_num_seqs=16),
                                   http=HttpSettings(api_key=API_KEY, port=free_port())))
    yield url
    stop_app()


@pytest.fixture(scope="module")
def client(endpoint):
    return openai.OpenAI(base_url=endpoint + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_ensemble):
    return ReferenceEnsemble.from_dir(tiny_ensemble)


def test_prompt_logprobs_equal_reference(client, reference, tiny_dataset):
    """Engine (through HTTP, batched token-id prompts, echo + logprobs, max_tokens 1) == reference, fp32."""
    stream = load_tokens(tiny_dataset, "val")
    rows = [stream[i * 100 : i * 100 + 96].tolist() for i in range(4)]
    reply = client.completions.create(model=NAME, prompt=rows, max_tokens=1, echo=True, logprobs=0, temperature=0)
    expected = reference.log_probs(torch.tensor(rows))
    worst = 0.0
    assert len(reply.choices) == len(rows)
    for choice in reply.choices:
        row = rows[choice.index]
        got = choice.logprobs.token_logprobs[: len(row)]
        assert got[0] is None  # the first token has no context
        for t in range(1, len(row)):
            worst = max(worst, abs(got[t] - float(expected[choice.index, t - 1, row[t]])))
    print(f"K=2 logits: max abs diff engine vs reference over {sum(map(len, rows))} tokens: {worst:.2e}")
    assert worst <= 1e-3


def test_openai_client_completions_chat_and_streaming(client):
    assert [m.id for m in client.models.list().data] == [NAME]
    text = client.completions.create(model=NAME, prompt="The history of", max_tokens=6, temperature=0)
    assert text.usage.completion_tokens == 6 and text.choices[0].text
    batch = client.completions.create(model=NAME, prompt=["One", "Two", "Three"], max_tokens=3, temperature=0)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2]
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=5)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    pieces = [c.choices[0].text for c in client.completions.create(model=NAME, prompt="A", max_tokens=5,
                                                                   temperature=0, stream=True) if c.choices]
    greedy = client.completions.create(model=NAME, prompt="A", max_tokens=5, temperature=0).choices[0].text
    assert len(pieces) >= 2 and "".join(pieces) == greedy
    chat_pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True) if c.choices]
    assert "".join(chat_pieces)


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (json.dumps({"model": "no-such-model", "prompt": "a"}).encode(), 404),
    (json.dumps({"model": NAME, "prompt": "a", "max_tokens": -1}).encode(), 400),
    (json.dumps({"model": NAME, "prompt": "a", "max_tokens": 10**6}).encode(), 400),
    (json.dumps({"model": NAME, "prompt": "word " * 400}).encode(), 400),
    (json.dumps({"model": NAME, "prompt": 5}).encode(), 400),
    (json.dumps({"model": NAME, "prompt": "a", "max_tokens": "many"}).encode(), 400),
    (json.dumps({"model": NAME, "prompt": ""}).encode(), 400),
    # A lone surrogate ("\\ud800") is valid JSON but not text: a 400 naming the field, streaming or not.
    (json.dumps({"model": NAME, "prompt": "a", "stop": ["x", "\ud800"]}).encode(), 400),
    (json.dumps({"model": NAME, "prompt": "a", "bad_words": ["\ud800"], "stream": True}).encode(), 400),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(endpoint, body, status):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    reply = httpx.post(f"{endpoint}/v1/completions", content=body, headers=headers, timeout=60)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["message"]
    ok = httpx.post(f"{endpoint}/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 1},
                    headers=headers, timeout=60)
    assert ok.status_code == 200


def test_api_key_guards_everything_but_health(endpoint):
    assert httpx.get(f"{endpoint}/health", timeout=30).status_code == 200
    assert httpx.get(f"{endpoint}/v1/models", timeout=30).status_code == 401
    wrong = httpx.post(f"{endpoint}/v1/completions", json={"model": NAME, "prompt": "a"},
                       headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert wrong.status_code == 401


# ---- lm-evaluation-harness against the endpoint -------------------------------------------------

MC_ITEMS = 50
TASK = "chorus_arc_easy_slice"


def mc_pair_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context, continuation) token ids as lm-eval's causal models cut them: trailing spaces of the
    context move to the continuation, the pair is encoded whole (with BOS) and split at the context's length."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tokenizer(stripped + continuation)["input_ids"]
    n_context = len(tokenizer(stripped)["input_ids"])
    return whole[:n_context], whole[n_context:]


def reference_choice_scores(reference: ReferenceEnsemble, tokenizer, items: list[dict]) -> dict[str, list[list]]:
    """Per item and choice, the reference ensemble's log-likelihood of the continuation (the sum of its tokens'
    log-probs) under each combine rule, "logits" and "probs" (the served one and the negative control), and
    "tokens": the continuation's length in tokens."""
    scores: dict[str, list[list]] = {"logits": [], "probs": [], "tokens": []}
    for item in items:
        rows: dict[str, list] = {key: [] for key in scores}
        for choice in item["choices"]:
            ctx, cont = mc_pair_tokens(tokenizer, item["query"], " " + choice)
            member_logits = reference.member_logits(torch.tensor([ctx + cont]))
            for combine in ("logits", "probs"):
                lp = combine_member_logits(member_logits, combine)[0]
                rows[combine].append(sum(float(lp[len(ctx) + j - 1, tok]) for j, tok in enumerate(cont)))
            rows["tokens"].append(len(cont))
        for key, row in rows.items():
            scores[key].append(row)
    return scores


def worst_per_token_difference(lls: list[list[float]], other: list[list[float]], tokens: list[list[int]]) -> float:
    """max over every request of |ll - other ll| / its continuation's tokens (same items, same choices each)."""
    assert [len(x) for x in lls] == [len(x) for x in other] == [len(x) for x in tokens]
    return max(abs(a - b) / n for xs, ys, ns in zip(lls, other, tokens) for a, b, n in zip(xs, ys, ns))


def arc_easy_slice(eval_dir, tokenizer, limit: int) -> list[dict]:
    """The first `limit` ARC-Easy items whose every choice fits the tiny members' 128-token context."""
    items = []
    with open(eval_dir / "arc_easy.jsonl") as f:
        for line in f:
            item = json.loads(line)
            if all(sum(map(len, mc_pair_tokens(tokenizer, item["query"], " " + c))) <= 120 for c in item["choices"]):
                items.append(item)
            if len(items) == limit:
                break
    return items


@pytest.fixture(params=["generated", pytest.param("shared", marks=pytest.mark.shared_data)])
def arc_easy_dir(request) -> Path:
    """The generated ARC-Easy-format items (core), and the real ARC-Easy where ../shared/data has it: real text
    brings characters and word pieces the generated language lacks, where lm-eval's tokenization could differ."""
    return request.getfixturevalue("generated_eval_dir" if request.param == "generated" else "eval_dir")


LL_TOLERANCE_PER_TOKEN = 1e-3  # test_prompt_logprobs_equal_reference's bound, per token of a continuation


def test_lm_eval_local_completions_matches_in_process_scorer(endpoint, reference, tiny_ensemble, arc_easy_dir,
                                                             tmp_path, monkeypatch):
    """lm-eval's local-completions model against the endpoint: every request's log-likelihood equals the reference
    ensemble's (per token within LL_TOLERANCE_PER_TOKEN) and every item's pick is the same. Negative control: the
    reference under the other combine rule differs from lm-eval's log-likelihoods by more than the tolerance."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_ensemble))
    items = arc_easy_slice(arc_easy_dir, tokenizer, MC_ITEMS)
    assert len(items) == MC_ITEMS
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    (tmp_path / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{query}}'\ndoc_to_choice: choices\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": NAME, "base_url": f"{endpoint}/v1/completions", "tokenizer": str(tiny_ensemble),
                    "tokenizer_backend": "huggingface", "tokenized_requests": True, "add_bos_token": True,
                    "max_length": 128, "batch_size": 16, "num_concurrent": 1, "max_retries": 1},
        tasks=[TASK], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
    )
    served = results["results"][TASK]["acc,none"]
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    served_correct = [int(s["acc"]) for s in samples]
    served_lls = [[float(x[0]) for x in s["filtered_resps"]] for s in samples]
    scores = reference_choice_scores(reference, tokenizer, items)
    control_combine = {"logits": "probs", "probs": "logits"}[reference.combine]
    worst = worst_per_token_difference(served_lls, scores[reference.combine], scores["tokens"])
    control = worst_per_token_difference(served_lls, scores[control_combine], scores["tokens"])
    in_process_correct = [int(max(range(len(s)), key=s.__getitem__) == item["gold"])
                          for s, item in zip(scores[reference.combine], items)]
    in_process = sum(in_process_correct) / len(items)
    print(f"ARC-Easy-format {len(items)} items ({arc_easy_dir}): lm-eval via endpoint acc {served:.4f}, in-process "
          f"reference acc {in_process:.4f}; max |ll difference| per token {worst:.2e}, "
          f"{control:.2e} against the reference combining by {control_combine}")
    assert worst <= LL_TOLERANCE_PER_TOKEN
    assert control > LL_TOLERANCE_PER_TOKEN  # the control: the comparison sees another combine rule
    assert served_correct == in_process_correct  # item by item, not only on average
    assert served == pytest.approx(in_process, abs=1e-12)


def test_second_app_on_another_port_is_refused_by_name_and_the_first_keeps_serving(endpoint, tiny_ensemble):
    # Serve keeps the HTTP options it started with and only logs a warning for new ones: without the check a
    # second start would wait on a port no proxy listens on.
    running_port = int(endpoint.rsplit(":", 1)[1])
    with pytest.raises(ServeError, match=f"HTTP on 127.0.0.1:{running_port}"):
        start_app(EnsembleConfig(model_dir=str(tiny_ensemble), served_model_name=NAME,
                                 http=HttpSettings(port=free_port())))
    assert httpx.get(f"{endpoint}/health", timeout=10).status_code == 200
