"""The endpoint: a Ray Serve application around vLLM's AsyncLLM and vLLM's own OpenAI server app.

Nothing here speaks the protocol by hand. Each replica starts one AsyncLLM on the ensemble directory and
builds vLLM's FastAPI app over it (the same routes, validation, errors, streaming and API-key middleware
as `python -m vllm.entrypoints.openai.api_server`): /v1/models, /v1/completions, /v1/chat/completions,
/health, ... Ray Serve routes HTTP to the replicas; `EnsembleConfig` is the whole configuration.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from serve.engine import engine_dtype
from serve.pack import PackError, check_weights, read_config
from train.ray_session import connect_ray, disconnect_ray, is_loopback, keep_serve_replica_on_loopback

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


class ServeError(RuntimeError):
    """An endpoint that cannot start as asked (for example Serve already running on another port)."""


@dataclass(frozen=True)
class EnsembleConfig:
    model_dir: str
    served_model_name: str | None = None  # default: the directory's name
    replicas: int = 1
    api_key: str | None = None  # Bearer key required on every route but /health
    host: str = "127.0.0.1"
    allow_unauthenticated: bool = False  # serve a non-loopback host without an API key (refused otherwise)
    port: int = 8000
    max_model_len: int | None = None  # default: the members' context
    kv_cache_bytes: int = 1 << 30  # per replica; the CPU build needs it explicitly
    max_num_seqs: int = 64
    enforce_eager: bool = True  # CPU: skip torch.compile, start in seconds instead of minutes
    cpus_per_replica: float = 1.0  # what Ray reserves; the engine's own processes do the work
    max_replicas_per_node: int | None = None  # on a cluster, 1 puts every replica on its own node
    seed: int = 0

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_dir).name

    def check(self) -> None:
        if not is_loopback(self.host) and not self.api_key and not self.allow_unauthenticated:
            raise ServeError(f"host {self.host} would serve the endpoint beyond this machine to anyone: give an API "
                             f"key, or allow unauthenticated access explicitly (--allow-unauthenticated) if intended")
        read_config(self.model_dir)  # a clear error for a directory that is not a model
        check_weights(self.model_dir)  # a truncated, damaged or corrupt weights file is named before any engine starts
        if self.replicas < 1:
            raise PackError(f"replicas must be >= 1 (got {self.replicas})")
        if self.max_replicas_per_node is not None and self.max_replicas_per_node < 1:
            raise PackError(f"max_replicas_per_node must be >= 1 (got {self.max_replicas_per_node})")
        if not 0 < self.port < 65536:
            raise PackError(f"port must be in 1..65535 (got {self.port})")

    def vllm_cli_args(self) -> list[str]:
        """The configuration as `vllm serve` arguments: parsed by vLLM's own parser into its own Namespace.
        Built in the replica, so the dtype is the replica's device's (serve.engine.engine_dtype)."""
        argv = ["--model", str(Path(self.model_dir).resolve()), "--served-model-name", self.model_name,
                "--dtype", engine_dtype(), "--kv-cache-memory-bytes", str(self.kv_cache_bytes),
                "--max-num-seqs", str(self.max_num_seqs), "--seed", str(self.seed),
                "--chat-template", PLAIN_CHAT_TEMPLATE, "--distributed-executor-backend", "mp"]
        if self.max_model_len:
            argv += ["--max-model-len", str(self.max_model_len)]
        if self.enforce_eager:
            argv.append("--enforce-eager")
        if self.api_key:
            argv += ["--api-key", self.api_key]
        return argv


class ApiKeyGuard:
    """ASGI middleware: with an API key set, every route but /health needs 'Authorization: Bearer KEY'.

    vLLM's own check guards only paths under /v1, /v2, /inference and /cohere; its app also serves
    /invocations and /generative_scoring (inference), /tokenize, /metrics, /scale_elastic_ep, /docs, ...
    which would otherwise answer anyone who can connect. CORS preflights (OPTIONS) pass, as in vLLM."""

    open_paths = ("/health",)

    def __init__(self, app, api_key: str):
        self.app = app
        self.key_sha256 = hashlib.sha256(api_key.encode()).digest()

    def authorized(self, scope) -> bool:
        scheme, _, key = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        # Compare digests, in constant time: the key's length does not leak either.
        return scheme.lower() == b"bearer" and secrets.compare_digest(hashlib.sha256(key).digest(), self.key_sha256)

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if (scope["type"] == "http" and scope["method"] != "OPTIONS" or scope["type"] == "websocket") \
                and path not in self.open_paths and not self.authorized(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = json.dumps({"error": {"message": "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                         "type": "Unauthorized", "param": None, "code": 401}}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def error_reply(status: int, message: str, param: str | None = None) -> tuple[dict, bytes]:
    """An ASGI response start and body in vLLM's error shape: {"error": {"message", "type", "param", "code"}}."""
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": param,
                                 "code": status}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, body


