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

from serve.app import EnsembleConfig, start_app, stop_app
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
