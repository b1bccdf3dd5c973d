"""Sampling through a live Chorus endpoint (serve/app.py: vLLM's OpenAI server on Ray Serve) instead of engines
of the job's own.

One completion request per sequence, because the OpenAI API takes one `seed` per request: the prompt is the
token-id list [BOS], `max_tokens` = max_len - 1, the job's temperature and top-p, the sequence's own seed,
`logprobs: 0` (the sampled token's log-probability and no alternatives) and `return_tokens_as_token_ids` so
the sampled ids come back exactly as `token_id:N` strings, not as text to re-tokenize. Requests run
concurrently (`concurrency` at a time) so the endpoint's scheduler batches them, as the offline engine would.
A job keeps them in flight across shards (`EndpointClient`: the next shard's requests go out while the current
one's last sequences are still being sampled), so the endpoint, not the client, sets the pace.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import Future
from pathlib import Path

import httpx
import numpy as np

from synthdata.engine import SamplingSettings
from plumbing.console import ChorusError

API_KEY_ENV = "CHORUS_API_KEY"  # the same variable `serve up` reads its key from
TOKEN_PREFIX = "token_id:"


class EndpointError(ChorusError, RuntimeError):
    """The endpoint is unreachable, serves another model, or answered something that is not a completion."""


def served_model(url: str, teacher_dir: Path, api_key: str | None) -> str:
    """The model name the endpoint serves `teacher_dir` under; refused when it serves another directory."""
    try:
        reply = httpx.get(f"{url}/v1/models", headers=_headers(api_key), timeout=30)
    except httpx.HTTPError as e:
        raise EndpointError(f"endpoint {url} is not reachable: {e}") from None
    if reply.status_code != 200:
        raise EndpointError(f"endpoint {url}/v1/models answered {reply.status_code}: {reply.text[:300]}")
    models = reply.json().get("data") or []
    roots = {str(Path(m.get("root") or "").resolve()): m["id"] for m in models}
    if str(teacher_dir) not in roots:
        raise EndpointError(f"endpoint {url} serves {sorted(roots) or 'nothing'}, not the teacher {teacher_dir}: "
                            "give the --teacher directory the endpoint was started on (`serve up --model`)")
    return roots[str(teacher_dir)]


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class EndpointSampler:
    """`sample(bos, seeds, settings)` like synthdata.engine.TeacherEngine's, through HTTP."""

    def __init__(self, url: str, model: str, api_key: str | None = None, concurrency: int = 64,
                 timeout_s: float = 600.0):
        self.url, self.model, self.api_key = url.rstrip("/"), model, api_key
        self.concurrency, self.timeout_s = concurrency, timeout_s

    @classmethod
    def connect(cls, url: str, teacher_dir: Path, concurrency: int = 64) -> EndpointSampler:
        api_key = os.environ.get(API_KEY_ENV, "").strip() or None
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per sequence
        return cls(url, served_model(url.rstrip("/"), teacher_dir, api_key), api_key, concurrency)

    def sample(self, bos_token_id: int, seeds: list[int], settings: SamplingSettings
               ) -> list[tuple[np.ndarray, np.ndarray]]:
        return asyncio.run(self._sample(bos_token_id, seeds, settings))

    async def _sample(self, bos: int, seeds: list[int], settings: SamplingSettings):
        limit = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, headers=_headers(self.api_key), timeout=self.timeout_s,
                                     limits=limits) as client:
            async def one(seed: int):
                async with limit:
                    return await self._one(client, bos, seed, settings)

            return await asyncio.gather(*(one(s) for s in seeds))

    async def _one(self, client: httpx.AsyncClient, bos: int, seed: int, settings: SamplingSettings):
        body = {"model": self.model, "prompt": [bos], "max_tokens": settings.max_len - 1, "seed": int(seed),
                "temperature": settings.temperature, "top_p": settings.top_p, "logprobs": 0,
                "return_tokens_as_token_ids": True}
        try:
            reply = await client.post("/v1/completions", json=body)
        except httpx.HTTPError as e:
            raise EndpointError(f"endpoint {self.url}: completion request failed ({type(e).__name__}: {e})") from None
        if reply.status_code != 200:
            raise EndpointError(f"endpoint {self.url}/v1/completions answered {reply.status_code}: {reply.text[:300]}")
        choice = reply.json()["choices"][0]
        logprobs = choice.get("logprobs") or {}
        tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
        if tokens is None or values is None or len(tokens) != len(values):
            raise EndpointError(f"endpoint {self.url} returned no per-token logprobs for seed {seed}: {choice}")
        if not all(t.startswith(TOKEN_PREFIX) for t in tokens):
            raise EndpointError(f"endpoint {self.url} returned tokens as text, not ids ({tokens[:3]}): it does not "
                                "honour return_tokens_as_token_ids")
        ids = np.asarray([int(t[len(TOKEN_PREFIX):]) for t in tokens], dtype=np.int32)
        return ids, np.asarray(values, dtype=np.float32)


