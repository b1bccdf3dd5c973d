"""A smoke check of the Ray Serve endpoint with real requests: start the app on a packed ensemble, send a
completion, a streamed completion and a scoring request, stop it. The main job runs it (bench.study's serve
phase) so a finished job has shown the product answering, not only the loss tables."""
from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_endpoint(model_dir: Path, port: int, address: str | None) -> dict:
    """Start the Ray Serve app, send a completion, a streamed completion and a scoring request, stop it."""
    import httpx

    from serve.app import EnsembleConfig, HttpSettings, start_app, stop_app

    config = EnsembleConfig(model_dir=str(model_dir), served_model_name="chorus-ensemble", http=HttpSettings(port=port))
    url = start_app(config, address=address)
    try:
        models = httpx.get(f"{url}/v1/models", timeout=60).json()
        body = {"model": config.model_name, "prompt": "The function returns", "max_tokens": 16, "temperature": 0}
        completion = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        completion.raise_for_status()
        score = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "model": config.model_name, "prompt": "Python is a programming language.", "max_tokens": 1,
            "echo": True, "logprobs": 1, "temperature": 0})
        score.raise_for_status()
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=300) as r:
            r.raise_for_status()
            chunks = sum(1 for line in r.iter_lines() if line.startswith("data: {"))
        token_logprobs = score.json()["choices"][0]["logprobs"]["token_logprobs"]
        return {"url": url, "models": [m["id"] for m in models["data"]],
                "completion": completion.json()["choices"][0]["text"], "stream_chunks": chunks,
                "prompt_tokens_scored": sum(lp is not None for lp in token_logprobs)}
    finally:
        stop_app()
