"""The one way Chorus reaches Ray: join a cluster at `--address`, or start a local Ray bound to loopback.

On exit only what was started here is stopped: a Ray the caller (or another stage in this process) had
already initialised is left running, and a cluster joined by address is only disconnected from.

A local Ray is a single-node cluster that nothing outside this machine should reach, so every process it
starts listens on loopback only. Ray 2.60 gets there with three settings, none of which is enough alone:
- `_node_ip_address="127.0.0.1"`: the C++ servers (gcs_server, raylet, object manager, every worker's core
  worker) bind 127.0.0.1 instead of all interfaces exactly when their node IP is a loopback address, and the
  agents (dashboard agent, runtime-env agent, metrics export) bind the node IP;
- `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` while `ray.init` runs: otherwise Ray turns a loopback node IP back
  into the machine's routable address (`services.resolve_ip_for_localhost`: single-node mode is the only
  one that keeps it), so the flag above would never reach the servers;
- no dashboard unless asked (`include_dashboard=False`; `dashboard=True` binds it to loopback too).
Two listeners remain that Ray hard-codes to every interface: a Serve replica's inter-deployment gRPC server
(`[::]:0`, see `keep_serve_replica_on_loopback`, called by a replica) and vLLM's own address for its
engine processes (`VLLM_HOST_IP`, set here for the processes Ray starts).

The local Ray is private: `address="local"` starts a new one even where `$RAY_ADDRESS` or a `ray start`
cluster on this node would otherwise be joined (Ray's default for an address left out), and it requires
Ray's token authentication (`RAY_AUTH_MODE=token`, Ray >= 2.52) with a token made for this process and held
in its environment only (`RAY_AUTH_TOKEN`, which only this user's processes can read), not in a file: another
local user who can reach its ports cannot use them. vLLM's usage telemetry is off in every process it starts.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# The environment the local Ray's processes (and so every worker, replica and engine) start with.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single-node: keep a loopback node IP as given
    "VLLM_HOST_IP": LOOPBACK,  # the address vLLM's engine processes bind and advertise
    "RAY_ADDRESS": None,  # a cluster named there is not this one: its processes must not join it either
}
# vLLM reports usage to its authors unless told not to: off for every engine Chorus starts (Ray's workers inherit it).
NO_TELEMETRY_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def private_ray_env() -> dict[str, str]:
    """What a local Ray started here runs with, kept in this process's environment for its lifetime: token
    authentication with this process's own token (kept if one is set already), and no telemetry."""
    return {**NO_TELEMETRY_ENV, "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)}


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, and IPv4-mapped loopback (::ffff:127.0.0.1, what a dual-stack socket shows)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == "localhost"
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


@contextmanager
def _environment(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for the block (the processes started in it keep them),
    then restore."""
    before = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def connect_ray(address: str | None = None, num_cpus: int | None = None, *, dashboard: bool = False) -> bool:
    """Make sure this process is connected to Ray; True when this call started (or joined) it.

    Without `address` a private local Ray starts (never `$RAY_ADDRESS` or a `ray start` cluster on this node),
    with token authentication and every listening socket on loopback (see the module's notes);
    `dashboard=True` adds Ray's dashboard, on 127.0.0.1 too."""
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return False
    os.environ.update(NO_TELEMETRY_ENV)  # engines this process starts (a Serve replica sets it for its own)
    with _sigterm_handler_kept():
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
            log.info("joined the Ray cluster at %s", address)
            return True
        cpus = num_cpus or os.cpu_count()
        use_token_auth()
        # ray_constants read the single-node switch when Ray was imported: set it for this call too.
        multi_node = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            with _environment(LOOPBACK_ENV):
                # "local": a new Ray of our own, whatever $RAY_ADDRESS or /tmp/ray/ray_current_cluster point to
                ray.init(address="local", num_cpus=cpus, include_dashboard=dashboard, dashboard_host=LOOPBACK,
                         log_to_driver=False, configure_logging=False, _node_ip_address=LOOPBACK)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = multi_node
    node_ip = ray.util.get_node_ip_address()
    if not is_loopback(node_ip):  # a Ray that would listen on the network: stop it rather than run it
        ray.shutdown()
        raise RuntimeError(f"the local Ray came up on {node_ip}, not on loopback: refusing to run it")
    if not token_auth_enabled():
        ray.shutdown()
        raise RuntimeError("the local Ray came up without token authentication: refusing to run it")
    log.info("started a local Ray on %s (%s CPUs, token authentication, session %s)", node_ip, cpus, session_dir())
    return True


def use_token_auth() -> None:
    """Token authentication with this process's token, for the Ray about to start here and this process's calls
    to it (kept in the environment: later calls need the token too). Ray reads RAY_AUTH_MODE into its cached
    config when imported; it is refreshed here as Ray's own `_enable_token_auth` does."""
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ.update(private_ray_env())
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def token_auth_enabled() -> bool:
    """Whether this process's Ray connection uses token authentication."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return get_authentication_mode() == AuthenticationMode.TOKEN


@contextmanager
def _sigterm_handler_kept() -> Iterator[None]:
    """Keep this process's own SIGTERM handler (plumbing.console's: SIGTERM as Ctrl-C) across `ray.init`.

    Ray's core installs a failure-signal handler on SIGTERM in the driver that dumps the stack and aborts
    (exit by SIGABRT), skipping every clean-up; the crash handler for the other signals stays Ray's."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(handler):
            signal.signal(signal.SIGTERM, handler)


def disconnect_ray(started: bool) -> None:
    """Undo `connect_ray`: shut down (or leave) Ray only when that call started (or joined) it."""
    import ray

    if started and ray.is_initialized():
        ray.shutdown()


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, *, dashboard: bool = False) -> Iterator[object]:
    """`with ray_session(address) as ray:` - Ray for the block; stopped after it only if started here."""
    import ray

    started = connect_ray(address, num_cpus, dashboard=dashboard)
    try:
        yield ray
    finally:
        disconnect_ray(started)


def session_dir() -> str:
    """The running Ray's session directory (/tmp/ray/session_...): every process of that Ray names it."""
    import ray

    return ray._private.worker._global_node.get_session_dir_path()


def keep_serve_replica_on_loopback() -> None:
    """Call in a Serve replica's constructor: on a loopback node, bind its inter-deployment gRPC server there.

    Ray Serve 2.60 binds that server to `[::]:0` (every interface) with no option to change it
    (serve/_private/replica.py, `_on_initialized`, which runs after the constructor). Its callers reach it at
    the node IP (`replica_wrapper`: node_ip:port), so on a node whose IP is loopback binding the loopback
    address loses nothing. On any other node nothing is changed."""
    import ray
    from ray.serve._private import replica

    if not is_loopback(ray.util.get_node_ip_address()):
        return
    bind_all = replica.add_port_to_grpc_server
    if getattr(bind_all, "chorus_loopback", False):
        return

    def bind_loopback(server, address: str):
        return bind_all(server, address.replace("[::]:", f"{LOOPBACK}:", 1))

    bind_loopback.chorus_loopback = True
    replica.add_port_to_grpc_server = bind_loopback


def run_as_task(address: str, fn, *args, num_cpus: float = 1, num_gpus: float = 0, **kwargs):
    """`fn(*args, **kwargs)` as one Ray task (titled `ray::call_as_task`) on a node of the cluster at `address`;
    its result (or its error) here.

    For a stage that computes in one process (distill, bench): `--address` sends that process's work to the
    cluster, so every path it reads or writes must be on storage all nodes share."""
    with ray_session(address) as ray:
        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(call_as_task)
        return ray.get(task.remote(fn, args, kwargs))


def call_as_task(fn, args: tuple, kwargs: dict):
    return fn(*args, **kwargs)
