"""Serving throughput of the fused ensemble engine against one member alone, the sequential engine it replaced,
and Python logit-averaging loops.

    .venv/bin/python -m bench.perf.serve_throughput --members M0 M1 M2 [--requests 256] [--ks 1 2 4 8] [--out FILE]

The load: `--requests` concurrent requests offered at once, drawn with a fixed seed. Each prompt is BOS
followed by token ids sampled from the tokenizer's ordinary (non-special) vocabulary, its length uniform in
`--prompt-len`; each request's max_tokens is uniform in `--new-tokens`; temperature 1 and ignore_eos, so the
work is exactly the requested tokens. The same load is served, in one run, by:
1. the vLLM engine on one member alone (the plain Llama directory);
2. the fused ensemble engine (serve/ensemble_model.py: the K members as one wide model) on the packed ensemble
   for each K in `--ks` (members are reused in order when fewer are given), given all requests at once;
3. the sequential engine (`--engines ... sequential`): the same pack served by the engine the fused one replaced
   (K vLLM Llamas in a row), registered for this benchmark only (bench/perf/sequential_engine.py);
4. unless `--skip-loops`: the per-request loop (a token-by-token Hugging Face loop serving the requests one after
   another at batch size 1, each member with its own KV cache, logits averaged in Python; the "engine >= 10x
   the Python loop" target is judged against it) and the static-batch loop (all requests in one left-padded
   batch, stepped to the longest max_tokens; only the requested tokens count).
Targets (fused engine): K=2 >= 0.8 x single, K=4 >= 0.6 x single, ensemble >= 1.0 x (single / K) for every K
(>= 0.95 x at members large enough to be compute-bound, e.g. cpu-l); engine >= 10 x the per-request loop.

Throughput is requested (useful) tokens over wall time, prompts' prefill included, for every row. The engines
are interleaved per K (fused, then sequential) so that a change in the box's load hits both. The loops run
torch on as many threads as the engine's worker computes on (cores - 1, at least 1). Engine start-up is
excluded; one warm-up precedes the timings, and each figure is the median of `--repeats` timed runs
(`--loop-repeats` for the slow per-request loop); every timing is kept in the record. Memory per engine:
weights (parameter bytes from the weights file's header: a pack holds K x a member's), KV-cache bytes per
token (the engine's KV space over the tokens it reports it holds: the fused engine's is K x a member's), and
the resident memory of the engine's processes once loaded. Prints a Markdown table and writes the records as JSON.
"""
from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from bench.perf.sequential_engine import SEQUENTIAL_ARCHITECTURE, SEQUENTIAL_ENV
from bench.perf.timing import perf_parser
from plumbing.artifacts import atomic_write_json
from plumbing.console import setup_logging
from serve.engine import offline_engine
from serve.pack import pack_ensemble, read_config, weight_shapes
from train.data import load_tokenizer

log = logging.getLogger(__name__)
KS = (1, 2, 4, 8)
ENGINES = ("fused", "sequential")
FP32_BYTES = 4


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]  # BOS first
    max_tokens: int


def make_load(tokenizer, requests: int, prompt_lens: tuple[int, int], new_tokens: tuple[int, int],
              seed: int) -> list[Request]:
    """`requests` requests with prompt lengths (BOS included) and max_tokens uniform in the given ranges."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    return [Request(prompt=(tokenizer.bos_token_id, *rng.choices(ordinary, k=rng.randint(*prompt_lens) - 1)),
                    max_tokens=rng.randint(*new_tokens))
            for _ in range(requests)]


def engine_memory_mib() -> float:
    """Resident memory of this process's children: the vLLM engine core and its worker."""
    children = psutil.Process().children(recursive=True)
    return sum(c.memory_info().rss for c in children if c.is_running()) / 2**20


def median_rate(run, repeats: int, expected_tokens: int) -> dict:
    """Time `run()` (which returns the tokens it generated) `repeats` times; the median run's rate."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        generated = run()
        timings.append((time.perf_counter() - start, generated))
        # A rate is only comparable if every contender produced exactly the requested tokens.
        assert generated == expected_tokens, f"generated {generated} tokens, the load asks for {expected_tokens}"
    seconds, generated = sorted(timings)[len(timings) // 2]
    rates = [g / t for t, g in timings]
    return {"tokens_per_s": generated / seconds, "generated_tokens": generated, "seconds": seconds,
            "all_tokens_per_s": rates, "spread_tokens_per_s": [min(rates), max(rates)]}


def weights_mib(model_dir: Path) -> float:
    """Parameter bytes of a model directory (fp32), from its weights file's header."""
    return sum(FP32_BYTES * torch.Size(shape).numel() for shape in weight_shapes(model_dir).values()) / 2**20


