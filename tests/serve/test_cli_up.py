"""`python -m serve up` as a user runs it: prints the URL, serves, stops cleanly on Ctrl-C (slow: own engine)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_serve_up_two_replicas_then_ctrl_c(tiny_ensemble, tmp_path):
    port = 18000 + os.getpid() % 1000
    cmd = [sys.executable, "-m", "serve", "up", "--model", str(tiny_ensemble), "--name", "ens", "--port", str(port),
           "--replicas", "2", "--kv-cache-gib", "0.25"]
    log_path = tmp_path / "up.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 540
        while f"at http://127.0.0.1:{port}/v1" not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(2)
        url = f"http://127.0.0.1:{port}"
        replies = [httpx.post(f"{url}/v1/completions", json={"model": "ens", "prompt": "The", "max_tokens": 4},
                              timeout=60) for _ in range(6)]
        assert [r.status_code for r in replies] == [200] * 6
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=5)
