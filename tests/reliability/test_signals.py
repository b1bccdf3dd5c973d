"""SIGTERM (systemd, Docker, Kubernetes, `kill`) stops a Chorus command as Ctrl-C does, leaving nothing behind.

The fast test shows the mechanism (plumbing.console.exit_on) on a bare command, with its negative control: without
it a SIGTERM skips every clean-up. The slow one runs `python -m serve up` as a user would (key in the
environment), sends SIGTERM, and lists what survives: its process tree and every process of the Ray session it
started (found by session directory).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from ray_processes import describe, session_dir_in, session_processes

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}

COMMAND = """
import sys, time
from plumbing.console import exit_on
def work():
    try:
        print("working", flush=True)
        time.sleep(60)
    finally:
        print("cleaned up", flush=True)
if sys.argv[1] == "exit_on":
    with exit_on():
        work()
else:
    work()
"""


def run_and_terminate(mode: str, sig: int = signal.SIGTERM, sigint_ignored: bool = False) -> tuple[int, str]:
    # sigint_ignored: started as a non-interactive shell starts a background job (`cmd &`): SIGINT ignored
    preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    proc = subprocess.Popen([sys.executable, "-c", COMMAND, mode], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=preexec)
    assert proc.stdout.readline().strip() == "working"
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=10 if sigint_ignored else 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None, proc.communicate()[0]
    return proc.returncode, out


def test_sigterm_unwinds_like_ctrl_c_under_exit_on():
    code, out = run_and_terminate("exit_on")
    assert "cleaned up" in out and "interrupted (signal SIGTERM)" in out and code == 130, out
    bare_code, bare_out = run_and_terminate("bare")  # negative control: Python's default SIGTERM skips `finally`
    assert bare_code == -signal.SIGTERM and "cleaned up" not in bare_out, (bare_code, bare_out)
    print(f"SIGTERM: under exit_on the clean-up ran (exit {code}); bare, it did not (killed by signal {-bare_code})")


def test_ctrl_c_stops_a_command_started_in_the_background():
    """A script's `cmd &` starts it with SIGINT ignored, and Python keeps it ignored: `serve up` then ignored
    Ctrl-C / `kill -INT` (seen in tests/serve/test_cli_up.py under a backgrounded test run). exit_on restores it."""
    code, out = run_and_terminate("exit_on", signal.SIGINT, sigint_ignored=True)
    assert "cleaned up" in out and code == 130, (code, out)
    bare_code, bare_out = run_and_terminate("bare", signal.SIGINT, sigint_ignored=True)
    assert bare_code is None and "cleaned up" not in bare_out, (bare_code, bare_out)  # control: SIGINT ignored
    print("SIGINT with SIGINT inherited ignored: under exit_on stopped and cleaned up (exit 130); bare, ignored")


@pytest.mark.slow
def test_serve_up_stopped_by_sigterm_leaves_no_process_and_hides_the_key(tiny_ensemble, tmp_path, loopback_port):
    key = "sigterm-test-key-0123456789"
    cmd = [sys.executable, "-m", "serve", "up", "--model", str(tiny_ensemble), "--name", "ens",
           "--port", str(loopback_port), "--kv-cache-gib", "0.25"]
    log_path = tmp_path / "up.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**ENV, "CHORUS_API_KEY": key})
    url = f"http://127.0.0.1:{loopback_port}"
    try:
        deadline = time.time() + 540
        while f"at {url}/v1" not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(2)
        session = session_dir_in(log_path.read_text())
        assert httpx.post(f"{url}/v1/completions", json={"model": "ens", "prompt": "The", "max_tokens": 2},
                          timeout=60).status_code == 401
        ok = httpx.post(f"{url}/v1/completions", json={"model": "ens", "prompt": "The", "max_tokens": 2},
                        headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert ok.status_code == 200, ok.text
        before = session_processes(session, [psutil.Process(proc.pid)])
        showing_key = [describe(p) for p in psutil.process_iter() if _cmdline_has(p, key)]
        assert not showing_key, f"the API key is readable in ps: {showing_key}"
        assert any("ServeReplica" in describe(p) for p in before), [describe(p) for p in before]

        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=180)
        out = log_path.read_text()
        assert code == 0, out[-3000:]
        _, alive = psutil.wait_procs(before, timeout=30)
        left = [describe(p) for p in alive] + [describe(p) for p in session_processes(session)]
        print(f"serve up + SIGTERM: exit {code}, {len(before)} processes before (Ray session {session}), "
              f"{len(left)} left after")
        assert not left, "processes left after SIGTERM:\n" + "\n".join(left)
        assert "Traceback" not in out.split("stopping:")[-1], out[-3000:]
        assert "stopped" in out.splitlines()[-1], out[-1000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=5)


def _cmdline_has(proc: psutil.Process, text: str) -> bool:
    try:
        return text in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _terminate_and_list(cmd: list[str], log_path: Path, ready: str, timeout_s: float = 540) -> tuple[int, str, list]:
    """Start `cmd`, wait for `ready` in its log, SIGTERM it; (exit code, log, processes left of it and its Ray)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=ENV)
    try:
        deadline = time.time() + timeout_s
        while ready not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)
        session = session_dir_in(log_path.read_text())
        before = session_processes(session, [psutil.Process(proc.pid)])
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=180)
        _, alive = psutil.wait_procs(before, timeout=30)
        left = [describe(p) for p in alive] + [describe(p) for p in session_processes(session)]
        print(f"{cmd[2]} {cmd[3]} + SIGTERM: exit {code}, {len(before)} processes before, {len(left)} left after")
        return code, log_path.read_text(), left
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_synthetic_job_stopped_by_sigterm_leaves_no_process_and_resumes(packed_teacher, tmp_path):
    out = tmp_path / "job"
    cmd = [sys.executable, "-m", "synthdata", "generate", "--teacher", str(packed_teacher), "--tokens", "40000",
           "--shard-tokens", "2000", "--out", str(out), "--no-progress"]
    code, log, left = _terminate_and_list(cmd, tmp_path / "generate.log", "started a local Ray")
    assert code == 130 and "re-run the same command to resume" in log and "Traceback" not in log, log[-3000:]
    assert not left, "processes left after SIGTERM:\n" + "\n".join(left)
    # nothing lost: the job resumes to its exact budget
    res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["tokens"] == 40000 and summary["complete"] and summary["duplicates"] == 0
