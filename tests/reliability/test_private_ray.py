"""The Ray that Chorus starts is its own: never $RAY_ADDRESS's cluster or a `ray start` one, and locked with a token.

plumbing.ray_session.connect_ray is the one door to Ray (serve up, the synthetic job, train members --separate
and bench all go through it). Without an address it must start a private local Ray, whatever $RAY_ADDRESS
says; that Ray requires Ray's token authentication, with a token only this process's environment holds, even
where the user's environment turned authentication off; and every process it starts has vLLM's usage
telemetry off. The control for the token: a client given the token connects.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from ray_processes import session_processes

REPO = Path(__file__).resolve().parents[2]

DRIVER = """
import json, os, sys
import ray
from plumbing.ray_session import connect_ray, session_dir, token_auth_enabled
started = connect_ray(num_cpus=1)
print(json.dumps({"started": started, "gcs": ray.get_runtime_context().gcs_address, "session": session_dir(),
                  "token": os.environ["RAY_AUTH_TOKEN"], "auth": token_auth_enabled()}), flush=True)
sys.stdin.readline()
ray.shutdown()
"""

# A client on this machine, joining at the loopback address the way plumbing.ray_session would.
CLIENT = """
import ray, sys
from ray._private import ray_constants
ray_constants.ENABLE_RAY_CLUSTER = False
ray.init(address=sys.argv[1], log_to_driver=False, _node_ip_address="127.0.0.1")
print("connected", ray.cluster_resources().get("CPU"), flush=True)
"""


def env_without(*names: str, **values: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names} | values


@pytest.fixture(scope="module")
def private_ray():
    """A driver started with $RAY_ADDRESS naming another (here: nonexistent) cluster and auth turned off."""
    env = env_without("RAY_AUTH_TOKEN", RAY_ADDRESS="127.0.0.1:9", RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        pytest.fail(f"the driver did not start a Ray of its own:\n{proc.stderr.read()[-3000:]}")
    info = json.loads(line)
    yield info
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(timeout=120)


def connect(gcs: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLIENT, gcs], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env=env_without("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                                          RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **env))


def test_without_an_address_a_private_ray_starts_whatever_ray_address_says(private_ray):
    assert private_ray["started"] is True
    assert private_ray["gcs"].startswith("127.0.0.1:") and private_ray["gcs"] != "127.0.0.1:9"


def test_the_private_ray_requires_its_token(private_ray, tmp_path):
    assert private_ray["auth"] is True
    for env in ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}, {"RAY_AUTH_MODE": "disabled"}):
        refused = connect(private_ray["gcs"], HOME=str(tmp_path), **env)  # HOME: no ~/.ray/auth_token to fall back on
        assert refused.returncode != 0 and "connected" not in refused.stdout, refused.stdout + refused.stderr[-2000:]
        print(f"with {env}:", refused.stderr.strip().splitlines()[-1][:300])
    # The control: the same client with the driver's token connects.
    allowed = connect(private_ray["gcs"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=private_ray["token"], HOME=str(tmp_path))
    assert allowed.returncode == 0 and "connected" in allowed.stdout, allowed.stderr[-2000:]


def test_the_token_is_in_no_file_and_every_ray_process_has_telemetry_off(private_ray):
    home_token = Path.home() / ".ray" / "auth_token"
    assert not (home_token.exists() and home_token.read_text().strip() == private_ray["token"])
    procs = session_processes(private_ray["session"])
    assert procs
    environments = []
    for proc in procs:
        try:
            environ = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if environ:  # an exiting process shows none
            environments.append((proc.name(), environ))
    names = " ".join(name for name, _ in environments)
    assert "gcs_server" in names and "raylet" in names, names
    for name, environ in environments:
        assert environ.get("VLLM_NO_USAGE_STATS") == "1" and environ.get("DO_NOT_TRACK") == "1", name
        assert environ.get("RAY_ADDRESS") != "127.0.0.1:9", name  # nothing it starts joins the other cluster
