"""Decode throughput of the ensemble engine against one member alone and a Python logit-averaging loop.

    .venv/bin/python -m bench.serve_throughput --members M0 M1 M2 M3 [--sequences 32] [--new-tokens 96]

In one run, at the same load (the same number of sequences decoded together, each generating the
same number of tokens from BOS, sampled at temperature 1 with ignore_eos):
1. vLLM engine on one member alone (the plain Llama directory);
2. vLLM engine on the packed ensemble for K = 1, 2, 4 (members are reused in order when fewer are given);
3. a token-by-token Hugging Face loop (each member's forward with its own KV cache, logits averaged in
   Python, then sampled) for the same K.
Targets: ensemble >= 0.8 x single / K; engine >= 10 x the Python loop at the same K. The loop runs torch
on as many threads as the engine's worker computes on (vLLM's CPU build reserves one core for its engine
core: cores - 1, at least 1), so both get the same compute. Engine start-up is excluded; one warm-up
batch precedes the timings, and each figure is the median of `--repeats` timed runs (the box may be
shared). Memory per engine is the resident memory of the engine's processes (engine core and worker)
once it is loaded, with its KV cache. Prints a Markdown table and writes the records as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import psutil
import torch

from serve.engine import offline_engine
from serve.pack import pack_ensemble
from train.data import load_tokenizer

log = logging.getLogger(__name__)
KS = (1, 2, 4)


def engine_memory_mib() -> float:
    """Resident memory of this process's children: the vLLM engine core and its worker."""
    children = psutil.Process().children(recursive=True)
    return sum(c.memory_info().rss for c in children if c.is_running()) / 2**20


def median_rate(run, repeats: int) -> dict:
    """Time `run()` (which returns tokens generated) `repeats` times; the median run's rate."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        generated = run()
        timings.append((time.perf_counter() - start, generated))
    seconds, generated = sorted(timings)[len(timings) // 2]
    return {"tokens_per_s": generated / seconds, "generated_tokens": generated, "seconds": seconds,
            "all_tokens_per_s": [g / t for t, g in timings]}


def engine_decode(model_dir: Path, bos: int, sequences: int, new_tokens: int, kv_cache_bytes: int,
                  repeats: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=[bos])] * sequences
    # No per-request seed: seeded requests are sampled one by one, which would tax the engine, not the model.
    params = SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True)
    with offline_engine(model_dir, max_model_len=new_tokens + 1, kv_cache_bytes=kv_cache_bytes,
                        max_num_seqs=sequences) as llm:
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        rate = median_rate(lambda: sum(len(o.outputs[0].token_ids)
                                       for o in llm.generate(prompts, params, use_tqdm=False)), repeats)
        return {**rate, "engine_rss_mib": engine_memory_mib()}


@torch.no_grad()
def python_loop_decode(member_dirs: list[Path], bos: int, sequences: int, new_tokens: int, repeats: int) -> dict:
    """The baseline: K Hugging Face models stepped one token at a time, logits averaged in Python."""
    from transformers import LlamaForCausalLM

    members = [LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval() for d in member_dirs]
    generator = torch.Generator().manual_seed(0)

    def run(steps: int) -> int:
        tokens = torch.full((sequences, 1), bos, dtype=torch.long)
        caches = [None] * len(members)
        for _ in range(steps):
            logits = []
            for i, m in enumerate(members):
                out = m(input_ids=tokens[:, -1:], past_key_values=caches[i], use_cache=True)
                caches[i] = out.past_key_values
                logits.append(out.logits[:, -1])
            probs = torch.softmax(torch.stack(logits).mean(0), dim=-1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return sequences * steps

    run(2)  # warm-up
    return median_rate(lambda: run(new_tokens), repeats)


def engine_compute_threads() -> int:
    """Threads vLLM's CPU worker computes on by default: all cores but the one it reserves."""
    return max(1, (os.cpu_count() or 1) - 1)


def measure(member_dirs: list[Path], work: Path, sequences: int, new_tokens: int, kv_cache_bytes: int,
            repeats: int = 3) -> dict:
    bos = load_tokenizer(member_dirs[0]).bos_token_id
    torch.set_num_threads(engine_compute_threads())
    record = {"sequences": sequences, "new_tokens": new_tokens, "members_given": len(member_dirs),
              "cpu_count": os.cpu_count(), "torch_threads_python_loop": torch.get_num_threads(), "repeats": repeats}
    log.info("engine: one member alone")
    record["single"] = engine_decode(member_dirs[0], bos, sequences, new_tokens, kv_cache_bytes, repeats)
    for k in KS:
        chosen = [member_dirs[i % len(member_dirs)] for i in range(k)]
        packed = pack_ensemble(chosen, work / f"ensemble-k{k}")
        log.info("engine: K=%d ensemble", k)
        engine = engine_decode(packed, bos, sequences, new_tokens, kv_cache_bytes, repeats)
        log.info("python loop: K=%d", k)
        loop = python_loop_decode(chosen, bos, sequences, new_tokens, repeats)
        record[f"k{k}"] = {
            "engine": engine, "python_loop": loop,
            "vs_single_over_k": engine["tokens_per_s"] / (record["single"]["tokens_per_s"] / k),
            "vs_python_loop": engine["tokens_per_s"] / loop["tokens_per_s"],
        }
    return record


def markdown(record: dict) -> str:
    single = record["single"]
    lines = [f"{record['sequences']} sequences x {record['new_tokens']} new tokens, temperature 1, "
             f"{record['cpu_count']} CPUs, Python loop on {record['torch_threads_python_loop']} torch thread(s), "
             f"median of {record['repeats']} runs",
             "",
             "| engine | tokens/s | engine RSS (MiB) | ensemble / (single / K) (target >= 0.8) | "
             "Python loop tokens/s | engine / Python loop (target >= 10) |",
             "|---|---|---|---|---|---|",
             f"| single member | {single['tokens_per_s']:,.0f} | {single['engine_rss_mib']:,.0f} | - | - | - |"]
    for k in KS:
        r = record[f"k{k}"]
        lines.append(f"| ensemble K={k} | {r['engine']['tokens_per_s']:,.0f} | {r['engine']['engine_rss_mib']:,.0f} | "
                     f"{r['vs_single_over_k']:.2f} | {r['python_loop']['tokens_per_s']:,.0f} | "
                     f"{r['vs_python_loop']:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", nargs="+", required=True, help="member model directories (K=4 reuses them in order)")
    parser.add_argument("--sequences", type=int, default=32, help="sequences decoded together (default 32)")
    parser.add_argument("--new-tokens", type=int, default=96, help="tokens generated per sequence (default 96)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the median is kept (default 3)")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5, help="KV cache per engine in GiB (default 0.5)")
    parser.add_argument("--work", help="where packed ensembles go (default: a temporary directory)")
    parser.add_argument("--out", help="write the JSON record here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    members = [Path(m) for m in args.members]
    for m in members:
        if not (m / "config.json").exists():
            parser.error(f"member {m} is not a model directory (no config.json)")
    if min(args.sequences, args.new_tokens, args.repeats) < 1:
        parser.error("--sequences, --new-tokens and --repeats must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        record = measure(members, work, args.sequences, args.new_tokens, int(args.kv_cache_gib * 2**30), args.repeats)
    print(markdown(record))
    if args.out:
        tmp_out = Path(args.out).with_suffix(".tmp")
        tmp_out.write_text(json.dumps(record, indent=1))
        os.replace(tmp_out, args.out)


if __name__ == "__main__":
    main()
