"""The endpoint's limits: what one request may ask for, how long it may take, how many may wait, who answers.

One real vLLM engine behind one real Ray Serve app, started with tight limits so each can be reached cheaply.
Every limit is shown from both sides: a request just inside it is served (the control: the limit is not
refusing everything), one just past it gets a 4xx (413 for the body size, 408 for the time limit) whose
message names the limit and the `serve up` flag that raises it. A full queue answers 503 saying so; a client
that leaves mid-stream frees its request in vLLM (the engine stops generating for it).
"""
from __future__ import annotations

import asyncio
from http import server as http_server
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve.app import (DeploymentSettings, EngineSettings, EnsembleConfig, HttpSettings, ServeError, endpoint_url,
                       start_app, stop_app, wait_healthy)

REPO = Path(__file__).resolve().parents[2]
API_KEY = "limits-key"
NAME = "tiny-limits"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LIMITS = dict(max_n=2, max_prompts=4, max_request_tokens=256, max_logprobs=3, max_body_bytes=4096,
              request_timeout_s=8.0)  # HttpSettings
QUEUE = dict(max_ongoing_requests=1, max_queued_requests=1)  # DeploymentSettings


@pytest.fixture(scope="module")
def endpoint(tiny_ensemble, loopback_port):
    os.environ["HF_HUB_OFFLINE"] = "1"
    config = EnsembleConfig(model_dir=str(tiny_ensemble), served_model_name=NAME,
                            engine=EngineSettings(kv_cache_gib=0.25, max_num_seqs=8),
                            deployment=DeploymentSettings(**QUEUE),
                            http=HttpSettings(api_key=API_KEY, port=loopback_port, **LIMITS))
    url = start_app(config)
    yield url
    stop_app()


@pytest.fixture(scope="module")
def http(endpoint):
    with httpx.Client(base_url=endpoint, headers=AUTH, timeout=120) as client:
        yield client


def completion(**fields) -> dict:
    return {"model": NAME, "prompt": "The history of", "max_tokens": 2, **fields}


CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}]}

# (what, path, a body just inside the limit, one just past it, the flag the refusal must name)
EDGES = [
    ("n", "/v1/completions", completion(n=2), completion(n=3), "--max-n"),
    ("chat n", "/v1/chat/completions", {**CHAT, "max_tokens": 2, "n": 2}, {**CHAT, "max_tokens": 2, "n": 3}, "--max-n"),
    ("prompts", "/v1/completions", completion(prompt=["a"] * 4), completion(prompt=["a"] * 5), "--max-prompts"),
    ("token-id prompts", "/v1/completions", completion(prompt=[[5, 6]] * 4), completion(prompt=[[5, 6]] * 5),
     "--max-prompts"),
    ("prompts x max_tokens", "/v1/completions", completion(prompt=["a"] * 4, max_tokens=64),
     completion(prompt=["a"] * 4, max_tokens=65), "--max-request-tokens"),
    ("prompts x n x max_tokens", "/v1/completions", completion(prompt=["a"] * 2, n=2, max_tokens=64),
     completion(prompt=["a"] * 2, n=2, max_tokens=65), "--max-request-tokens"),
    ("chat without max_tokens counts the context", "/v1/chat/completions", {**CHAT, "n": 2},
     {**CHAT, "n": 2, "max_completion_tokens": 129}, "--max-request-tokens"),
    ("logprobs", "/v1/completions", completion(logprobs=3), completion(logprobs=4), "--max-logprobs"),
    ("prompt_logprobs", "/v1/completions", completion(prompt_logprobs=3), completion(prompt_logprobs=4),
     "--max-logprobs"),
    ("chat top_logprobs", "/v1/chat/completions", {**CHAT, "max_tokens": 2, "logprobs": True, "top_logprobs": 3},
     {**CHAT, "max_tokens": 2, "logprobs": True, "top_logprobs": 4}, "--max-logprobs"),
]


