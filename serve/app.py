"""The endpoint: a Ray Serve application around vLLM's AsyncLLM and vLLM's own OpenAI server app.

Nothing here speaks the protocol by hand. Each replica starts one AsyncLLM on the ensemble directory and
builds vLLM's FastAPI app over it (the same routes, validation, errors, streaming and API-key middleware
as `python -m vllm.entrypoints.openai.api_server`): /v1/models, /v1/completions, /v1/chat/completions,
/health, ... Ray Serve routes HTTP to the replicas; `EnsembleConfig` is the whole configuration.
"""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from serve.draft import check_draft, speculative_config
from serve.engine import engine_dtype
from serve.pack import PackError, check_weights, read_config
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


# What one request may ask for, and how long it may take (README, "Endpoint limits"). Each has a `serve up` flag.
LIMIT_FLAGS = {"max_body_bytes": "--max-body-bytes", "max_n": "--max-n", "max_prompts": "--max-prompts",
               "max_request_tokens": "--max-request-tokens", "max_logprobs": "--max-logprobs",
               "request_timeout_s": "--request-timeout-s", "max_ongoing_requests": "--max-ongoing-requests",
               "max_queued_requests": "--max-queued-requests"}


@dataclass(frozen=True)
class EnsembleConfig:
    model_dir: str
    served_model_name: str | None = None  # default: the directory's name
    replicas: int = 1
    api_key: str | None = field(default=None, repr=False)  # Bearer key required on every route but /health (never printed)
    host: str = "127.0.0.1"
    allow_unauthenticated: bool = False  # serve a non-loopback host without an API key (refused otherwise)
    port: int = 8000
    max_model_len: int | None = None  # default: the members' context
    # Speculative decoding (serve/draft.py): a small model sharing the tokenizer drafts, the ensemble verifies.
    draft: str | None = None  # draft model directory (the distilled student); None: no speculation
    num_speculative_tokens: int = 4  # tokens the draft proposes per step
    draft_max_batch: int | None = None  # speculate only while at most this many sequences run (None: always)
    draft_sampling: str = "greedy"  # or "probabilistic" (more accepted when sampling; request seeds not honoured)
    kv_cache_bytes: int = 1 << 30  # per replica; the CPU build needs it explicitly
    max_num_seqs: int = 64
    enforce_eager: bool = True  # CPU: skip torch.compile, start in seconds instead of minutes
    cpus_per_replica: float = 1.0  # what Ray reserves; the engine's own processes do the work
    max_replicas_per_node: int | None = None  # on a cluster, 1 puts every replica on its own node
    seed: int = 0
    # Limits of one request (4xx past them, naming the limit and its flag) and of the queue (503 past it).
    max_body_bytes: int = 1 << 20  # request body (413 past it)
    max_n: int = 8  # n and best_of: completions per prompt
    max_prompts: int = 256  # prompts (or conversations) in one request
    max_request_tokens: int = 65536  # prompts x n x max_tokens (max_tokens absent: 16 for completions, else the context)
    max_logprobs: int = 20  # logprobs, top_logprobs, prompt_logprobs (vLLM's own --max-logprobs too)
    request_timeout_s: float = 300.0  # from the first byte of the body to the last of the answer (408 past it)
    max_ongoing_requests: int | None = None  # per replica (default 4 x max_num_seqs); more wait in Serve's queue
    max_queued_requests: int = 1024  # waiting in Serve's queue (per proxy); past it a 503 "dropped due to backpressure"
    instance: str = field(default="", repr=False)  # set by start_app: what this endpoint's /health answers with
    # What a replica is given instead of the key (build_app): Serve stores its replicas' arguments on the Ray cluster.
    api_key_sha256: str | None = field(default=None, repr=False)

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_dir).name

    def check(self) -> None:
        if not is_loopback(self.host) and not self.api_key and not self.allow_unauthenticated:
            raise ServeError(f"host {self.host} would serve the endpoint beyond this machine to anyone: give an API "
                             f"key, or allow unauthenticated access explicitly (--allow-unauthenticated) if intended")
        read_config(self.model_dir)  # a clear error for a directory that is not a model
        check_weights(self.model_dir)  # a truncated, damaged or corrupt weights file is named before any engine starts
        if self.draft is not None:
            check_draft(self.model_dir, self.draft, self.max_model_len)  # another tokenizer or vocabulary: named
            speculative_config(self.draft, self.num_speculative_tokens, self.draft_max_batch, self.max_num_seqs,
                               self.draft_sampling)
        if self.replicas < 1:
            raise PackError(f"replicas must be >= 1 (got {self.replicas})")
        if self.max_replicas_per_node is not None and self.max_replicas_per_node < 1:
            raise PackError(f"max_replicas_per_node must be >= 1 (got {self.max_replicas_per_node})")
        if not 0 < self.port < 65536:
            raise PackError(f"port must be in 1..65535 (got {self.port})")
        for name in ("max_body_bytes", "max_n", "max_prompts", "max_request_tokens", "max_logprobs",
                     "max_queued_requests", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ServeError(f"{LIMIT_FLAGS[name]} must be > 0 (got {getattr(self, name)})")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise ServeError(f"--max-ongoing-requests must be >= 1 (got {self.max_ongoing_requests})")

    @property
    def ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 4 * self.max_num_seqs

    @property
    def url(self) -> str:
        return endpoint_url(self.host, self.port)

    def vllm_cli_args(self) -> list[str]:
        """The configuration as `vllm serve` arguments: parsed by vLLM's own parser into its own Namespace.
        Built in the replica, so the dtype is the replica's device's (serve.engine.engine_dtype)."""
        argv = ["--model", str(Path(self.model_dir).resolve()), "--served-model-name", self.model_name,
                "--dtype", engine_dtype(), "--kv-cache-memory-bytes", str(self.kv_cache_bytes),
                "--max-num-seqs", str(self.max_num_seqs), "--seed", str(self.seed),
                "--chat-template", PLAIN_CHAT_TEMPLATE, "--distributed-executor-backend", "mp",
                "--max-logprobs", str(self.max_logprobs)]
        if self.max_model_len:
            argv += ["--max-model-len", str(self.max_model_len)]
        if self.draft is not None:
            argv += ["--speculative-config", json.dumps(speculative_config(
                self.draft, self.num_speculative_tokens, self.draft_max_batch, self.max_num_seqs, self.draft_sampling))]
        if self.enforce_eager:
            argv.append("--enforce-eager")
        return argv  # no --api-key: ApiKeyGuard checks every route, and the key stays out of vLLM's args and logs


class ApiKeyGuard:
    """ASGI middleware: with an API key set, every route but /health needs 'Authorization: Bearer KEY'.

    vLLM's own check guards only paths under /v1, /v2, /inference and /cohere; its app also serves
    /invocations and /generative_scoring (inference), /tokenize, /metrics, /scale_elastic_ep, /docs, ...
    which would otherwise answer anyone who can connect. CORS preflights (OPTIONS) pass, as in vLLM."""

    open_paths = ("/health",)

    def __init__(self, app, api_key_sha256: str):
        self.app = app
        self.key_sha256 = bytes.fromhex(api_key_sha256)

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
        body = await read_body(receive)
        if isinstance(body, dict):  # the client left before sending it all: the app sees that
            await self.app(scope, _replay([body], receive), send)
            return
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


class BodyTooLarge(Exception):
    """A request body past the endpoint's max_body_bytes (read_body stops reading there)."""


async def read_body(receive, limit: int | None = None) -> bytes | dict:
    """A request's whole body from ASGI `receive`; or, when the client left before sending it all, the message
    that said so (to replay to the app); BodyTooLarge as soon as more than `limit` bytes have come."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return message
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if limit is not None and size > limit:
            raise BodyTooLarge
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(first: list[dict], receive):
    """An ASGI `receive` that gives the messages already read (`first`) before reading on."""
    pending = list(first)

    async def replay():
        return pending.pop(0) if pending else await receive()

    return replay


INSTANCE_HEADER = b"x-chorus-instance"


def limit_error(status: int, what: str, value, config: "EnsembleConfig", limit: str, param: str | None = None
                ) -> tuple[dict, bytes]:
    bound = getattr(config, limit)
    return error_reply(status, f"{what} ({value}) is over this endpoint's limit of {bound} {limit} "
                               f"(`serve up {LIMIT_FLAGS[limit]}` raises it)", param)


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def request_over_limits(path: str, body: dict, config: "EnsembleConfig", context: int) -> tuple[dict, bytes] | None:
    """The 400 for a parsed request body past one of the endpoint's per-request limits; None when within them.

    Fields of the wrong type are left to vLLM's own validation (it answers those with a 400 too)."""
    for key in ("n", "best_of"):
        if (n := _int(body.get(key))) is not None and n > config.max_n:
            return limit_error(400, f"'{key}'", n, config, "max_n", key)
    for key in ("logprobs", "top_logprobs", "prompt_logprobs"):
        if (k := _int(body.get(key))) is not None and (k > config.max_logprobs or k == -1):
            return limit_error(400, f"'{key}'", "-1: the whole vocabulary" if k == -1 else k, config, "max_logprobs", key)
    prompts, field_name = 1, "prompt"
    if path.endswith("/chat/completions/batch") and isinstance(body.get("messages"), list):
        prompts, field_name = len(body["messages"]), "messages"
    elif isinstance(body.get("prompt"), list):
        prompt = body["prompt"]
        field_name = "prompt"
        prompts = 1 if all(_int(t) is not None for t in prompt) else len(prompt)  # token ids are one prompt
    if prompts > config.max_prompts:
        return limit_error(400, f"the number of prompts in '{field_name}'", prompts, config, "max_prompts", field_name)
    tokens_key = next((key for key in ("max_tokens", "max_completion_tokens", "max_output_tokens")
                       if _int(body.get(key)) is not None), None)
    if tokens_key is not None:
        max_tokens = body[tokens_key]
    else:  # vLLM's default: 16 on /v1/completions, else up to the context
        tokens_key = "max_tokens"
        max_tokens = 16 if path.endswith("/completions") and not path.endswith("chat/completions") else context
    n = max(_int(body.get("n")) or 1, _int(body.get("best_of")) or 1)
    if max_tokens > 0 and prompts * n * max_tokens > config.max_request_tokens:
        return limit_error(400, f"the tokens it may generate, prompts x 'n' x '{tokens_key}' = {prompts} x {n} x "
                                f"{max_tokens}", prompts * n * max_tokens, config, "max_request_tokens", tokens_key)
    return None


class RequestLimits:
    """ASGI middleware: the endpoint's per-request limits, before vLLM sees the request, and its time limit.

    - a body over `max_body_bytes` gets a 413 (judged by Content-Length when sent, else while reading);
    - a JSON body asking for more than `max_n`, `max_prompts`, `max_request_tokens` or `max_logprobs` gets a
      400 that names the field, the limit and the `serve up` flag that raises it;
    - a request not answered in full within `request_timeout_s` (body read included, so a client that sends
      its body slowly is cut off too) is cancelled, which aborts it in vLLM; it gets a 408, or, when streaming
      has begun, a last `data: {"error": ...}` event. Ray Serve's own timeout can be lifted by a client header
      (x-request-timeout-seconds: 0); this one cannot.
    /health answers with this endpoint's instance id (`x-chorus-instance`), so `wait_healthy` knows it is us."""

    def __init__(self, app, config: "EnsembleConfig", context: int):
        self.app, self.config, self.context = app, config, context

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if scope.get("path", "") == "/health" and self.config.instance:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (INSTANCE_HEADER, self.config.instance.encode())]}
            await send(message)

        timeout = asyncio.timeout(self.config.request_timeout_s)
        try:
            async with timeout:
                await self._handle(scope, receive, tracked_send)
        except TimeoutError:
            if not timeout.expired():
                raise
            message = (f"the request was not answered within this endpoint's limit of {self.config.request_timeout_s:g} "
                       f"s request_timeout_s (`serve up --request-timeout-s` raises it); it was cancelled")
            if not started:
                start, body = error_reply(408, message)
                await send(start)
                await send({"type": "http.response.body", "body": body})
            else:  # a stream: its status is sent already; end it with an error event a client can read
                event = json.dumps({"error": {"message": message, "type": "RequestTimeout", "code": 408}})
                await send({"type": "http.response.body", "body": f"data: {event}\n\n".encode(), "more_body": False})

    async def _handle(self, scope, receive, send):
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.config.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._reply(send, *limit_error(413, "the request body's size in bytes", int(declared), self.config,
                                                 "max_body_bytes"))
            return
        try:
            body = await read_body(receive, limit)
        except BodyTooLarge:
            await self._reply(send, *limit_error(413, "the request body's size in bytes", f"over {limit}",
                                                 self.config, "max_body_bytes"))
            return
        if isinstance(body, dict):  # the client left before sending it all: the app sees that
            await self.app(scope, _replay([body], receive), send)
            return
        try:
            parsed = json.loads(body) if body else None
        except (ValueError, RecursionError):  # not JSON: vLLM's own parser answers with a 400
            parsed = None
        if isinstance(parsed, dict):
            path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
            if over := request_over_limits(path, parsed, self.config, self.context):
                await self._reply(send, *over)
                return
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)

    @staticmethod
    async def _reply(send, start: dict, body: bytes) -> None:
        await send(start)
        await send({"type": "http.response.body", "body": body})


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
        app = RequestLimits(TextGuard(self.openai_app), self.config, self.context)
        return ApiKeyGuard(app, self.config.api_key_sha256) if self.config.api_key_sha256 else app

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
    if config.api_key:
        config = dataclasses.replace(config, api_key=None,
                                     api_key_sha256=hashlib.sha256(config.api_key.encode()).hexdigest())
    deployment = serve.deployment(
        serve.ingress()(EnsembleServer),
        name="EnsembleServer",
        num_replicas=config.replicas,
        max_ongoing_requests=config.ongoing_requests,
        max_queued_requests=config.max_queued_requests,  # past it Serve answers 503 "dropped due to backpressure"
        ray_actor_options={"num_cpus": config.cpus_per_replica},
        health_check_period_s=10,
        health_check_timeout_s=60,
        **({"max_replicas_per_node": config.max_replicas_per_node} if config.max_replicas_per_node else {}),
    )
    return deployment.bind(config)


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
        check_port_free(config.host, config.port)  # a Ray of our own has no Serve yet: the port must be free
    config = dataclasses.replace(config, instance=secrets.token_hex(8))
    started_ray, deployed = connect_ray(address), False
    _started_ray = _started_ray or started_ray
    try:
        if not serve_running():
            check_port_free(config.host, config.port)
        # A loopback address is reachable on its own machine only: one proxy, on the head node (on a cluster of
        # several nodes on one machine, a proxy per node would all bind this one address).
        serve.start(http_options={"host": config.host, "port": config.port,
                                  # Serve's own time limit covers the wait in its queue; the replica's is tighter
                                  "request_timeout_s": config.request_timeout_s + 60},
                    proxy_location="HeadOnly" if is_loopback(config.host) else "EveryNode")
        check_serve_http(config)
        deployed = True  # from here on serve.run may have created the app
        serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
        url = config.url
        wait_healthy(url, instance=config.instance)
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
