"""One teacher replica: a Ray actor holding a vLLM `LLM` that samples unconditional sequences from BOS.

Every sequence carries its own seed (vLLM's per-request seed), so what a sequence contains depends on its
seed only, not on which replica ran it or what else was in the batch: the job's tokens are fixed by the
job's seed. The engine reports the log-probability of each sampled token under the distribution it
sampled from (`logprobs_mode="processed_logprobs"`: after temperature and top-p), which is what the
statistics check compares with the reference ensemble.

With a draft model (speculative decoding, serve/draft.py) the samples keep the teacher's distribution and are still
fixed by their seeds (and the draft), but they are other tokens than without it: the rejection sampler draws its
own random numbers from the request's generator.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from serve.engine import engine_dtype

# Test only: "<flag file>:<calls>" makes the engine whose `advance` call number <calls> finds the flag file delete it
# and then hang (alive, never answering): what the job's hang timeout must catch. One engine hangs, not its successor.
HANG_ENV = "CHORUS_TEST_ENGINE_HANG"


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    max_len: int = 128  # stored tokens per sequence, BOS included

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_len": self.max_len}


def engine_env(kv_cache_gib: float, cores: str | None) -> dict[str, str]:
    """Environment of an engine process: in-process engine core (one process per replica, so killing the
    actor frees everything), a small KV cache, and, on a local machine, its own CPU cores."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gib))),
           "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}  # no vLLM telemetry
    if cores is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cores
        # One OpenMP thread per bound core. A Ray worker starts with OMP_NUM_THREADS=1 (its num_cpus), and vLLM's
        # CPU worker keeps the thread count it finds once it has bound its threads: the engine ran on one thread.
        env["OMP_NUM_THREADS"] = str(len(core_list(cores)))
    if os.environ.get(HANG_ENV):
        env[HANG_ENV] = os.environ[HANG_ENV]
    return env


