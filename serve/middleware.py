"""What every request passes on its way to vLLM's app, as ASGI middleware (the order: serve/app.py's
`EnsembleServer.__serve_build_asgi_app__`): the API key (ApiKeyGuard), the endpoint's per-request limits and
time limit (RequestLimits), and text that is valid Unicode (TextGuard). Each answers in vLLM's error shape."""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
from typing import TYPE_CHECKING

from plumbing.config_flags import flag_name

if TYPE_CHECKING:
    from serve.app import HttpSettings

# /health answers with the endpoint's instance id under this header, so `wait_healthy` knows it is this endpoint.
INSTANCE_HEADER = b"x-chorus-instance"


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


def limit_error(status: int, what: str, value, http: HttpSettings, limit: str, param: str | None = None
                ) -> tuple[dict, bytes]:
    bound = getattr(http, limit)
    return error_reply(status, f"{what} ({value}) is over this endpoint's limit of {bound} {limit} "
                               f"(`serve up {flag_name(limit)}` raises it)", param)


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def request_over_limits(path: str, body: dict, http: HttpSettings, context: int) -> tuple[dict, bytes] | None:
    """The 400 for a parsed request body past one of the endpoint's per-request limits; None when within them.

    Fields of the wrong type are left to vLLM's own validation (it answers those with a 400 too)."""
    for key in ("n", "best_of"):
        if (n := _int(body.get(key))) is not None and n > http.max_n:
            return limit_error(400, f"'{key}'", n, http, "max_n", key)
    for key in ("logprobs", "top_logprobs", "prompt_logprobs"):
        if (k := _int(body.get(key))) is not None and (k > http.max_logprobs or k == -1):
            return limit_error(400, f"'{key}'", "-1: the whole vocabulary" if k == -1 else k, http, "max_logprobs", key)
    prompts, field_name = 1, "prompt"
    if path.endswith("/chat/completions/batch") and isinstance(body.get("messages"), list):
        prompts, field_name = len(body["messages"]), "messages"
    elif isinstance(body.get("prompt"), list):
        prompt = body["prompt"]
        field_name = "prompt"
        prompts = 1 if all(_int(t) is not None for t in prompt) else len(prompt)  # token ids are one prompt
    if prompts > http.max_prompts:
        return limit_error(400, f"the number of prompts in '{field_name}'", prompts, http, "max_prompts", field_name)
    tokens_key = next((key for key in ("max_tokens", "max_completion_tokens", "max_output_tokens")
                       if _int(body.get(key)) is not None), None)
    if tokens_key is not None:
        max_tokens = body[tokens_key]
    else:  # vLLM's default: 16 on /v1/completions, else up to the context
        tokens_key = "max_tokens"
        max_tokens = 16 if path.endswith("/completions") and not path.endswith("chat/completions") else context
    n = max(_int(body.get("n")) or 1, _int(body.get("best_of")) or 1)
    if max_tokens > 0 and prompts * n * max_tokens > http.max_request_tokens:
        return limit_error(400, f"the tokens it may generate, prompts x 'n' x '{tokens_key}' = {prompts} x {n} x "
                                f"{max_tokens}", prompts * n * max_tokens, http, "max_request_tokens", tokens_key)
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

    def __init__(self, app, http: HttpSettings, context: int):
        self.app, self.http, self.context = app, http, context

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if scope.get("path", "") == "/health" and self.http.instance:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (INSTANCE_HEADER, self.http.instance.encode())]}
            await send(message)

        timeout = asyncio.timeout(self.http.request_timeout_s)
        try:
            async with timeout:
                await self._handle(scope, receive, tracked_send)
        except TimeoutError:
            if not timeout.expired():
                raise
            message = (f"the request was not answered within this endpoint's limit of {self.http.request_timeout_s:g} "
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
        limit = self.http.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._reply(send, *limit_error(413, "the request body's size in bytes", int(declared), self.http,
                                                 "max_body_bytes"))
            return
        try:
            body = await read_body(receive, limit)
        except BodyTooLarge:
            await self._reply(send, *limit_error(413, "the request body's size in bytes", f"over {limit}",
                                                 self.http, "max_body_bytes"))
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
            if over := request_over_limits(path, parsed, self.http, self.context):
                await self._reply(send, *over)
                return
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)

    @staticmethod
    async def _reply(send, start: dict, body: bytes) -> None:
        await send(start)
        await send({"type": "http.response.body", "body": body})

