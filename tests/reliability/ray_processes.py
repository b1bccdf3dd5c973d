"""Which processes a Ray session (and the command that started it) left running, and where they listen.

A Ray session's own processes (gcs_server, raylet, agents, dashboard, log monitor) name its session
directory on their command line; its workers (replicas, engines) rename themselves (`ray::...`) but are
descendants of the raylet. Both are found here, with psutil only.
"""
from __future__ import annotations

import re

import psutil

from plumbing.ray_session import is_loopback

SESSION_RE = re.compile(r"session (/\S+/session_[\w.-]+)")  # as plumbing.ray_session logs it


def session_dir_in(log_text: str) -> str:
    """The session directory of the local Ray a command started, from its log (plumbing.ray_session's line)."""
    found = SESSION_RE.search(log_text)
    assert found, f"no 'started a local Ray ... session ...' line in the log:\n{log_text[-2000:]}"
    return found.group(1).rstrip(")")


def session_processes(session_dir: str, also: list[psutil.Process] = ()) -> list[psutil.Process]:
    """Every live process of the Ray session at `session_dir`: those that name it, their descendants, and
    `also` (e.g. a command's own process tree) with theirs."""
    roots = list(also)
    for proc in psutil.process_iter():
        try:
            if session_dir in " ".join(proc.cmdline()):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    found = {}
    for root in roots:
        try:
            for proc in [root, *root.children(recursive=True)]:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    found[proc.pid] = proc
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return list(found.values())


def describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:120] or proc.name()}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


def listeners(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process, address, port) of every listening TCP socket of `procs` (UDP sockets do not listen)."""
    found = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        found += [(describe(proc), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def off_loopback(found: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """The listeners not bound to a loopback address (0.0.0.0, ::, or a routable address)."""
    return [entry for entry in found if not is_loopback(entry[1])]
