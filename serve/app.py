"""The endpoint: a Ray Serve application around vLLM's AsyncLLM and vLLM's own OpenAI server app.

Nothing here speaks the protocol by hand. Each replica starts one AsyncLLM on the ensemble directory and
builds vLLM's FastAPI app over it (the same routes, validation, errors, streaming and API-key middleware
as `python -m vllm.entrypoints.openai.api_server`): /v1/models, /v1/completions, /v1/chat/completions,
/health, ... behind this endpoint's own guards (serve/middleware.py). Ray Serve routes HTTP to the replicas.
`EnsembleConfig` is the whole configuration, in three sections: each replica's engine, the Serve deployment,
and the HTTP side (address, key, per-request limits); `serve up`'s flags are derived from its fields.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from serve.draft import DRAFT_SAMPLING, check_draft, speculative_config
from serve.engine import engine_dtype
from serve.middleware import INSTANCE_HEADER, ApiKeyGuard, RequestLimits, TextGuard
from serve.pack import PackError, check_weights, read_config
from plumbing.config_flags import flag_name, setting
from plumbing.console import ChorusError
from plumbing.ray_session import (NO_TELEMETRY_ENV, connect_ray, disconnect_ray, is_loopback,
                                  keep_serve_replica_on_loopback)

log = logging.getLogger(__name__)

APP_NAME = "chorus-ensemble"
_started_ray = False  # whether start_app started (or joined) the Ray it runs on: stop_app then stops (or leaves) it
# Base models have no chat template of their own: a plain transcript that ends where the assistant speaks.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ServeError(ChorusError, RuntimeError):
    """An endpoint that cannot start as asked (for example Serve already running on another port)."""


@dataclass(frozen=True)
class EngineSettings:
    """Each replica's vLLM engine (`EnsembleConfig.vllm_cli_args`)."""
    max_model_len: int | None = setting(None, "context length (default: the model's)")
    kv_cache_gib: float = setting(1.0, "KV cache per replica in GiB (default %(default)g)")  # the CPU build needs it
    max_num_seqs: int = setting(64, "sequences batched at once per replica (default %(default)s)")
    # Eager by default: on the CPU an engine then starts in seconds instead of minutes.
    compile: bool = setting(False, "let vLLM torch.compile the model (slow start; default eager)")
    seed: int = 0
    # Speculative decoding (serve/draft.py): a small model sharing the tokenizer drafts, the ensemble verifies.
    draft: str | None = setting(None, "draft model directory: the distilled student from `distill` (intended), a "
                                      "member, or any Llama sharing the tokenizer (another tokenizer is refused)")
    num_speculative_tokens: int = setting(4, "tokens the draft proposes per step (default %(default)s)")
    draft_max_batch: int | None = setting(None, "speculate only while at most this many sequences run; a fuller "
                                                "batch decodes without the draft (default: always speculate)")
    draft_sampling: str = setting(
        "greedy", "greedy (default): the draft's most likely token, accepted with the ensemble's probability of it; "
                  "seeded requests stay reproducible. probabilistic: a draw from the draft, accepted far more often "
                  "when sampling with a close draft, but vLLM draws it without the request's seed (the output "
                  "distribution is exact either way)", choices=DRAFT_SAMPLING)


