"""Run as a script: print vLLM's prompt log-probabilities of token sequences as JSON.

Kept out of the pytest process on purpose: a vLLM CPU engine binds threads and lowers torch's thread
count for the whole process, which would slow every test after it.
usage: python vllm_prompt_logprobs.py MODEL_DIR '[[ids...], ...]'
"""
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    model_dir, sequences = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=max(map(len, sequences)) + 1, seed=0)
    outputs = llm.generate([{"prompt_token_ids": s} for s in sequences], SamplingParams(max_tokens=1, prompt_logprobs=0))
    result = [[lp[tok].logprob for lp, tok in zip(o.prompt_logprobs[1:], s[1:])] for o, s in zip(outputs, sequences)]
    print("LOGPROBS=" + json.dumps(result))
