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
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from serve.pack import PackError, check_weights, read_config

log = logging.getLogger(__name__)

APP_NAME = "chorus-ensemble"
_started_ray = False  # whether start_app started the Ray it runs on (stop_app then stops it too)
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
    port: int = 8000
    max_model_len: int | None = None  # default: the members' context
    kv_cache_bytes: int = 1 << 30  # per replica; the CPU build needs it explicitly
    max_num_seqs: int = 64
    enforce_eager: bool = True  # CPU: skip torch.compile, start in seconds instead of minutes
    cpus_per_replica: float = 1.0  # what Ray reserves; the engine's own processes do the work
    seed: int = 0

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_dir).name

    def check(self) -> None:
        read_config(self.model_dir)  # a clear error for a directory that is not a model
        check_weights(self.model_dir)  # a truncated, damaged or corrupt weights file is named before any engine starts
        if self.replicas < 1:
            raise PackError(f"replicas must be >= 1 (got {self.replicas})")
        if not 0 < self.port < 65536:
            raise PackError(f"port must be in 1..65535 (got {self.port})")

    def vllm_cli_args(self) -> list[str]:
        """The configuration as `vllm serve` arguments: parsed by vLLM's own parser into its own Namespace."""
        argv = ["--model", str(Path(self.model_dir).resolve()), "--served-model-name", self.model_name,
                "--dtype", "float32", "--kv-cache-memory-bytes", str(self.kv_cache_bytes),
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

        args = make_arg_parser(FlexibleArgumentParser()).parse_args(config.vllm_cli_args())
        engine_args = AsyncEngineArgs.from_cli_args(args)
        self.engine = AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER)
        tasks = await self.engine.get_supported_tasks()
        self.openai_app = build_vllm_app(args, tasks, self.engine.model_config)
        await init_app_state(self.engine, self.openai_app.state, args, tasks)
        self.api_key = config.api_key

    def __serve_build_asgi_app__(self):
        # Wrapped, not add_middleware: vLLM's app has built its middleware stack by now.
        return ApiKeyGuard(self.openai_app, self.api_key) if self.api_key else self.openai_app

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
    """Start Ray (local unless `address`), Serve and the app; return the base URL once it answers."""
    import ray
    from ray import serve

    global _started_ray
    config.check()
    started_ray, deployed = not ray.is_initialized(), False
    if started_ray:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        _started_ray = True
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
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
        if _started_ray:
            ray.shutdown()
            _started_ray = False
