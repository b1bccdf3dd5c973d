"""The ensemble in vLLM's offline engine: how Chorus starts one, and the prompt scores it gives.

The same settings as the endpoint (engine_dtype(), explicit KV-cache size, eager on CPU), for tests, benchmarks
and scripts that want the engine without HTTP. Callers that start engines need a `__main__` guard.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


def engine_dtype() -> str:
    """The dtype every Chorus vLLM engine runs in, chosen by the device the engine starts on (call it there):
    bf16 on a CUDA GPU; fp32 on the CPU, where vLLM's bf16 is unusable. The ensemble's combine always
    returns fp32 log-probabilities (serve.ensemble_model), so bf16 weights do not coarsen the scores."""
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


@contextmanager
def offline_engine(model_dir: str | Path, *, max_model_len: int | None = None, kv_cache_bytes: int = 1 << 30,
                   max_num_seqs: int = 64, enforce_eager: bool = True, seed: int = 0):
    """A `vllm.LLM` on an ensemble (or member) directory; its engine process is shut down on exit."""
    from vllm import LLM

    from plumbing.ray_session import NO_TELEMETRY_ENV

    os.environ.update(NO_TELEMETRY_ENV)  # no vLLM usage reports from this engine or its processes
    llm = LLM(model=str(model_dir), dtype=engine_dtype(), max_model_len=max_model_len, kv_cache_memory_bytes=kv_cache_bytes,
              max_num_seqs=max_num_seqs, enforce_eager=enforce_eager, seed=seed, disable_log_stats=True)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()


def prompt_logprobs(llm, rows: list[list[int]]) -> list[list[float]]:
    """For each token-id row, log p(row[t] | row[:t]) for t = 1 .. len(row) - 1 under the served model."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(r)) for r in rows],
                           SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)
    return [[step[tok].logprob for tok, step in zip(row[1:], out.prompt_logprobs[1:])]
            for row, out in zip(rows, outputs)]