def lone_surrogate_field(value, path: str = "") -> str | None:
    """The path (e.g. `stop[1]`, `messages[0].content`, `logit_bias` for a key) of the first string or object
    key in a parsed JSON value that holds a lone UTF-16 surrogate; None when every string is valid Unicode."""
    if isinstance(value, str):
        return (path or "(the body)") if _LONE_SURROGATE.search(value) else None
    items = enumerate(value) if isinstance(value, list) else value.items() if isinstance(value, dict) else ()
    for key, item in items:
        if isinstance(key, str) and _LONE_SURROGATE.search(key):
            return path or "(the body)"  # a key of this object: the object is the field to name
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        if found := lone_surrogate_field(item, where):
            return found
    return None


# After json.loads a surrogate pair is one character, so any surrogate left is a lone one.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# A JSON body can only carry a surrogate as a \\uD800-\\uDFFF escape (raw surrogate bytes are not UTF-8).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class TextGuard:
    """ASGI middleware: a JSON request holding a lone UTF-16 surrogate (`"\\ud800"`) in any string field of any
    route gets a 400 that names the field, before vLLM sees it.

    Such a string is valid JSON but not text: it cannot be encoded, so vLLM's tokenizer, stop-string and
    bad-words handling fail on it deep inside the engine's input path, as a 500 (or, streaming, as a 200
    with an error event). Only bodies that contain a surrogate escape are parsed here; every other request
    passes untouched (its body replayed as it came)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all: the app sees that
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if _SURROGATE_ESCAPE.search(body):
            try:
                field = lone_surrogate_field(json.loads(body))
            except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past Python's stack: vLLM's
                field = None  # own parser answers those with a 400
            if field:
                start, reply = error_reply(400, f"field '{field}' holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF "
                                                f"escape without its pair), which is not text: send valid Unicode", field)
                await send(start)
                await send({"type": "http.response.body", "body": reply})
                return
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _replay(first: list[dict], receive):
    """An ASGI `receive` that gives the messages already read (`first`) before reading on."""
    pending = list(first)

    async def replay():
        return pending.pop(0) if pending else await receive()

    return replay


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

        keep_serve_replica_on_loopback()  # before Serve starts this replica's gRPC server, after this constructor
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(config.vllm_cli_args())
        engine_args = AsyncEngineArgs.from_cli_args(args)
        self.engine = AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER)
        tasks = await self.engine.get_supported_tasks()
        self.openai_app = build_vllm_app(args, tasks, self.engine.model_config)
        await init_app_state(self.engine, self.openai_app.state, args, tasks)
        self.openai_app.state.server = ReplicaExit()  # what vLLM's error path reads; see ReplicaExit
        self.api_key = config.api_key

    def __serve_build_asgi_app__(self):
        # Wrapped, not add_middleware: vLLM's app has built its middleware stack by now. The key is checked
        # first, so a caller without it learns nothing about what the body would have been answered.
        app = TextGuard(self.openai_app)
        return ApiKeyGuard(app, self.api_key) if self.api_key else app

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
    """The Ray Serve application serving `config.model_dir` (bind it with `serve.run`)."""
    from ray import serve

    config.check()
    deployment = serve.deployment(
        serve.ingress()(EnsembleServer),
        name="EnsembleServer",
        num_replicas=config.replicas,
        max_ongoing_requests=4 * config.max_num_seqs,
        ray_actor_options={"num_cpus": config.cpus_per_replica},
        health_check_period_s=10,
        health_check_timeout_s=60,
        **({"max_replicas_per_node": config.max_replicas_per_node} if config.max_replicas_per_node else {}),
    )
    return deployment.bind(config)


def wait_healthy(url: str, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f} s")


def start_app(config: EnsembleConfig, address: str | None = None) -> str:
    """Start Ray (local and loopback-only unless `address`), Serve and the app; return the base URL once it answers."""
    from ray import serve

    global _started_ray
    config.check()
    started_ray, deployed = connect_ray(address), False
    _started_ray = _started_ray or started_ray
    try:
        # A loopback address is reachable on its own machine only: one proxy, on the head node (on a cluster of
        # several nodes on one machine, a proxy per node would all bind this one address).
        serve.start(http_options={"host": config.host, "port": config.port},
                    proxy_location="HeadOnly" if is_loopback(config.host) else "EveryNode")
        check_serve_http(config)
        deployed = True  # from here on serve.run may have created the app
        serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{config.host}:{config.port}"
        wait_healthy(url)
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


def check_serve_http(config: EnsembleConfig) -> None:
    """Serve keeps the HTTP options it was first started with (and only warns): refuse other ones by name."""
    from ray.serve.context import _get_global_client

    running = _get_global_client().http_config
    if (running.host, running.port) != (config.host, config.port):
        raise ServeError(f"Ray Serve already runs on this Ray cluster with HTTP on {running.host}:{running.port}, "
                         f"not {config.host}:{config.port}: ask for that address, or stop that Serve first "
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
