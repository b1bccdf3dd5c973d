"""One teacher replica: a Ray actor holding a vLLM `LLM` that samples unconditional sequences from BOS.

Every sequence carries its own seed (vLLM's per-request seed), so what a sequence contains depends on its
seed only, not on which replica ran it or what else was in the batch: the job's tokens are fixed by the
job's seed. The engine reports the log-probability of each sampled token under the distribution it
sampled from (`logprobs_mode="processed_logprobs"`: after temperature and top-p), which is what the
statistics check compares with the reference ensemble.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from serve.engine import engine_dtype


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
           "TOKENIZERS_PARALLELISM": "false"}
    if cores is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cores
    return env


class TeacherEngine:
    """A vLLM engine on one model directory (a packed ensemble or a single member)."""

    def __init__(self, model_dir: str, max_len: int, seed: int = 0):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.llm = LLM(model=model_dir, dtype=engine_dtype(), enforce_eager=True, max_model_len=max_len, seed=seed,
                       logprobs_mode="processed_logprobs", disable_log_stats=True)

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