def core_list(cores: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]: the CPU list syntax of VLLM_CPU_OMP_THREADS_BIND."""
    out = []
    for part in cores.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


class TeacherEngine:
    """A vLLM engine on one model directory (a packed ensemble or a single member); with `speculative`
    (serve.draft.speculative_config) a draft model proposes tokens and the engine verifies them: the same
    distribution, fewer target passes."""

    def __init__(self, model_dir: str, max_len: int, seed: int = 0, topk: int = 0, speculative: dict | None = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        # Top-k scoring (`topk`) of a sequence as long as the context needs one position more: vLLM asks every request
        # for at least one output token. That slot's position is never run through the model (one step is
        # generated, none fed back), so the config is widened by one in the engine only; every scored position
        # stays inside the trained context. max_logprobs: vLLM refuses requests for more per position.
        extra = {"hf_overrides": {"max_position_embeddings": max_len + 1}} if topk else {}
        self.llm = LLM(model=model_dir, dtype=engine_dtype(), enforce_eager=True, max_model_len=max_len + bool(topk),
                       seed=seed, logprobs_mode="processed_logprobs", disable_log_stats=True,
                       max_logprobs=max(20, topk), speculative_config=speculative, **extra)
        self.calls = 0

    def advance(self, bos_token_id: int, settings: SamplingSettings, sample: list[tuple[str, int]],
                score: list[tuple[str, np.ndarray]], abort: list[str], k: int = 0, budget_s: float = 0.5
                ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Continuous batching: add requests to the engine's queue, drop aborted ones, then step the engine for about
        `budget_s` (or until it has nothing left) and return the requests that finished meanwhile. Requests stay in
        the engine between calls, so the driver keeps the batch full by adding work before the last finishes.

        `sample`: (request id, seed): one sequence from BOS, returned as (id, generated token ids int32, their
        sampling log-probs float32), as `sample` does. `score`: (request id, tokens): the teacher's top-`k` after every
        position but the last, returned as (id, ids [L-1, k], log-probs [L-1, k]), as `topk` does. A request's result
        depends on its own seed and tokens only (per-request seeds; vLLM's CPU kernels compute each row alike
        whatever else is in the batch), so batching and timing do not change what a job stores."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        # FINAL_ONLY: the engine builds a request's output once, when it finishes. The default (cumulative) rebuilds
        # every running request's whole output, tokens and log-probs, after every step: quadratic in the length,
        # and what made this loop ~25% slower than LLM.generate (which sets FINAL_ONLY itself). No detokenizing:
        # the job stores token ids.
        final = RequestOutputKind.FINAL_ONLY
        self.calls += 1
        _maybe_hang(self.calls)
        engine = self.llm.llm_engine
        if abort:
            engine.abort_request(list(abort))
        for rid, seed in sample:
            engine.add_request(rid, TokensPrompt(prompt_token_ids=[bos_token_id]),
                               SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                                              max_tokens=settings.max_len - 1, seed=int(seed), logprobs=0,
                                              detokenize=False, output_kind=final))
        if score:
            params = SamplingParams(temperature=1.0, max_tokens=1, prompt_logprobs=k, flat_logprobs=True,
                                    detokenize=False, output_kind=final)
            for rid, tokens in score:
                engine.add_request(rid, TokensPrompt(prompt_token_ids=[int(t) for t in tokens]), params)
        deadline = time.monotonic() + budget_s
        done = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if not out.finished:
                    continue
                if out.prompt_logprobs is not None:  # a scoring request
                    ids, lps = _flat_topk(out.prompt_logprobs, k, skip_first=True)
                else:
                    completion = out.outputs[0]
                    ids = np.asarray(completion.token_ids, dtype=np.int32)
                    lps = np.asarray([step[int(t)].logprob for t, step in zip(ids, completion.logprobs)],
                                     dtype=np.float32)
                done.append((out.request_id, ids, lps))
            if time.monotonic() >= deadline:
                break
        return done

    def sample(self, bos_token_id: int, seeds: list[int], settings: SamplingSettings
               ) -> list[tuple[np.ndarray, np.ndarray]]:
        """One sequence per seed: (generated token ids int32, their sampling log-probs float32), BOS excluded."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                                 max_tokens=settings.max_len - 1, seed=int(s), logprobs=0) for s in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=[bos_token_id])] * len(seeds), params,
                                    use_tqdm=False)
        result = []
        for out in outputs:
            completion = out.outputs[0]
            ids = np.asarray(completion.token_ids, dtype=np.int32)
            logprobs = np.asarray([step[int(t)].logprob for t, step in zip(ids, completion.logprobs)],
                                  dtype=np.float32)
            result.append((ids, logprobs))
        return result

    def topk(self, sequences: list[np.ndarray], k: int, last: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """The teacher's k most likely next tokens after each position of each sequence, in one prefill pass.

        Returns per sequence of L tokens (ids int32 [n, k], log-probs float32 [n, k], descending) with n = L - 1
        (after positions 0 .. L-2: what produced tokens 1 .. L-1), or n = L with `last` (also after the final
        token: one generated step, whose top-k log-probs vLLM reports the same way). Temperature 1, no top-p:
        the teacher's own distribution. Flat log-probs: vLLM hands back plain lists, not a dict per position."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # No per-request seed: the one sampled token is thrown away, and a seeded request whose long prompt is
        # prefilled in chunks makes vLLM rewind its generator, which a CPU generator cannot do.
        params = SamplingParams(temperature=1.0, max_tokens=1, prompt_logprobs=k, logprobs=k if last else None,
                                flat_logprobs=True, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in s]) for s in sequences],
                                    params, use_tqdm=False)
        result = []
        for seq, out in zip(sequences, outputs):
            ids, lps = _flat_topk(out.prompt_logprobs, k, skip_first=True)
            if last:
                tail_ids, tail_lps = _flat_topk(out.outputs[0].logprobs, k, skip_first=False)
                ids, lps = np.concatenate([ids, tail_ids[:1]]), np.concatenate([lps, tail_lps[:1]])
            if len(ids) != len(seq) - (0 if last else 1):
                raise RuntimeError(f"vLLM returned top-k for {len(ids)} positions of a {len(seq)}-token sequence")
            result.append((ids, lps))
        return result


def _maybe_hang(calls: int) -> None:
    spec = os.environ.get(HANG_ENV)
    if not spec:
        return
    flag, at = spec.rsplit(":", 1)
    if calls >= int(at) and os.path.exists(flag):
        try:
            os.unlink(flag)  # this engine hangs; the one that replaces it does not
        except FileNotFoundError:
            return
        time.sleep(10**6)


def _flat_topk(flat, k: int, skip_first: bool) -> tuple[np.ndarray, np.ndarray]:
    """[positions, k] ids and log-probs from vLLM's FlatLogprobs: each position holds the scored token first, then
    the top k by rank (the scored token may appear twice: it is both); the prompt's first position holds nothing."""
    starts, ends = np.asarray(flat.start_indices), np.asarray(flat.end_indices)
    if skip_first:
        starts, ends = starts[1:], ends[1:]
    if not np.all(ends - starts == k + 1):
        raise RuntimeError(f"vLLM returned {sorted(set((ends - starts).tolist()))} log-probs per position, not {k + 1}")
    take = (starts[:, None] + 1 + np.arange(k)[None, :]).reshape(-1)
    ids = np.asarray(flat.token_ids, dtype=np.int32)[take].reshape(-1, k)
    lps = np.asarray(flat.logprobs, dtype=np.float32)[take].reshape(-1, k)
    ranks = np.asarray(flat.ranks, dtype=np.int64)[take].reshape(-1, k)
    if not np.all(ranks == np.arange(1, k + 1)[None, :]):
        raise RuntimeError("vLLM's flat log-probs are not laid out as [scored token, rank 1 .. k]")
    return ids, lps