class EndpointClient:
    """One slot of a job on an endpoint: requests kept in flight across calls (an asyncio loop in a thread of its own).

    `advance(bos, sample, abort, budget_s)` adds requests ((request id, seed) each) and cancels aborted ones, and
    returns a Future of the requests that finished within about `budget_s`, as (id, ids, log-probs): the same
    contract as synthdata.engine.TeacherEngine.advance, so the job drives engines and endpoints alike. A failed
    request fails the next call (EndpointError)."""

    def __init__(self, sampler: EndpointSampler, settings: SamplingSettings):
        self.sampler, self.settings = sampler, settings
        self.tasks: dict[str, asyncio.Task] = {}
        self.finished: list[tuple[str, np.ndarray, np.ndarray]] = []
        self.error: EndpointError | None = None
        self.client: httpx.AsyncClient | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="endpoint-client", daemon=True)
        self.thread.start()

    def advance(self, bos: int, sample: list[tuple[str, int]], abort: list[str], budget_s: float) -> Future:
        return asyncio.run_coroutine_threadsafe(self._advance(bos, list(sample), list(abort), budget_s), self.loop)

    async def _advance(self, bos: int, sample, abort, budget_s: float):
        if self.client is None:
            n = self.sampler.concurrency
            self.limit = asyncio.Semaphore(n)
            self.client = httpx.AsyncClient(
                base_url=self.sampler.url, headers=_headers(self.sampler.api_key), timeout=self.sampler.timeout_s,
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
        for rid in abort:
            task = self.tasks.pop(rid, None)
            if task is not None:
                task.cancel()
        for rid, seed in sample:
            self.tasks[rid] = asyncio.create_task(self._run(rid, bos, seed))
        deadline = self.loop.time() + budget_s
        while self.loop.time() < deadline and self.error is None and self.tasks:
            await asyncio.sleep(min(0.05, budget_s))
        if self.error is not None:
            raise self.error
        done, self.finished = self.finished, []
        return done

    async def _run(self, rid: str, bos: int, seed: int) -> None:
        async with self.limit:
            try:
                ids, lps = await self.sampler._one(self.client, bos, seed, self.settings)
            except EndpointError as e:
                self.error = e
                return
            except Exception as e:  # noqa: BLE001 - a malformed reply is the endpoint's failure, named
                self.error = EndpointError(f"endpoint {self.sampler.url}: {type(e).__name__}: {e}")
                return
        self.tasks.pop(rid, None)
        self.finished.append((rid, ids, lps))

    def close(self) -> None:
        """Cancel every request in flight and stop the loop's thread."""
        if not self.thread.is_alive():
            return

        async def shut():
            for task in self.tasks.values():
                task.cancel()
            self.tasks = {}
            if self.client is not None:
                await self.client.aclose()

        try:
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(timeout=10)
        except Exception:  # noqa: BLE001 - closing: nothing left to save
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
