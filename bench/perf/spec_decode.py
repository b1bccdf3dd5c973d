"""Speculative ensemble decoding against plain decoding, side by side in one run.

    .venv/bin/python -m bench.perf.spec_decode --target ENSEMBLE --drafts STUDENT MEMBER --data-dir DATA

Each contender is one vLLM engine on the target (the endpoint's engine settings: fp32 on the CPU, eager, explicit KV
cache): "plain", and one per draft (serve/draft.py: the draft proposes `--num-speculative-tokens`, the ensemble
verifies). For each concurrency c in `--concurrency` the engine decodes c requests at once, each from its own prompt
(the first tokens of a validation window: distinct prompts, so prefix caching does not make them free), `--tokens`
new tokens each with EOS ignored (every request the same length), greedy and sampled (temperature 1):
- per-request tokens/s = tokens / the batch's wall time (every request runs the whole time): what one user sees;
- aggregate tokens/s = c x tokens / wall: what the box serves;
- acceptance = accepted draft tokens / proposed draft tokens (vLLM's spec-decode counters), and the mean tokens
  per verification step (1 + accepted per draft round).
Every contender starts afresh in every repeat; the order of contenders flips between repeats (forward, reversed,
...), so drift in the box's load falls on all. Figures: median of the repeats with the spread (min, max); every
ratio is the draft's median over plain's median from the same run. Prints one JSON record (and writes it to --out).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from bench.perf.timing import in_fresh_process, interleaved, median_spread, perf_parser
from plumbing.artifacts import atomic_write_json
from plumbing.console import setup_logging
from serve.draft import DRAFT_SAMPLING

log = logging.getLogger(__name__)
SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")


def prompts_from(data_dir: str | None, n: int, length: int, bos: int) -> list[list[int]]:
    """n distinct prompts: BOS + the first `length` tokens of n validation windows (BOS + one token id each without
    a dataset)."""
    if data_dir is None:
        return [[bos, 3 + i] for i in range(n)]
    from train.data import load_tokens

    stream = load_tokens(data_dir, "val")
    step = max(1, (len(stream) - length) // n)
    return [[bos] + stream[i * step: i * step + length].tolist() for i in range(n)]


def counters(llm) -> dict[str, float]:
    return {m.name: float(m.value) for m in llm.get_metrics() if m.name in SPEC_COUNTERS}


def run_contender(target: str, draft: str | None, n_spec: int, concurrency: list[int], tokens: int,
                  temperatures: list[float], prompts: list[list[int]], kv_cache_bytes: int, sampling: str) -> dict:
    """In a fresh process: one engine, every (temperature, concurrency) cell; {cell: figures}."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from serve.draft import speculative_config
    from serve.engine import engine_dtype
    from plumbing.ray_session import NO_TELEMETRY_ENV

    os.environ.update(NO_TELEMETRY_ENV)
    spec = speculative_config(draft, n_spec, sampling=sampling) if draft else None
    llm = LLM(model=target, dtype=engine_dtype(), enforce_eager=True, kv_cache_memory_bytes=kv_cache_bytes,
              max_num_seqs=max(concurrency), seed=0, disable_log_stats=False, speculative_config=spec)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], SamplingParams(max_tokens=8), use_tqdm=False)  # warm
    cells = {}
    for temperature in temperatures:
        for c in concurrency:
            params = [SamplingParams(temperature=temperature, max_tokens=tokens, ignore_eos=True, seed=j)
                      for j in range(c)]
            before = counters(llm) if spec else {}
            start = time.perf_counter()
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[:c]], params, use_tqdm=False)
            wall = time.perf_counter() - start
            made = sum(len(o.outputs[0].token_ids) for o in outs)
            cell = {"wall_s": wall, "per_request_tokens_per_s": tokens / wall, "aggregate_tokens_per_s": made / wall}
            if spec:
                after = counters(llm)
                drafts, proposed, accepted = (after[k] - before.get(k, 0.0) for k in SPEC_COUNTERS)
                cell["acceptance"] = accepted / proposed if proposed else None
                cell["tokens_per_step"] = 1 + accepted / drafts if drafts else None
            cells[f"t{temperature:g}-c{c}"] = cell
    llm.llm_engine.engine_core.shutdown()
    return cells