@dataclass(frozen=True)
class DeploymentSettings:
    """The Ray Serve deployment: how many replicas, where, and how much work each takes and queues."""
    replicas: int = setting(1, "engine replicas (default %(default)s)")
    cpus_per_replica: float = 1.0  # what Ray reserves; the engine's own processes do the work
    max_replicas_per_node: int | None = setting(
        None, "on a cluster: at most this many replicas per node (1: each replica on its own node, so a lost node "
              "takes one replica)")
    max_ongoing_requests: int | None = setting(
        None, "requests a replica works on at once (default 4 x --max-num-seqs); more wait in the queue")
    max_queued_requests: int = setting(  # per proxy
        1024, "requests waiting for a replica; past it a 503 'dropped due to backpressure' (default %(default)s)")


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP side: the address, the key, and what one request may ask for (4xx past a limit, naming it and its
    flag; serve/middleware.py)."""
    host: str = setting("127.0.0.1", "bind address (default %(default)s; any other needs a key or "
                                     "--allow-unauthenticated)")
    port: int = setting(8000, "HTTP port (default %(default)s)")
    # The Bearer key every route but /health requires; never printed (`serve up`: from a file or $CHORUS_API_KEY).
    api_key: str | None = field(default=None, repr=False)
    allow_unauthenticated: bool = setting(False, "serve a --host other than loopback without a key (refused otherwise)")
    max_body_bytes: int = setting(1 << 20, "request body size (413 past it; default %(default)s)")
    max_n: int = setting(8, "n and best_of per request (default %(default)s)")
    max_prompts: int = setting(256, "prompts (or conversations) in one request (default %(default)s)")
    max_request_tokens: int = setting(65536, "prompts x n x max_tokens of one request; a missing max_tokens counts as "
                                             "16 on /v1/completions, else as the context (default %(default)s)")
    # Also vLLM's own --max-logprobs (EnsembleConfig.vllm_cli_args).
    max_logprobs: int = setting(20, "logprobs / top_logprobs / prompt_logprobs (default %(default)s)")
    # From the first byte of the body to the last of the answer.
    request_timeout_s: float = setting(300.0, "a request not answered within this is cancelled with a 408 "
                                              "(default %(default)g)")
    instance: str = field(default="", repr=False)  # set by start_app: what this endpoint's /health answers with
    # What a replica is given instead of the key (build_app): Serve stores its replicas' arguments on the Ray cluster.
    api_key_sha256: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return endpoint_url(self.host, self.port)


@dataclass(frozen=True)
class EnsembleConfig:
    """An endpoint: the model directory it serves, under what name, and its three sections."""
    model_dir: str = setting(help="ensemble directory from `pack`, or a plain member directory")
    served_model_name: str | None = setting(None, "served model name (default: the directory's name)")
    engine: EngineSettings = field(default_factory=EngineSettings)
    deployment: DeploymentSettings = field(default_factory=DeploymentSettings)
    http: HttpSettings = field(default_factory=HttpSettings)

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_dir).name

    def check(self) -> None:
        engine, deployment, http = self.engine, self.deployment, self.http
        if not is_loopback(http.host) and not http.api_key and not http.allow_unauthenticated:
            raise ServeError(f"host {http.host} would serve the endpoint beyond this machine to anyone: give an API "
                             f"key, or allow unauthenticated access explicitly (--allow-unauthenticated) if intended")
        read_config(self.model_dir)  # a clear error for a directory that is not a model
        check_weights(self.model_dir)  # a truncated, damaged or corrupt weights file is named before any engine starts
        if engine.draft is not None:
            check_draft(self.model_dir, engine.draft, engine.max_model_len)  # another tokenizer or vocabulary: named
            self.speculative_config()
        if deployment.replicas < 1:
            raise PackError(f"replicas must be >= 1 (got {deployment.replicas})")
        if deployment.max_replicas_per_node is not None and deployment.max_replicas_per_node < 1:
            raise PackError(f"max_replicas_per_node must be >= 1 (got {deployment.max_replicas_per_node})")
        if not 0 < http.port < 65536:
            raise PackError(f"port must be in 1..65535 (got {http.port})")
        for section, name in [(http, "max_body_bytes"), (http, "max_n"), (http, "max_prompts"),
                              (http, "max_request_tokens"), (http, "max_logprobs"),
                              (deployment, "max_queued_requests"), (http, "request_timeout_s")]:
            if not getattr(section, name) > 0:
                raise ServeError(f"{flag_name(name)} must be > 0 (got {getattr(section, name)})")
        if deployment.max_ongoing_requests is not None and deployment.max_ongoing_requests < 1:
            raise ServeError(f"--max-ongoing-requests must be >= 1 (got {deployment.max_ongoing_requests})")

    @property
    def ongoing_requests(self) -> int:
        return self.deployment.max_ongoing_requests or 4 * self.engine.max_num_seqs

    def speculative_config(self) -> dict:
        engine = self.engine
        return speculative_config(engine.draft, engine.num_speculative_tokens, engine.draft_max_batch,
                                  engine.max_num_seqs, engine.draft_sampling)

    def vllm_cli_args(self) -> list[str]:
        """The configuration as `vllm serve` arguments: parsed by vLLM's own parser into its own Namespace.
        Built in the replica, so the dtype is the replica's device's (serve.engine.engine_dtype)."""
        engine = self.engine
        argv = ["--model", str(Path(self.model_dir).resolve()), "--served-model-name", self.model_name,
                "--dtype", engine_dtype(), "--kv-cache-memory-bytes", str(int(engine.kv_cache_gib * (1 << 30))),
                "--max-num-seqs", str(engine.max_num_seqs), "--seed", str(engine.seed),
                "--chat-template", PLAIN_CHAT_TEMPLATE, "--distributed-executor-backend", "mp",
                "--max-logprobs", str(self.http.max_logprobs)]
        if engine.max_model_len:
            argv += ["--max-model-len", str(engine.max_model_len)]
        if engine.draft is not None:
            argv += ["--speculative-config", json.dumps(self.speculative_config())]
        if not engine.compile:
            argv.append("--enforce-eager")
        return argv  # no --api-key: ApiKeyGuard checks every route, and the key stays out of vLLM's args and logs


class ReplicaExit:
    """Stands in for the uvicorn server vLLM's own launcher puts at `app.state.server`.

    vLLM's engine-error handler (and its watchdog) set `server.should_exit` when the engine has died, to stop
    the process; under Ray Serve there is no such server, and without this object that handler itself
    failed (AttributeError: a 500 saying "'State' object has no attribute 'server'"). Here the flag is read
    by the replica's health check instead, so Serve replaces the replica."""

    should_exit = False