def kv_space_bytes(kv_cache_bytes: int) -> int:
    """The KV space the engine really gets: vLLM's CPU backend lets VLLM_CPU_KVCACHE_SPACE (GiB) override it."""
    gib = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    return int(float(gib) * 2**30) if gib else kv_cache_bytes


def engine_serve(model_dir: Path, load: list[Request], max_model_len: int, kv_cache_bytes: int,
                 repeats: int) -> dict:
    """The whole load given to one vLLM engine at once."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(r.prompt)) for r in load]
    # No per-request seed: seeded requests are sampled one by one, which would tax the engine, not the model.
    # No detokenizing: the loops return token ids too.
    params = [SamplingParams(temperature=1.0, max_tokens=r.max_tokens, ignore_eos=True, detokenize=False)
              for r in load]
    with offline_engine(model_dir, max_model_len=max_model_len, kv_cache_bytes=kv_cache_bytes,
                        max_num_seqs=len(load)) as llm:
        def run() -> int:
            return sum(len(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False))

        run()  # warm-up
        rate = median_rate(run, repeats, sum(r.max_tokens for r in load))
        cache = llm.llm_engine.vllm_config.cache_config
        kv_tokens = cache.num_gpu_blocks * cache.block_size  # what the engine reports its KV cache holds
        return {**rate, "engine_rss_mib": engine_memory_mib(), "weights_mib": weights_mib(model_dir),
                "kv_cache_tokens": kv_tokens, "kv_bytes_per_token": kv_space_bytes(kv_cache_bytes) / kv_tokens}


def sequential_copy(packed: Path, out: Path) -> Path:
    """The pack, its config.json naming the benchmark-only sequential engine (the weights file is linked)."""
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True)
        for f in packed.iterdir():
            if f.name != "config.json":
                (tmp / f.name).symlink_to(f.resolve())
        config = read_config(packed)
        config["architectures"] = [SEQUENTIAL_ARCHITECTURE]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        os.replace(tmp, out)
    return out


def sample(generator: torch.Generator):
    """Next tokens [B, 1] drawn from softmax(logits) at temperature 1."""
    return lambda logits: torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Next tokens [B, 1]: the argmax (deterministic; for checking the loops against each other)."""
    return logits.argmax(dim=-1, keepdim=True)


def ensemble_step(members: list, caches: list, input_ids: torch.Tensor, attention_mask=None,
                  position_ids=None) -> torch.Tensor:
    """Every member's forward on the new positions, each on its own KV cache; last-position logits averaged [B, V]."""
    logits = []
    for i, member in enumerate(members):
        # logits_to_keep=1: only the last position goes through the LM head, as in Hugging Face generate.
        out = member(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=caches[i], use_cache=True, logits_to_keep=1)
        caches[i] = out.past_key_values
        logits.append(out.logits[:, -1])
    return torch.stack(logits).mean(0)


@torch.no_grad()
def per_request_loop(members: list, load: list[Request], pick) -> list[list[int]]:
    """Concurrent requests served one after another at batch size 1: each request's generated token ids."""
    outputs = []
    for request in load:
        caches = [None] * len(members)
        next_ids, tokens = torch.tensor([request.prompt]), []
        for _ in range(request.max_tokens):
            next_ids = pick(ensemble_step(members, caches, next_ids))
            tokens.append(next_ids.item())
        outputs.append(tokens)
    return outputs


@torch.no_grad()
def static_batch_loop(members: list, load: list[Request], pad_id: int, pick) -> list[list[int]]:
    """All requests in one left-padded batch, stepped until the longest max_tokens: each request's own tokens."""
    longest = max(len(r.prompt) for r in load)
    input_ids = torch.tensor([[pad_id] * (longest - len(r.prompt)) + list(r.prompt) for r in load])
    attention_mask = torch.tensor([[0] * (longest - len(r.prompt)) + [1] * len(r.prompt) for r in load])
    caches, steps = [None] * len(members), []
    for _ in range(max(r.max_tokens for r in load)):
        # Positions count real tokens only, so a padded prompt sees the positions it would see alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        input_ids = pick(ensemble_step(members, caches, input_ids, attention_mask, position_ids))
        steps.append(input_ids)
        attention_mask = torch.cat([attention_mask, torch.ones_like(input_ids)], dim=1)
    generated = torch.cat(steps, dim=1)
    return [generated[i, :r.max_tokens].tolist() for i, r in enumerate(load)]