@pytest.mark.parametrize("what, path, inside, past, flag", EDGES, ids=[e[0] for e in EDGES])
def test_a_request_past_a_limit_gets_400_naming_it_and_one_just_inside_is_served(http, what, path, inside, past, flag):
    served = http.post(path, json=inside)
    assert served.status_code == 200, f"just inside the limit ({what}) must be served: {served.text[:300]}"
    assert served.json()["choices"]
    refused = http.post(path, json=past)
    assert refused.status_code == 400, refused.text[:300]
    message = refused.json()["error"]["message"]
    assert flag in message and "limit" in message, message


def test_a_body_past_the_size_limit_gets_413_declared_or_not(http):
    def body_of(size: int) -> bytes:
        head = b'{"model": "%s", "max_tokens": 1, "prompt": "' % NAME.encode()
        return head + b"a" * (size - len(head) - 2) + b'"}'

    inside = http.post("/v1/completions", content=body_of(4096), headers={"Content-Type": "application/json"})
    assert inside.status_code in (200, 400), inside.text[:300]  # served, or vLLM's own "prompt too long": not 413
    assert inside.status_code != 413
    declared = http.post("/v1/completions", content=body_of(4097), headers={"Content-Type": "application/json"})
    assert declared.status_code == 413 and "--max-body-bytes" in declared.json()["error"]["message"], declared.text
    # Chunked (no Content-Length): counted while read.
    chunked = http.post("/v1/completions", content=iter([body_of(8000)[:4000], body_of(8000)[4000:]]),
                        headers={"Content-Type": "application/json"})
    assert "content-length" not in chunked.request.headers
    assert chunked.status_code == 413 and "--max-body-bytes" in chunked.json()["error"]["message"], chunked.text


def test_a_request_that_outlasts_the_time_limit_gets_408_naming_it(endpoint, http):
    """A client that sends its headers and then stalls on its body holds a replica slot: it is cut off at the
    time limit. Ray Serve's own timeout could be lifted by the client (x-request-timeout-seconds: 0)."""
    port = int(endpoint.rsplit(":", 1)[1])
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\nx-request-timeout-seconds: 0\r\n\r\n{")
        reply = b""
        while b"}}" not in reply and (chunk := s.recv(4000)):  # the status line, headers and the JSON error
            reply += chunk
        reply = reply.decode()
    took = time.monotonic() - start
    assert reply.startswith("HTTP/1.1 408"), reply[:400]
    assert "--request-timeout-s" in reply, reply
    assert LIMITS["request_timeout_s"] - 1 <= took <= LIMITS["request_timeout_s"] + 20, took
    # The control: a whole body sent at once is served well within the limit.
    assert http.post("/v1/completions", json=completion()).status_code == 200


def test_a_full_queue_answers_503_saying_so_and_the_endpoint_recovers(endpoint, http):
    # The control: one at a time, every request is served.
    assert [http.post("/v1/completions", json=completion(max_tokens=40)).status_code for _ in range(3)] == [200] * 3

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=endpoint, headers=AUTH, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=completion(max_tokens=100, ignore_eos=True))
                                          for _ in range(10)))

    replies = asyncio.run(flood())
    statuses = sorted(r.status_code for r in replies)
    print(f"10 at once with 1 ongoing + 1 queued allowed: {statuses}")
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    for reply in replies:
        if reply.status_code == 503:
            assert "backpressure" in reply.text and "max_queued_requests=1" in reply.text, reply.text
    assert http.post("/v1/completions", json=completion()).status_code == 200


def generated_tokens(http: httpx.Client) -> tuple[float, float]:
    """(tokens vLLM generated so far, requests it finished by length) from the replica's /metrics."""
    text = http.get("/metrics").text
    tokens = re.search(r'^vllm:generation_tokens_total\{[^}]*\} (\S+)$', text, re.M)
    by_length = re.search(r'^vllm:request_success_total\{[^}]*finished_reason="length"[^}]*\} (\S+)$', text, re.M)
    return float(tokens.group(1)), float(by_length.group(1))


