"""`start_app` on an IPv6 loopback host (slow: its own engine): the URL it returns is bracketed and serves.

Before, the URL was built as http://::1:PORT, which no client can parse, and the start waited out its timeout.
The control for the bracketing itself (an IPv4 host keeps its plain form) is in test_endpoint_limits.py.
"""
from __future__ import annotations

import os
import socket

import httpx
import pytest

from serve.app import EngineSettings, EnsembleConfig, HttpSettings, start_app, stop_app

pytestmark = pytest.mark.slow


def test_an_ipv6_loopback_endpoint_starts_and_serves(tiny_ensemble):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    os.environ["HF_HUB_OFFLINE"] = "1"
    url = start_app(EnsembleConfig(model_dir=str(tiny_ensemble), served_model_name="v6",
                                   engine=EngineSettings(kv_cache_gib=0.25, max_num_seqs=8),
                                   http=HttpSettings(host="::1", port=port)))
    try:
        assert url == f"http://[::1]:{port}"
        reply = httpx.post(f"{url}/v1/completions", json={"model": "v6", "prompt": "The", "max_tokens": 2}, timeout=120)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2, reply.text[:300]
    finally:
        stop_app()