def loop_serve(loop, load: list[Request], repeats: int) -> dict:
    """Time `loop(load)` (a Python loop bound to its members and sampler) like an engine."""
    loop([Request(r.prompt, 2) for r in load[:2]])  # warm-up
    return median_rate(lambda: sum(len(tokens) for tokens in loop(load)), repeats, sum(r.max_tokens for r in load))


def engine_compute_threads() -> int:
    """Threads vLLM's CPU worker computes on by default: all cores but the one it reserves."""
    return max(1, (os.cpu_count() or 1) - 1)


def measure(member_dirs: list[Path], work: Path, load: list[Request], kv_cache_bytes: int, repeats: int = 3,
            loop_repeats: int = 3, ks: tuple[int, ...] = KS, engines: tuple[str, ...] = ENGINES,
            loops: bool = True) -> dict:
    from transformers import LlamaForCausalLM

    # Before vLLM loads its plugins in this process (and so in the engine processes it starts): the sequential
    # engine's plugin then registers it under its own architecture name, which only sequential_copy's directories name.
    os.environ[SEQUENTIAL_ENV] = "1"
    torch.set_num_threads(engine_compute_threads())
    context = read_config(member_dirs[0])["max_position_embeddings"]
    pad_id = load_tokenizer(member_dirs[0]).pad_token_id
    useful_tokens = sum(r.max_tokens for r in load)
    record = {"requests": len(load), "prompt_tokens": sum(len(r.prompt) for r in load),
              "useful_tokens": useful_tokens,
              "prompt_len_range": [min(len(r.prompt) for r in load), max(len(r.prompt) for r in load)],
              "max_tokens_range": [min(r.max_tokens for r in load), max(r.max_tokens for r in load)],
              # The static batch steps every request to the longest max_tokens; this share of its work is wanted.
              "static_batch_useful_share": useful_tokens / (len(load) * max(r.max_tokens for r in load)),
              "members_given": len(member_dirs), "member_config": {k: read_config(member_dirs[0])[k] for k in (
                  "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")},
              "cpu_count": os.cpu_count(), "torch_threads_python_loop": torch.get_num_threads(), "repeats": repeats,
              "loop_repeats": loop_repeats, "ks": list(ks), "engines": list(engines), "loops": loops}
    log.info("engine: one member alone")
    record["single"] = engine_serve(member_dirs[0], load, context, kv_cache_bytes, repeats)
    single = record["single"]["tokens_per_s"]
    loaded = [LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval() for d in member_dirs] if loops else []
    generator = torch.Generator().manual_seed(0)
    for k in ks:
        chosen = [i % len(member_dirs) for i in range(k)]
        packed = pack_ensemble([member_dirs[i] for i in chosen], work / f"ensemble-k{k}")
        row: dict = {}
        for engine in engines:
            log.info("%s engine: K=%d ensemble", engine, k)
            model_dir = packed if engine == "fused" else sequential_copy(packed, work / f"sequential-k{k}")
            result = engine_serve(model_dir, load, context, kv_cache_bytes, repeats)
            row[engine] = {**result, "vs_single": result["tokens_per_s"] / single,
                           "vs_single_over_k": result["tokens_per_s"] / (single / k)}
        if loops:
            members = [loaded[i] for i in chosen]
            log.info("per-request loop: K=%d", k)
            row["per_request_loop"] = loop_serve(lambda rs: per_request_loop(members, rs, sample(generator)), load,
                                                 loop_repeats)
            log.info("static-batch loop: K=%d", k)
            row["static_batch_loop"] = loop_serve(lambda rs: static_batch_loop(members, rs, pad_id, sample(generator)),
                                                  load, repeats)
            for engine in engines:
                row[engine]["vs_per_request_loop"] = row[engine]["tokens_per_s"] / row["per_request_loop"]["tokens_per_s"]
                row[engine]["vs_static_batch_loop"] = row[engine]["tokens_per_s"] / row["static_batch_loop"]["tokens_per_s"]
        record[f"k{k}"] = row
    return record


