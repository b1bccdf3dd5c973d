"""The Ray Serve endpoint, end to end: one real vLLM engine behind one real Ray Serve app for the module.

The app serves the K=2 logit-averaging tiny ensemble behind an API key. Its prompt log-probabilities
must equal the PyTorch reference's; the official openai client, streaming, bad requests and
lm-evaluation-harness's local-completions model are exercised against it.
"""
from __future__ import annotations

import json
import os
import socket

import httpx
import openai
import pytest
import torch

from serve.app import EnsembleConfig, ServeError, start_app, stop_app
from serve.reference import ReferenceEnsemble
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
    url = start_app(EnsembleConfig(model_dir=str(tiny_ensemble), served_model_name=NAME, api_key=API_KEY,
                                   port=free_port(), kv_cache_bytes=256 << 20, max_num_seqs=16))
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


def reference_mc_correct(reference: ReferenceEnsemble, tokenizer, items: list[dict]) -> list[int]:
    """Per item, 1 if the reference ensemble's choice (max sum of continuation log-probs) is the gold one."""
    correct = []
    for item in items:
        scores = []
        for choice in item["choices"]:
            ctx, cont = mc_pair_tokens(tokenizer, item["query"], " " + choice)
            ids = torch.tensor([ctx + cont])
            lp = reference.log_probs(ids)[0]
            scores.append(sum(float(lp[len(ctx) + j - 1, tok]) for j, tok in enumerate(cont)))
        correct.append(int(max(range(len(scores)), key=scores.__getitem__) == item["gold"]))
    return correct


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


def test_lm_eval_local_completions_matches_in_process_scorer(endpoint, reference, tiny_ensemble, eval_dir,
                                                             tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_ensemble))
    items = arc_easy_slice(eval_dir, tokenizer, MC_ITEMS)
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
    served_correct = [int(s["acc"]) for s in sorted(results["samples"][TASK], key=lambda s: s["doc_id"])]
    in_process_correct = reference_mc_correct(reference, tokenizer, items)
    in_process = sum(in_process_correct) / len(items)
    print(f"ARC-Easy {len(items)} items: lm-eval via endpoint acc {served:.4f}, in-process reference acc {in_process:.4f}")
    assert len(items) == MC_ITEMS
    assert served_correct == in_process_correct  # item by item, not only on average
    assert served == pytest.approx(in_process, abs=1e-12)


def test_second_app_on_another_port_is_refused_by_name_and_the_first_keeps_serving(endpoint, tiny_ensemble):
    # Serve keeps the HTTP options it started with and only logs a warning for new ones: without the check a
    # second start would wait on a port no proxy listens on.
    running_port = int(endpoint.rsplit(":", 1)[1])
    with pytest.raises(ServeError, match=f"HTTP on 127.0.0.1:{running_port}"):
        start_app(EnsembleConfig(model_dir=str(tiny_ensemble), served_model_name=NAME, port=free_port()))
    assert httpx.get(f"{endpoint}/health", timeout=10).status_code == 200
