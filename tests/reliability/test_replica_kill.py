"""kill -9 of the Serve replica (the actor process holding the vLLM engine) while clients send requests.

Clients must get answers or errors, never hang: requests the killed replica held fail within a bounded
time (others started around the kill may be routed to the new replica and succeed), and every request ends
within the client timeout. Serve must start a new replica on its own and the app must
serve again; the killed replica's engine processes must not outlive it. Slow: the new replica's engine
start dominates (about a minute on a 2-core CPU box).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import httpx
import psutil
import pytest

from serve.app import APP_NAME, EngineSettings, EnsembleConfig, HttpSettings, start_app, stop_app

pytestmark = pytest.mark.slow
NAME = "tiny-ensemble"
CLIENTS = 8
CLIENT_TIMEOUT_S = 60
RECOVERY_DEADLINE_S = 600
REQUEST = {"model": NAME, "prompt": "The history of", "max_tokens": 32}


@pytest.fixture(scope="module")
def endpoint(tiny_ensemble, loopback_port):
    os.environ["HF_HUB_OFFLINE"] = "1"
    url = start_app(EnsembleConfig(model_dir=str(tiny_ensemble), served_model_name=NAME,
                                   engine=EngineSettings(kv_cache_gib=0.25, max_num_seqs=16),
                                   http=HttpSettings(port=loopback_port)))
    yield url
    stop_app()


def replica_processes() -> list[psutil.Process]:
    """This test's Serve replicas: descendants of this process (so never another session's Ray) whose
    process title Ray sets to ray::ServeReplica:<app>:<deployment>."""
    return [p for p in psutil.Process().children(recursive=True)
            if f"ServeReplica:{APP_NAME}:EnsembleServer" in " ".join(p.cmdline())]


def serves(url: str) -> bool:
    try:
        return httpx.post(f"{url}/v1/completions", json={**REQUEST, "max_tokens": 1}, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def test_replica_kill_recovers_and_clients_get_errors_not_hangs(endpoint):
    [replica] = replica_processes()
    engine_children = replica.children(recursive=True)
    records: list[tuple[float, float, str]] = []  # (start, end, outcome)
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as http:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    status = http.post(f"{endpoint}/v1/completions", json=REQUEST).status_code
                    outcome = "ok" if status == 200 else f"http {status}"
                except httpx.TimeoutException:
                    outcome = "client timeout"
                except httpx.TransportError as e:
                    outcome = type(e).__name__
                records.append((start, time.monotonic(), outcome))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(5)
    killed_at = time.monotonic()
    os.kill(replica.pid, signal.SIGKILL)
    recovered_at = None
    while time.monotonic() - killed_at < RECOVERY_DEADLINE_S:
        if serves(endpoint):
            recovered_at = time.monotonic()
            break
        time.sleep(2)
    time.sleep(10 if recovered_at else 0)  # clients keep going on the new replica
    stop.set()
    for t in threads:
        t.join(CLIENT_TIMEOUT_S + 10)
    assert not any(t.is_alive() for t in threads), "a client thread is stuck past its timeout"

    in_flight = [r for r in records if r[0] < killed_at < r[1]]
    before = Counter(o for s, e, o in records if e <= killed_at)
    during = Counter(o for s, e, o in records if e > killed_at and (recovered_at is None or s < recovered_at))
    after = Counter(o for s, e, o in records if recovered_at is not None and s >= recovered_at)
    recovery_s = None if recovered_at is None else round(recovered_at - killed_at, 1)
    print(f"replica kill -9 (pid {replica.pid}) with {CLIENTS} clients: before {dict(before)}; "
          f"in flight at the kill {len(in_flight)}: {dict(Counter(o for _, _, o in in_flight))}, each ended within "
          f"{max((e - killed_at for _, e, _ in in_flight), default=0):.1f} s; while recovering {dict(during)}; "
          f"recovered (first 200) after {recovery_s} s; after {dict(after)}")
    assert recovered_at is not None, f"no 200 within {RECOVERY_DEADLINE_S} s of the kill"
    assert before["ok"] > 0 and after["ok"] > 0 and set(after) == {"ok"}
    # A request whose client started before the kill may still end "ok": it reached the proxy after the kill
    # and Serve's router, finding the replica dead, routed it to the new one (seen in CI: 2 of 8). What must
    # not happen is a hang; and the requests the dead replica held must fail, promptly.
    failed_in_flight = [r for r in in_flight if r[2] != "ok"]
    assert failed_in_flight, f"no request in flight at the kill got an error: {in_flight}"
    assert all(e - killed_at < 30 for _, e, _ in failed_in_flight), "in-flight requests did not fail promptly"
    assert all(e - s < CLIENT_TIMEOUT_S + 5 for s, e, _ in records)
    [new_replica] = replica_processes()
    assert new_replica.pid != replica.pid
    _, alive = psutil.wait_procs(engine_children, timeout=30)
    assert not alive, f"engine processes of the killed replica still run: {[p.pid for p in alive]}"


def engine_core(replica: psutil.Process) -> psutil.Process:
    """The replica's vLLM engine core process (vLLM titles it VLLM::EngineCore...)."""
    cores = [p for p in replica.children(recursive=True) if "EngineCore" in " ".join(p.cmdline())]
    assert len(cores) == 1, [(p.pid, p.cmdline()) for p in replica.children(recursive=True)]
    return cores[0]


def test_a_dead_engine_core_gets_its_replica_replaced(endpoint):
    """kill -9 of the engine core process only: the replica actor lives on, answering errors, until its health
    check (check_health, every 10 s) fails and Serve starts a new replica. Without the health check it
    answers 500 forever."""
    assert serves(endpoint)
    [replica] = replica_processes()
    core = engine_core(replica)
    killed_at = time.monotonic()
    os.kill(core.pid, signal.SIGKILL)
    statuses, recovered_at = Counter(), None
    while time.monotonic() - killed_at < RECOVERY_DEADLINE_S:
        try:
            status = httpx.post(f"{endpoint}/v1/completions", json={**REQUEST, "max_tokens": 1}, timeout=10).status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        statuses[status] += 1
        if status == 200 and replica_processes() and replica_processes()[0].pid != replica.pid:
            recovered_at = time.monotonic()
            break
        time.sleep(2)
    recovery_s = None if recovered_at is None else round(recovered_at - killed_at, 1)
    print(f"engine core kill -9 (pid {core.pid}, replica {replica.pid}): answers until recovery {dict(statuses)}; "
          f"new replica serving after {recovery_s} s")
    assert recovered_at is not None, f"no new replica serving within {RECOVERY_DEADLINE_S} s: {dict(statuses)}"
    _, alive = psutil.wait_procs([replica], timeout=60)
    assert not alive, "the replica with the dead engine still runs"
    assert all(serves(endpoint) for _ in range(3))
