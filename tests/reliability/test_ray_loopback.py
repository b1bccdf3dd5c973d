"""A local Ray that Chorus starts (plumbing.ray_session) listens on loopback only, and leaves nothing behind.

Real Ray and real Serve (a trivial deployment, no engine: the endpoint's own check with the vLLM engine is in
test_endpoint_reliability.py). Every listening TCP socket of every process of the session is enumerated with
psutil; the check itself is shown to flag a socket on every interface.
"""
from __future__ import annotations

import socket

import httpx
import psutil

from ray_processes import listeners, off_loopback, session_processes
from plumbing.ray_session import connect_ray, disconnect_ray, is_loopback, keep_serve_replica_on_loopback, session_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_check_flags_a_listener_on_every_interface():
    """Negative control: sockets this test opens on 0.0.0.0 (and :: where IPv6 exists) are reported."""
    opened = []
    try:
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"), (socket.AF_INET, "127.0.0.1")):
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.bind((host, 0))
            except OSError:
                continue  # no IPv6 on this machine
            sock.listen()
            opened.append((host, sock.getsockname()[1], sock))
        exposed = {(ip, port) for _, ip, port in off_loopback(listeners([psutil.Process()]))}
        for host, port, _ in opened:
            assert ((host, port) in exposed) == (host != "127.0.0.1"), (host, port, exposed)
    finally:
        for _, _, sock in opened:
            sock.close()
    assert [is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", "localhost")] == [True] * 5
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "192.0.2.2", "::ffff:10.0.0.1", "example.org")] == [False] * 5


def test_local_ray_and_serve_listen_on_loopback_only_and_stop_cleanly():
    import ray
    from ray import serve

    assert not ray.is_initialized(), "another test left Ray running in this process"
    # children this process had before (e.g. multiprocessing's resource tracker, which an earlier test's vLLM
    # engine starts and which lives as long as the test process) are not the session's
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    started = connect_ray(num_cpus=1)
    assert started
    session = session_dir()
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})

        @serve.deployment(ray_actor_options={"num_cpus": 0})
        class Echo:  # defined here, so Ray ships it by value (the test module is not importable in workers)
            def __init__(self):
                keep_serve_replica_on_loopback()

            def __call__(self, request) -> str:
                return "ok"

        serve.run(Echo.bind(), name="loopback-check", route_prefix="/")
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=30).text == "ok"
        assert ray.get(ray.remote(lambda: 1).remote()) == 1  # a plain task's worker too
        procs = session_processes(session, [p for p in psutil.Process().children(recursive=True)
                                            if p.pid not in before])
        found = listeners(procs)
        exposed = off_loopback(found)
        print(f"Ray session {session}: {len(procs)} processes, {len(found)} listening sockets, "
              f"{len(exposed)} not on loopback")
        names = " ".join(p for p, _, _ in found)
        for expected in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent", "ServeController",
                         "ProxyActor", "ServeReplica"):
            assert expected in names, f"{expected} not among the listeners: {found}"
        assert not any(port == 8265 for _, _, port in found), "a dashboard was started without being asked for"
        assert not exposed, "listening beyond loopback:\n" + "\n".join(map(str, exposed))
    finally:
        serve.shutdown()
        disconnect_ray(started)
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"processes of the session still run after disconnect_ray: {alive}"


def test_a_ray_already_running_is_left_alone():
    import ray

    started = connect_ray(num_cpus=1)
    try:
        assert started and not connect_ray(num_cpus=1)  # the second call finds it: not its to stop
        disconnect_ray(False)
        assert ray.is_initialized()
    finally:
        disconnect_ray(started)
    assert not ray.is_initialized()