class EnsembleServer:
    """One replica: an AsyncLLM on the ensemble and vLLM's OpenAI app over it."""

    async def __init__(self, config: EnsembleConfig):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app as build_vllm_app
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.update(NO_TELEMETRY_ENV)  # no vLLM usage reports, from this engine or its processes
        keep_serve_replica_on_loopback()  # before Serve starts this replica's gRPC server, after this constructor
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(config.vllm_cli_args())
        engine_args = AsyncEngineArgs.from_cli_args(args)
        self.engine = AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER)
        tasks = await self.engine.get_supported_tasks()
        self.openai_app = build_vllm_app(args, tasks, self.engine.model_config)
        await init_app_state(self.engine, self.openai_app.state, args, tasks)
        self.openai_app.state.server = ReplicaExit()  # what vLLM's error path reads; see ReplicaExit
        self.config = config
        self.context = self.engine.model_config.max_model_len

    def __serve_build_asgi_app__(self):
        # Wrapped, not add_middleware: vLLM's app has built its middleware stack by now. The key is checked
        # first, so a caller without it learns nothing about what the body would have been answered; the
        # limits and the time limit come next, before any body is parsed for vLLM.
        http = self.config.http
        app = RequestLimits(TextGuard(self.openai_app), http, self.context)
        return ApiKeyGuard(app, http.api_key_sha256) if http.api_key_sha256 else app

    async def check_health(self) -> None:
        """Serve's health check (every `health_check_period_s`): raising makes Serve replace this replica.

        A dead engine core (killed, crashed, out of memory) leaves this actor alive, answering every request
        with an error; this tells Serve so."""
        if self.openai_app.state.server.should_exit:
            raise RuntimeError("vLLM's error handler asked this replica to exit: its engine is dead")
        await self.engine.check_health()  # raises EngineDeadError once the engine core process is gone

    def __del__(self):
        if hasattr(self, "engine"):
            self.engine.shutdown()


def build_app(config: EnsembleConfig):
    """The Ray Serve application serving `config.model_dir` (bind it with `serve.run`).

    The replicas get the key's sha256, not the key: Serve keeps its replicas' arguments on the Ray cluster."""
    from ray import serve

    config.check()
    if config.http.api_key:
        key_sha256 = hashlib.sha256(config.http.api_key.encode()).hexdigest()
        config = dataclasses.replace(config, http=dataclasses.replace(config.http, api_key=None,
                                                                      api_key_sha256=key_sha256))
    deployment = config.deployment
    app = serve.deployment(
        serve.ingress()(EnsembleServer),
        name="EnsembleServer",
        num_replicas=deployment.replicas,
        max_ongoing_requests=config.ongoing_requests,
        max_queued_requests=deployment.max_queued_requests,  # past it Serve answers 503 "dropped due to backpressure"
        ray_actor_options={"num_cpus": deployment.cpus_per_replica},
        health_check_period_s=10,
        health_check_timeout_s=60,
        **({"max_replicas_per_node": deployment.max_replicas_per_node} if deployment.max_replicas_per_node else {}),
    )
    return app.bind(config)