def test_a_client_that_leaves_mid_stream_frees_its_request(endpoint, http):
    body = completion(prompt="A", max_tokens=120, n=2, ignore_eos=True, stream=True)  # 240 tokens when read whole

    def stream(read_all: bool) -> None:
        with httpx.stream("POST", f"{endpoint}/v1/completions", headers=AUTH, json=body, timeout=120) as reply:
            assert reply.status_code == 200
            for line in reply.iter_lines():
                if not read_all and line.startswith("data: {"):
                    break  # leave after the first event: the connection closes

    def settled() -> tuple[float, float]:
        before, deadline = generated_tokens(http), time.monotonic() + 30
        while True:
            time.sleep(1)
            now = generated_tokens(http)
            if now == before or time.monotonic() > deadline:
                return now
            before = now

    tokens0, length0 = settled()
    stream(read_all=True)  # the control: read whole, the request makes all its tokens
    tokens1, length1 = settled()
    assert tokens1 - tokens0 == 240 and length1 - length0 == 2, (tokens0, tokens1, length0, length1)
    stream(read_all=False)
    tokens2, length2 = settled()
    print(f"stream read whole: {tokens1 - tokens0:.0f} tokens; left after the first event: {tokens2 - tokens1:.0f}")
    assert tokens2 - tokens1 < 240 / 2 and length2 == length1, (tokens1, tokens2, length1, length2)
    assert http.post("/v1/completions", json=completion()).status_code == 200  # and the slot is free


# ---- who answers at the address -------------------------------------------------------------------

class _Health(http_server.BaseHTTPRequestHandler):
    instance = ""

    def do_GET(self):
        self.send_response(200)
        if self.instance:
            self.send_header("x-chorus-instance", self.instance)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def serve_health(host: str, instance: str = ""):
    handler = type("Handler", (_Health,), {"instance": instance})
    server_class = type("Server", (http_server.ThreadingHTTPServer,),
                        {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
    server = server_class((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_wait_healthy_accepts_only_its_own_endpoint_on_ipv4_and_ipv6(host):
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    other = serve_health(host)
    ours = serve_health(host, instance="abc123")
    try:
        other_url = endpoint_url(host, other.server_address[1])
        assert other_url.startswith("http://[::1]:" if host == "::1" else "http://127.0.0.1:")
        start = time.monotonic()
        with pytest.raises(ServeError, match="another server"):
            wait_healthy(other_url, timeout_s=30, instance="abc123")
        assert time.monotonic() - start < 10  # at once, not after the timeout
        wait_healthy(endpoint_url(host, ours.server_address[1]), timeout_s=30, instance="abc123")  # the control
    finally:
        other.shutdown()
        ours.shutdown()


def test_serve_up_on_a_port_another_process_holds_exits_2_before_starting_anything(tiny_ensemble):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "serve", "up", "--model", str(tiny_ensemble), "--port", str(port)],
                                cwd=REPO, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "started a local Ray" not in result.stderr, result.stderr[-2000:]


# ---- the API key stays out of what is stored and printed ------------------------------------------

def test_the_api_key_is_in_no_repr_and_nowhere_in_rays_stored_state(endpoint):
    import hashlib

    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    assert API_KEY not in repr(EnsembleConfig(model_dir="m", http=HttpSettings(api_key=API_KEY)))
    stored = b"".join(_internal_kv_get(key, namespace="serve") or b"" for key in _internal_kv_list(b"", namespace="serve"))
    # The control: Serve's checkpoint of the deployment is here, holding what the replicas were given.
    assert hashlib.sha256(API_KEY.encode()).hexdigest().encode() in stored, "Serve's stored state was not found"
    assert API_KEY.encode() not in stored


@pytest.mark.parametrize("flag", ["--max-n", "--max-request-tokens", "--max-body-bytes", "--request-timeout-s"])
def test_serve_up_passes_its_limit_flags_to_the_endpoint_and_refuses_a_limit_of_0(tiny_ensemble, flag):
    result = subprocess.run([sys.executable, "-m", "serve", "up", "--model", str(tiny_ensemble), flag, "0"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and f"error: {flag} must be > 0" in result.stderr, result.stderr[-2000:]
    assert "started a local Ray" not in result.stderr
