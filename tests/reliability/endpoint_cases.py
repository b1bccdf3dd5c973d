"""Malformed and hostile requests for the ensemble endpoint, as data: what is sent and what must come back.

Each case is one HTTP request. `expect` is the status class the server must answer with: "4xx" (any client
error; a 401 where the case is about the key, 404 for an unknown model or route) or "ok" (odd but valid input,
e.g. NUL or right-to-left marks in a prompt, which the server must serve, not reject or crash on) or "any<500"
(loose input vLLM's request models coerce or clamp, e.g. "echo": "yes" or top_k 2**63: anything but a 5xx).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes | None
    path: str = "/v1/completions"
    method: str = "POST"
    expect: str | int = "4xx"  # "4xx", "ok", or an exact status
    headers: dict = field(default_factory=dict)  # replaces the default (key + JSON content type) when given
    keyed: bool = False  # with `headers`: send the API key too (the case is about the body, not the key)
    names: str | None = None  # a field the error message must name


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def completion_cases(model: str) -> list[Case]:
    good = {"model": model, "prompt": "The history of", "max_tokens": 2}
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    cases: list[Case] = []

    def with_field(key, value, expect="4xx", path="/v1/completions", base=good):
        cases.append(Case(f"{path} {key}={value!r}"[:120], _json({**base, key: value}), path=path, expect=expect))

    # Not JSON, or JSON that is not a request object.
    for raw in [b"", b"{", b"{not json", b'{"model": ', b"{'model': 'x'}", b'{"model": "x",}', b"null", b"[]",
                b"123", b'"just a string"', b"true", b"\xff\xfe\x00", b'{"model": "\xff\xfe", "prompt": "a"}',
                b'{"prompt": "a\xc3"}', b"\x00" * 64, b"[" * 50_000 + b"]" * 50_000,
                b'{"model": "m", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                b'{"model": 1e999999, "prompt": "a"}', b'{"a": ' * 2000 + b"1" + b"}" * 2000,
                b'{"model": "x", "prompt": "a", "max_tokens": 1, "max_tokens": -1}']:
        cases.append(Case(f"raw body {raw[:40]!r}", raw))
    cases.append(Case("no body at all", None))
    # With the key, so that it reaches the server's parser (without, it would stop at the 401).
    cases.append(Case("JSON body sent as text/plain", _json(good), headers={"Content-Type": "text/plain"}, keyed=True,
                      expect="any<500"))

    # Required fields missing, wrong types.
    cases.append(Case("no prompt", _json({"model": model})))
    cases.append(Case("empty object", b"{}"))
    for value in [5, 3.5, True, None, {"text": "a"}, [], [1, "a"], [[1, 2], "a"], [{"a": 1}], [[[1]]],
                  [None], [1.5], [[1.5]]]:
        with_field("prompt", value)
    for key, values in {
        "max_tokens": ["many", [1], {"n": 1}, 1.5, -1, -(2**63), 2**63, 2**64, 10**6, 1e300, float("inf")],
        "temperature": ["hot", [0], -1, -1e-9, 2.5, 1e308, float("nan"), float("inf"), -float("inf")],
        "top_p": ["all", -0.5, 0, 1.5, float("nan"), 1e308],
        "top_k": ["k", -5, 1.5],
        "min_p": [-1, 2, "x"],
        "n": ["two", 0, -1, 10**9, 2**63, 1.5],
        "logprobs": ["3", 1.5, [1], 21, 10**6, -2, 2**63],
        "prompt_logprobs": [-5, 10**6, "x"],
        "echo": ["maybe", [True], {"a": 1}],
        "stream": ["maybe", [1], 2],
        "stop": [5, [1, 2], {"a": "b"}, ["x"] * 10_000],
        "stop_token_ids": ["x", [-1], [10**12]],
        "seed": ["s", 2**70, -(2**70), 1.5],
        "presence_penalty": [1e9, -1e9, "x", float("nan")],
        "frequency_penalty": [1e9, -3, "x"],
        "repetition_penalty": [0, -1, "x"],
        "min_tokens": [-1, 10, "x"],
        "logit_bias": ["x", {"999999": 1}, {"-1": 1}, {"a": 1}, {"1": "x"}],
        "suffix": [5],
        "user": [5, {"a": 1}],
        "response_format": ["x", {"type": "nope"}],
        "truncate_prompt_tokens": [-5, "x", 10**9],
        "allowed_token_ids": [[-1], [10**9], "x"],
    }.items():
        for value in values:
            with_field(key, value)

    # Unicode edge cases. Lone surrogates cannot be encoded as text: refused. Valid oddities must be served.
    for prompt in ["\ud800", "\udfff", "a\udc80b", "\ud83d"]:
        cases.append(Case(f"lone surrogate {prompt!r}", _json({**good, "prompt": prompt})))
    for prompt in ["a\x00b", "\x00", "\u202eevil\u202c", "\u200f\u05e9\u05dc\u05d5\u05dd", "\ufeffBOM", "e\u0301" * 20,
                   "\U0001f600\U0001f4a9", "\u200b" * 30, "\uffff\ufffe", "tab\tnew\nline\r", "\x1b[31mred",
                   "\u0000\u0001\u0002\u007f", "😀" * 30, "中文字符测试"]:
        cases.append(Case(f"odd but valid prompt {prompt[:12]!r}", _json({**good, "prompt": prompt}), expect="ok"))

    # Prompts over the context (128 tokens), as text and as token ids; prompt + max_tokens over the context.
    cases.append(Case("text prompt over the context", _json({**good, "prompt": "word " * 400})))
    cases.append(Case("4 MB prompt", _json({**good, "prompt": "lorem ipsum " * 350_000})))
    cases.append(Case("token prompt over the context", _json({**good, "prompt": [5] * 200})))
    cases.append(Case("token prompt of 129", _json({**good, "prompt": [5] * 129})))
    cases.append(Case("batch with one prompt over the context", _json({**good, "prompt": ["a", "word " * 400]})))
    cases.append(Case("token ids out of vocabulary", _json({**good, "prompt": [[10**9]]})))
    cases.append(Case("negative token id", _json({**good, "prompt": [1, -1, 2]})))
    cases.append(Case("token id past int64", _json({**good, "prompt": [2**64]})))

    # Loose but harmless input that vLLM's request models coerce, clamp or default: served, never a crash.
    for key, value in [("prompt", [""]), ("prompt", [True]), ("top_k", 2**63), ("best_of", -1), ("best_of", "x"),
                       ("echo", "yes"), ("stream", "yes"), ("repetition_penalty", 1e9), ("logit_bias", {"1": 1e308}),
                       ("model", "")]:
        with_field(key, value, expect="any<500")
    cases.append(Case("prompt + max_tokens over the context (max_tokens is cut to fit)",
                      _json({**good, "prompt": [5] * 100, "max_tokens": 100}), expect="ok"))
    for key, value in [("model", None), ("messages", [{"role": "user"}]), ("messages", [{"role": "wizard", "content": "x"}])]:
        with_field(key, value, expect="any<500", path="/v1/chat/completions", base=chat)

    # Unknown models (404), including hostile names.
    for name in ["no-such-model", "../../etc/passwd", "/tmp", "x" * 100_000, "\u202e" + model, model + "\x00",
                 model.upper(), " " + model]:
        cases.append(Case(f"unknown model {name[:30]!r}", _json({**good, "model": name}), expect=404))

    # Huge batches.
    # Past the endpoint's limits (serve/app.py RequestLimits): the message names the field.
    cases.append(Case("10000 prompts", _json({**good, "prompt": ["a"] * 10_000}), names="prompt"))
    cases.append(Case("1025 prompts", _json({**good, "prompt": ["a"] * 1025}), names="prompt"))
    cases.append(Case("5000 token-id prompts", _json({**good, "prompt": [[5, 6]] * 5000}), names="prompt"))
    cases.append(Case("n past the limit", _json({**good, "n": 10**6}), names="n"))
    cases.append(Case("n just past the default limit", _json({**good, "n": 9}), names="n"))
    cases.append(Case("n at the default limit", _json({**good, "n": 8}), expect="ok"))
    cases.append(Case("prompts x max_tokens past the default limit", _json({**good, "prompt": ["a"] * 256,
                                                                          "max_tokens": 257}), names="max_tokens"))
    cases.append(Case("logprobs -1 (the whole vocabulary)", _json({**good, "logprobs": -1}), names="logprobs"))
    cases.append(Case("prompt_logprobs -1 (the whole vocabulary)", _json({**good, "prompt_logprobs": -1}),
                      names="prompt_logprobs"))
    cases.append(Case("2 MB body", _json({**good, "prompt": "a" * (2 << 20)}), expect=413))

    # Chat.
    for key, values in {
        "messages": ["hi", [], [{"content": "x"}], [{"role": "user", "content": 5}], [None], [{"role": "user", "content": "\ud800"}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
                     [{"role": "user", "content": "word " * 400}]],
        "max_tokens": [-1, "x", 10**6], "max_completion_tokens": [-1, 10**6],
        "top_logprobs": [100, -1], "logprobs": ["x"], "n": [0, 10**9], "temperature": [-1],
        "tools": ["x", [{"type": "function"}]], "tool_choice": [5, "sometimes"], "model": [7],
    }.items():
        for value in values:
            with_field(key, value, path="/v1/chat/completions", base=chat)
    cases.append(Case("chat unknown model", _json({**chat, "model": "nope"}), path="/v1/chat/completions", expect=404))

    # Other routes of the app, fed garbage.
    for path in ["/tokenize", "/detokenize", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
                 "/invocations", "/generative_scoring", "/v1/chat/completions/batch"]:
        for raw in [b"{not json", b"{}", b'{"model": 5}', _json({"model": model, "tokens": ["x"]})]:
            cases.append(Case(f"{path} {raw[:30]!r}", raw, path=path))
    cases.append(Case("wrong method on completions", None, method="GET", expect=405))
    cases.append(Case("unknown route", _json(good), path="/v1/nothing-here", expect=404))
    return cases


def auth_cases(key: str, model: str) -> list[Case]:
    """Missing or wrong keys on the inference routes (every route but /health is covered by another test)."""
    body = _json({"model": model, "prompt": "a", "max_tokens": 1})
    headers = [{}, {"Authorization": ""}, {"Authorization": "Bearer"},
               {"Authorization": f"Bearer {key}x"}, {"Authorization": f"Bearer  {key}"}, {"Authorization": f"Basic {key}"},
               {"Authorization": key}, {"Authorization": f"Bearer {key[:-1]}"}, {"Authorization": "Bearer " + "k" * 10_000},
               {"X-Api-Key": key}, {"Authorization": f"Bearer {key}\u00e9".encode()}]
    cases = []
    for path in ["/v1/completions", "/v1/chat/completions", "/invocations", "/generative_scoring", "/tokenize"]:
        for h in headers:
            cases.append(Case(f"{path} auth {h!r}"[:100], body, path=path, expect=401,
                              headers={"Content-Type": "application/json", **h}))
    return cases


LONE = "\ud800"  # a lone high surrogate: valid JSON ("\\ud800"), not text


def surrogate_cases(model: str) -> list[Case]:
    """A lone UTF-16 surrogate in every kind of string field of every inference route, streaming or not: each
    must get a 4xx whose message names the field (never a 5xx, nor a 200 with an error inside the stream)."""
    completion = {"model": model, "prompt": "The history of", "max_tokens": 2}
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    cases: list[Case] = []

    def case(path: str, base: dict, name: str, changes: dict) -> None:
        body = {**base, **changes}
        cases.append(Case(f"{path} lone surrogate in {name}{' (stream)' if body.get('stream') else ''}",
                          _json(body), path=path, names=name))

    for stream in (False, True):
        s = {"stream": True} if stream else {}
        for path in ("/v1/completions", "/invocations"):
            case(path, completion, "stop", {"stop": LONE, **s})
            case(path, completion, "stop[1]", {"stop": ["a", LONE], **s})
            case(path, completion, "bad_words[0]", {"bad_words": [LONE], **s})
        case("/v1/completions", completion, "prompt[1]", {"prompt": ["a", LONE], **s})
        case("/v1/completions", completion, "suffix", {"suffix": LONE, **s})
        case("/v1/completions", completion, "user", {"user": LONE, **s})
        case("/v1/chat/completions", chat, "stop", {"stop": LONE, **s})
        case("/v1/chat/completions", chat, "bad_words[0]", {"bad_words": [LONE], **s})
        case("/v1/chat/completions", chat, "messages[0].content", {"messages": [{"role": "user", "content": LONE}], **s})
    case("/v1/completions", completion, "model", {"model": LONE})
    case("/v1/completions", completion, "logit_bias", {"logit_bias": {LONE: 1}})
    case("/v1/completions", completion, "structured_outputs.regex", {"structured_outputs": {"regex": LONE}})
    case("/v1/completions", completion, "response_format.json_schema.name",
         {"response_format": {"type": "json_schema", "json_schema": {"name": LONE, "schema": {}}}})
    case("/v1/chat/completions", chat, "messages[0].name", {"messages": [{"role": "user", "content": "Hi", "name": LONE}]})
    case("/v1/chat/completions", chat, "messages[0].content[0].text",
         {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]})
    case("/v1/chat/completions", chat, "user", {"user": LONE})
    case("/v1/chat/completions", chat, "chat_template", {"chat_template": LONE})
    case("/v1/chat/completions", chat, "tools[0].function.name",
         {"tools": [{"type": "function", "function": {"name": LONE, "parameters": {}}}]})
    case("/tokenize", {"model": model}, "prompt", {"prompt": LONE})
    case("/tokenize", {"model": model}, "messages[0].content", {"messages": [{"role": "user", "content": LONE}]})
    case("/detokenize", {"model": model, "tokens": [5]}, "model", {"model": LONE})
    case("/v1/responses", {"model": model, "max_output_tokens": 2}, "input", {"input": LONE})
    case("/v1/responses", {"model": model, "input": "Hi", "max_output_tokens": 2}, "instructions", {"instructions": LONE})
    case("/v1/messages", {"model": model, "max_tokens": 2}, "messages[0].content", {"messages": [{"role": "user", "content": LONE}]})
    case("/v1/messages", {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}, "system",
         {"system": LONE})
    case("/generative_scoring", {"model": model}, "query", {"query": LONE})
    return cases