def measure(args, name: str, draft: str | None, sampling: str, prompts: list[list[int]]) -> dict:
    cells = in_fresh_process(run_contender, args.target, draft, args.num_speculative_tokens, args.concurrency,
                             args.tokens, args.temperatures, prompts, int(args.kv_cache_gib * (1 << 30)), sampling)
    log.info("%s: %s", name, {k: round(v["per_request_tokens_per_s"], 1) for k, v in cells.items()})
    return cells


def summarize(runs: dict[str, list[dict]]) -> dict:
    out: dict = {}
    for name, reps in runs.items():
        out[name] = {}
        for cell in reps[0]:
            fig = {}
            for key in ("per_request_tokens_per_s", "aggregate_tokens_per_s", "acceptance", "tokens_per_step"):
                values = [r[cell].get(key) for r in reps if r[cell].get(key) is not None]
                if values:
                    fig[key] = {**median_spread(values), "runs": values}
            out[name][cell] = fig
    for name in runs:
        if name == "plain":
            continue
        for cell, fig in out[name].items():
            base = out["plain"][cell]
            fig["speedup_per_request"] = (fig["per_request_tokens_per_s"]["median"]
                                          / base["per_request_tokens_per_s"]["median"])
            fig["speedup_aggregate"] = (fig["aggregate_tokens_per_s"]["median"]
                                        / base["aggregate_tokens_per_s"]["median"])
    return out


def main(argv: list[str] | None = None) -> None:
    p = perf_parser("spec_decode", __doc__)
    p.add_argument("--target", required=True, help="the packed ensemble (or any model) that verifies")
    p.add_argument("--drafts", nargs="+", required=True, help="draft model directories, one contender each")
    p.add_argument("--data-dir", help="train/ dataset whose validation windows give the prompts (default: BOS + one token)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 256],
                   help="requests decoded at once (default 1 8 64 256)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request, EOS ignored (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=8, help="prompt length after BOS (default 8)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0], help="default: 0 (greedy) and 1")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens per step (default 4)")
    p.add_argument("--draft-sampling", nargs="+", choices=DRAFT_SAMPLING, default=["greedy"],
                   help="draft sampling methods, one contender per draft and method (default greedy)")
    p.add_argument("--repeats", type=int, default=3, help="fresh runs of every contender (default 3)")
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="KV cache per engine, GiB (default 2)")
    p.add_argument("--out", help="also write the JSON record here (vLLM's engine processes log to stdout too)")
    args = p.parse_args(argv)
    setup_logging()

    from serve.draft import check_draft
    from serve.pack import read_config

    for d in args.drafts:
        check_draft(args.target, d)
    config = read_config(args.target)
    prompts = prompts_from(args.data_dir, max(args.concurrency), args.prompt_tokens, config["bos_token_id"])
    contenders = {"plain": (None, "greedy"),
                  **{f"draft:{Path(d).resolve().parent.name}/{Path(d).name}:{m}": (d, m)
                     for d in args.drafts for m in args.draft_sampling}}
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for _, _, name in interleaved(contenders, args.repeats):
        runs[name].append(measure(args, name, *contenders[name], prompts))
    record = {"target": str(Path(args.target).resolve()), "drafts": args.drafts, "tokens": args.tokens,
              "concurrency": args.concurrency, "temperatures": args.temperatures,
              "num_speculative_tokens": args.num_speculative_tokens, "draft_sampling": args.draft_sampling,
              "repeats": args.repeats,
              "cpu_count": os.cpu_count(), "results": summarize(runs)}
    if args.out:
        atomic_write_json(Path(args.out), record)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