def endpoint_url(host: str, port: int) -> str:
    """http://HOST:PORT, an IPv6 address in brackets (http://[::1]:8000)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_port_free(host: str, port: int) -> None:
    """Refuse by name a port that another process already listens on (before Serve's proxy would fail to bind
    it, and `wait_healthy` would find the other server answering)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"--host {host}: not an address this machine can bind ({e})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed socket's TIME_WAIT is fine
        try:
            s.bind(address)
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise ServeError(f"port {port} on {host} is already in use by another process: choose another "
                                 f"--port, or stop what listens there") from None
            raise ServeError(f"cannot bind {host}:{port}: {e}") from None


def wait_healthy(url: str, timeout_s: float = 600.0, instance: str | None = None) -> None:
    """Wait until `url`/health answers 200; with `instance`, only from the endpoint that answers with that id
    (x-chorus-instance). A 200 from anything else there is another server on the port: refused by name."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{url}/health", timeout=5)
        except httpx.HTTPError:
            reply = None
        if reply is not None and reply.status_code == 200:
            if instance is None or reply.headers.get(INSTANCE_HEADER.decode()) == instance:
                return
            raise ServeError(f"{url}/health is answered by another server, not by this endpoint: something else "
                             f"listens on that port; choose another --port")
        time.sleep(1)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f} s")


def serve_running() -> bool:
    """Whether Ray Serve already runs on the connected Ray cluster (its controller actor exists)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def start_app(config: EnsembleConfig, address: str | None = None) -> str:
    """Start Ray (local and loopback-only unless `address`), Serve and the app; return the base URL once it answers."""
    import ray
    from ray import serve

    global _started_ray
    config.check()
    if address is None and not ray.is_initialized():
        check_port_free(config.http.host, config.http.port)  # a Ray of our own has no Serve yet: the port must be free
    config = dataclasses.replace(config, http=dataclasses.replace(config.http, instance=secrets.token_hex(8)))
    http = config.http
    started_ray, deployed = connect_ray(address), False
    _started_ray = _started_ray or started_ray
    try:
        if not serve_running():
            check_port_free(http.host, http.port)
        # A loopback address is reachable on its own machine only: one proxy, on the head node (on a cluster of
        # several nodes on one machine, a proxy per node would all bind this one address).
        serve.start(http_options={"host": http.host, "port": http.port,
                                  # Serve's own time limit covers the wait in its queue; the replica's is tighter
                                  "request_timeout_s": http.request_timeout_s + 60},
                    proxy_location="HeadOnly" if is_loopback(http.host) else "EveryNode")
        check_serve_http(http)
        deployed = True  # from here on serve.run may have created the app
        serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
        url = http.url
        wait_healthy(url, instance=http.instance)
    except BaseException:
        # Leave nothing half-started: a later start_app in this process would find this Serve (and its proxy
        # on this port) and wait on a port nobody listens on. What ran before this call is left alone.
        if started_ray:
            stop_app()
        elif deployed:
            serve.delete(APP_NAME)
        raise
    log.info("serving %s as %r at %s/v1", config.model_dir, config.model_name, url)
    return url


def check_serve_http(http: HttpSettings) -> None:
    """Serve keeps the HTTP options it was first started with (and only warns): refuse other ones by name."""
    from ray.serve.context import _get_global_client

    running = _get_global_client().http_config
    if (running.host, running.port) != (http.host, http.port):
        raise ServeError(f"Ray Serve already runs on this Ray cluster with HTTP on {running.host}:{running.port}, "
                         f"not {http.host}:{http.port}: ask for that address, or stop that Serve first "
                         f"(`serve shutdown`)")


def stop_app() -> None:
    """Tear down Serve (replicas and their engines), and Ray if `start_app` started it."""
    import ray
    from ray import serve

    global _started_ray
    if ray.is_initialized():
        serve.shutdown()
    disconnect_ray(_started_ray)
    _started_ray = False