def markdown(record: dict) -> str:
    single = record["single"]
    lo_p, hi_p = record["prompt_len_range"]
    lo_n, hi_n = record["max_tokens_range"]
    member = record["member_config"]

    def cells(r: dict) -> str:
        lo, hi = r["spread_tokens_per_s"]
        return (f"{r['tokens_per_s']:,.0f} ({lo:,.0f}-{hi:,.0f}) | {r['weights_mib']:,.1f} | "
                f"{r['kv_bytes_per_token']:,.0f} | {r['engine_rss_mib']:,.0f}")

    lines = [f"{record['requests']} concurrent requests, prompts {lo_p}-{hi_p} tokens ({record['prompt_tokens']:,} in all), "
             f"max_tokens {lo_n}-{hi_n} ({record['useful_tokens']:,} tokens in all), temperature 1, ignore_eos; "
             f"members hidden {member['hidden_size']}, {member['num_hidden_layers']} layers, "
             f"{member['num_attention_heads']} heads / {member['num_key_value_heads']} KV heads, vocab {member['vocab_size']}; "
             f"{record['cpu_count']} CPUs; median (min-max) of {record['repeats']} runs",
             "",
             "| engine | tokens/s (min-max) | weights (MiB) | KV bytes / token | engine RSS (MiB) | x single | "
             "x (single / K) (target >= 1.0) |",
             "|---|---|---|---|---|---|---|",
             f"| single member | {cells(single)} | 1.00 | - |"]
    for k in record["ks"]:
        for engine in record["engines"]:
            r = record[f"k{k}"][engine]
            target = {2: " (target >= 0.8)", 4: " (target >= 0.6)"}.get(k, "") if engine == "fused" else ""
            lines.append(f"| {engine} K={k} | {cells(r)} | {r['vs_single']:.2f}{target} | {r['vs_single_over_k']:.2f} |")
    if record.get("loops"):
        lines += ["", "| K | per-request loop tokens/s | fused / per-request loop (target >= 10) | "
                      "static-batch loop tokens/s | fused / static-batch loop |", "|---|---|---|---|---|"]
        for k in record["ks"]:
            r = record[f"k{k}"]
            fused = r.get("fused", r[record["engines"][0]])
            lines.append(f"| {k} | {r['per_request_loop']['tokens_per_s']:,.0f} | {fused['vs_per_request_loop']:.1f}x | "
                         f"{r['static_batch_loop']['tokens_per_s']:,.0f} | {fused['vs_static_batch_loop']:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = perf_parser("serve_throughput", __doc__)
    parser.add_argument("--members", nargs="+", required=True, help="member model directories (K=4 reuses them in order)")
    parser.add_argument("--requests", type=int, default=256, help="concurrent requests in the load (default 256)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(4, 32), metavar=("MIN", "MAX"),
                        help="prompt length range, BOS included (default 4 32)")
    parser.add_argument("--new-tokens", type=int, nargs=2, default=(16, 96), metavar=("MIN", "MAX"),
                        help="max_tokens range per request (default 16 96); MAX + prompt MAX must fit the context")
    parser.add_argument("--seed", type=int, default=0, help="seed of the load (default 0)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the median is kept (default 3)")
    parser.add_argument("--loop-repeats", type=int, help="timed runs of the slow per-request loop (default: --repeats)")
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS), metavar="K",
                        help="ensemble sizes to measure (default 1 2 4 8)")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                        help="ensemble engines to measure side by side (default: fused sequential)")
    parser.add_argument("--skip-loops", action="store_true", help="leave out the Python-loop baselines (slow)")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5, help="KV cache per engine in GiB (default 0.5)")
    parser.add_argument("--work", help="where packed ensembles go (default: a temporary directory)")
    parser.add_argument("--out", help="write the JSON record here")
    args = parser.parse_args(argv)
    setup_logging()
    members = [Path(m) for m in args.members]
    for m in members:
        if not (m / "config.json").exists():
            parser.error(f"member {m} is not a model directory (no config.json)")
    loop_repeats = args.loop_repeats or args.repeats
    if min(args.requests, args.repeats, loop_repeats, *args.prompt_len, *args.new_tokens, *args.ks) < 1:
        parser.error("--requests, --repeats, --loop-repeats, --prompt-len, --new-tokens and --ks must be >= 1")
    if args.prompt_len[0] > args.prompt_len[1] or args.new_tokens[0] > args.new_tokens[1]:
        parser.error("--prompt-len and --new-tokens take MIN MAX with MIN <= MAX")
    context = read_config(members[0])["max_position_embeddings"]
    if args.prompt_len[1] + args.new_tokens[1] > context:
        parser.error(f"prompt MAX + new-tokens MAX = {args.prompt_len[1] + args.new_tokens[1]} exceeds the "
                     f"members' context ({context})")
    load = make_load(load_tokenizer(members[0]), args.requests, tuple(args.prompt_len), tuple(args.new_tokens),
                     args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        record = measure(members, work, load, int(args.kv_cache_gib * 2**30), args.repeats, loop_repeats,
                         tuple(args.ks), tuple(args.engines), loops=not args.skip_loops)
    record["seed"] = args.seed
    print(markdown(record))
    if args.out:
        atomic_write_json(args.out, record)


if __name__ == "__main__":
    main()
