"""The main job: Chorus end to end on one machine, unattended.

    corpus -> tokenizer + shards -> K regularized members (Ray) -> packed ensemble -> Ray Serve endpoint
    (checked with real requests) -> synthetic shards from the ensemble -> distilled student -> report

Every stage writes its output atomically and is skipped when a re-run finds it complete, so running
the job twice reuses finished stages, and a killed job continues where it stopped. The defaults
finish in well under 30 minutes on a 2-core CPU machine; `--help` lists the knobs.
"""
from __future__ import annotations

import argparse
import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.artifacts import OutputLock, atomic_write_json, atomic_write_text
from train.console import exit_on, setup_logging

log = logging.getLogger("chorus")


@dataclass(frozen=True)
class PipelineConfig:
    out: str = "runs/main"
    corpus: tuple[str, ...] = ()  # empty: the default corpus (Debian python3.11-doc sources)
    vocab_size: int = 4096
    preset: str = "cpu-s"
    tokens: int = 200_000
    epochs: int = 4
    lr: float = 3e-3
    wd: float = 0.8
    k: int = 3
    synthetic_tokens: int = 300_000
    w: float = 0.75
    student_preset: str = "cpu-s"
    next_word_items: int = 500
    tasks: tuple[str, ...] = ()  # extra downstream task files (JSON lines: query/choices/gold or context/continuation)
    address: str | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage(name: str, i: int, n: int) -> float:
    log.info("[%d/%d] %s", i, n, name)
    return time.perf_counter()


def _write_json(path: Path, record: dict) -> None:
    atomic_write_json(path, record)


def check_endpoint(model_dir: Path, port: int, address: str | None) -> dict:
    """Start the Ray Serve app, send a completion, a streamed completion and a scoring request, stop it."""
    import httpx

    from serve.app import EnsembleConfig, start_app, stop_app

    config = EnsembleConfig(model_dir=str(model_dir), served_model_name="chorus-ensemble", port=port)
    url = start_app(config, address=address)
    try:
        models = httpx.get(f"{url}/v1/models", timeout=60).json()
        body = {"model": config.model_name, "prompt": "The function returns", "max_tokens": 16, "temperature": 0}
        completion = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        completion.raise_for_status()
        score = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "model": config.model_name, "prompt": "Python is a programming language.", "max_tokens": 1,
            "echo": True, "logprobs": 1, "temperature": 0})
        score.raise_for_status()
        chunks = 0
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=300) as r:
            r.raise_for_status()
            chunks = sum(1 for line in r.iter_lines() if line.startswith("data: {"))
        token_logprobs = score.json()["choices"][0]["logprobs"]["token_logprobs"]
        return {"url": url, "models": [m["id"] for m in models["data"]],
                "completion": completion.json()["choices"][0]["text"], "stream_chunks": chunks,
                "prompt_tokens_scored": sum(lp is not None for lp in token_logprobs)}
    finally:
        stop_app()


def heldout_next_word(data_dir: Path, n: int, choices: int = 4, seed: int = 0) -> list[dict]:
    """A multiple-choice next-word task made from the held-out validation text: which of `choices` words follows?

    The product must not need outside eval sets, so the main job builds one from text no model trained on.
    Distractors are other words of the same text, so a model must read the context to beat chance (1/choices);
    a LAMBADA-style greedy match scores ~0 for models this small, which separates nothing."""
    from train.data import load_tokenizer, load_tokens

    tokenizer = load_tokenizer(data_dir / "tokenizer")
    text = tokenizer.decode(load_tokens(data_dir, "val").tolist(), skip_special_tokens=True)
    words = [w for w in text.split() if len(w) >= 4 and w.isalpha()]
    if len(set(words)) < 10 * choices:
        raise ValueError(f"the validation text of {data_dir} has too few distinct words for a {choices}-way task")
    rng = np.random.default_rng(seed)
    items, tries = [], 0
    while len(items) < n and tries < 100 * n:
        tries += 1
        pos = int(rng.integers(400, max(401, len(text) - 20)))
        start = text.rfind(" ", 0, pos)
        end = text.find(" ", start + 1)
        word = text[start + 1 : end] if start > 0 and end > 0 else ""
        if len(word) < 4 or not word.isalpha():
            continue
        distractors = set()
        while len(distractors) < choices - 1:
            candidate = words[int(rng.integers(len(words)))]
            if candidate.lower() != word.lower():
                distractors.add(candidate)
        options = [word, *sorted(distractors)]
        rng.shuffle(options)
        context = text[max(0, start - 300) : start]
        items.append({"query": context[context.find(" ") + 1 :], "choices": options, "gold": options.index(word)})
    return items


def run(cfg: PipelineConfig) -> dict:
    """The main job in cfg.out (one job per directory: a second is refused, naming the first)."""
    with OutputLock(cfg.out):
        return _run(cfg)


def _run(cfg: PipelineConfig) -> dict:
    from bench.downstream import evaluate_items, read_task
    from bench.evaluate import load_model, validation_loss
    from distill.student import DistillConfig, distill
    from serve.pack import pack_ensemble
    from synthdata.job import GenerateConfig, generate
    from train.corpus import default_corpus
    from train.data import DatasetSpec, load_tokenizer, prepare_dataset
    from train.members import train_members
    from train.trainer import TrainConfig

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, n, times = time.perf_counter(), 7, {}

    t = _stage("corpus -> tokenizer -> token shards", 1, n)
    corpus = cfg.corpus or (str(default_corpus(".cache/corpus")),)
    data_dir = out / "data"
    manifest = prepare_dataset(DatasetSpec(corpus=tuple(corpus), vocab_size=cfg.vocab_size), data_dir)
    times["data"] = time.perf_counter() - t

    t = _stage(f"{cfg.k} regularized members ({cfg.preset}, D={cfg.tokens:,}, {cfg.epochs} epochs, wd {cfg.wd}) on Ray",
               2, n)
    member_cfgs = [TrainConfig(data_dir=str(data_dir), preset=cfg.preset, tokens=cfg.tokens, epochs=cfg.epochs,
                               lr=cfg.lr, weight_decay=cfg.wd, seed=s) for s in range(cfg.k)]
    members = train_members(member_cfgs, out / "members", address=cfg.address)
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the endpoint and the synthetic job start their own
    member_dirs = [Path(r["model_dir"]) for r in members]
    times["members"] = time.perf_counter() - t

    t = _stage("pack the members into one ensemble model (logit average)", 3, n)
    ensemble_dir = pack_ensemble(member_dirs, out / "ensemble", combine="logits")
    times["pack"] = time.perf_counter() - t

    t = _stage("Ray Serve OpenAI endpoint: up, real requests, down", 4, n)
    endpoint_path = out / "endpoint_check.json"
    if endpoint_path.exists():
        endpoint = json.loads(endpoint_path.read_text())
    else:
        endpoint = check_endpoint(ensemble_dir, _free_port(), cfg.address)
        _write_json(endpoint_path, endpoint)
    log.info("endpoint answered: models %s, completion %r, %d stream chunks", endpoint["models"],
             endpoint["completion"][:60], endpoint["stream_chunks"])
    times["serve"] = time.perf_counter() - t

    t = _stage(f"{cfg.synthetic_tokens:,} synthetic tokens from the ensemble (vLLM on Ray)", 5, n)
    synthetic = generate(GenerateConfig(teacher=str(ensemble_dir), tokens=cfg.synthetic_tokens,
                                        out=str(out / "synthetic"), address=cfg.address))
    times["synthetic"] = time.perf_counter() - t

    t = _stage(f"distilled student ({cfg.student_preset}, w={cfg.w})", 6, n)
    student_cfg = TrainConfig(data_dir=str(data_dir), preset=cfg.student_preset, tokens=cfg.tokens,
                              epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.wd, seed=1000)
    student = distill(DistillConfig(train=student_cfg, synthetic_dir=str(out / "synthetic"), recipe="ensemble",
                                    w=cfg.w), out / "student")
    student_dir = Path(student["model_dir"])
    times["student"] = time.perf_counter() - t

    t = _stage("report: validation losses and downstream accuracy", 7, n)
    losses = {f"member seed {i}": validation_loss([d], data_dir, progress=False)["loss"]
              for i, d in enumerate(member_dirs)}
    losses["ensemble (logit average)"] = validation_loss([ensemble_dir], data_dir, progress=False)["loss"]
    losses["student"] = validation_loss([student_dir], data_dir, progress=False)["loss"]
    next_word_path = out / "heldout_next_word.jsonl"
    if not next_word_path.exists():
        items = heldout_next_word(data_dir, cfg.next_word_items)
        atomic_write_text(next_word_path, "".join(json.dumps(i) + "\n" for i in items))  # a re-run trusts it
    tasks = {"held-out next word (4 choices)": next_word_path, **{Path(p).stem: Path(p) for p in cfg.tasks}}
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    models = {"best member": member_dirs[int(np.argmin([losses[f"member seed {i}"] for i in range(cfg.k)]))],
              "ensemble": ensemble_dir, "student": student_dir}
    downstream = {}
    for task, path in tasks.items():
        items = read_task(path)
        for name, d in models.items():
            downstream[(task, name)] = evaluate_items(load_model([d]), tokenizer, items, progress=False)
    times["report"] = time.perf_counter() - t

    best = min(losses[f"member seed {i}"] for i in range(cfg.k))
    gain = best - losses["ensemble (logit average)"]
    kept = (best - losses["student"]) / gain if gain > 0 else float("nan")
    summary = {"losses": losses, "best_member": best, "ensemble_gain": gain, "student_keeps": kept, "w": cfg.w,
               "downstream": {f"{t} / {m}": v for (t, m), v in downstream.items()},
               "endpoint": endpoint, "synthetic": synthetic, "seconds": times,
               "wall_s": time.perf_counter() - t0, "paths": {"data": str(data_dir), "members": [str(d) for d in member_dirs],
                                                           "ensemble": str(ensemble_dir), "student": str(student_dir)}}
    report = render_report(cfg, manifest, summary, downstream)
    atomic_write_text(out / "REPORT.md", report)
    _write_json(out / "summary.json", summary)
    print(report)
    return summary


def gain_sentence(s: dict) -> str:
    """What the student kept of the ensemble's gain over the best member, in words that cannot mislead."""
    from bench.report import percent

    gain, kept = s["ensemble_gain"], s["student_keeps"]
    if gain <= 0:
        return f"The ensemble did not beat the best member here (gain {gain:.4f} nats): there is no gain to keep."
    text = f"Ensemble gain over the best member: {gain:.4f} nats. "
    if kept > 1:
        return text + (f"The student is below the ensemble itself ({percent(kept)} of the gain): with w = "
                       f"{s['w']:g} it takes {1 / (1 - s['w']):g}x a member's optimizer steps, on fresh synthetic text.")
    return text + f"The student keeps {percent(kept)} of it."


def render_report(cfg: PipelineConfig, manifest: dict, s: dict, downstream: dict) -> str:
    lines = ["# Chorus main job", "",
             f"Corpus: {', '.join(cfg.corpus) or 'default (Debian python3.11-doc sources)'}; "
             f"{manifest['splits']['train']['tokens']:,} training tokens available, budget D = {cfg.tokens:,}; "
             f"{manifest['splits']['val']['tokens']:,} validation tokens; vocab {manifest['vocab_size']}.",
             f"Members: {cfg.k} x {cfg.preset}, {cfg.epochs} epochs, lr {cfg.lr:g}, weight decay {cfg.wd:g}. "
             f"Student: {cfg.student_preset}, w = {cfg.w} synthetic.", "",
             "## Validation loss (nats/token, fixed held-out set)", "", "| model | loss |", "|---|---:|"]
    lines += [f"| {name} | {loss:.4f} |" for name, loss in s["losses"].items()]
    lines += ["", gain_sentence(s), "",
              "## Downstream (zero-shot)", "", "| task | model | items | acc | acc_norm |", "|---|---|---:|---:|---:|"]
    for (task, model), r in downstream.items():
        norm = f"{r['acc_norm']:.3f}" if "acc_norm" in r else "-"
        lines.append(f"| {task} | {model} | {r['items']} | {r['acc']:.3f} ± {r['acc_stderr']:.3f} | {norm} |")
    lines += ["", "Chance on the held-out next-word task is 0.25; ± is the standard error."]
    e, syn = s["endpoint"], s["synthetic"]
    lines += ["", "## Serving and synthetic data", "",
              f"Ray Serve endpoint {e['url']} served {e['models']}: completion {e['completion'][:50]!r}, "
              f"{e['stream_chunks']} streamed chunks, {e['prompt_tokens_scored']} prompt tokens scored (echo+logprobs).",
              f"Synthetic: {syn['tokens']:,} tokens in {syn['sequences']:,} sequences (mean length "
              f"{syn['mean_length']:.1f}).", "", "## Files", ""]
    lines += [f"- {k}: {v}" for k, v in s["paths"].items()]
    lines += ["", "## Time", "", " | ".join(f"{k} {v:.0f} s" for k, v in s["seconds"].items())
              + f" | total {s['wall_s']:.0f} s", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    d = PipelineConfig()
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=d.out, help=f"output directory (default {d.out})")
    p.add_argument("--corpus", nargs="+", default=[], help="corpus files/directories (default: the built-in corpus)")
    p.add_argument("--preset", default=d.preset, help=f"member preset (default {d.preset})")
    p.add_argument("--tokens", type=int, default=d.tokens, help=f"token budget D (default {d.tokens})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"member epochs (default {d.epochs})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    p.add_argument("--wd", type=float, default=d.wd, help=f"weight decay (default {d.wd})")
    p.add_argument("--k", type=int, default=d.k, help=f"ensemble members (default {d.k})")
    p.add_argument("--synthetic-tokens", type=int, default=d.synthetic_tokens,
                   help=f"synthetic tokens to generate (default {d.synthetic_tokens})")
    p.add_argument("--w", type=float, default=d.w, help=f"synthetic share of the student's batches (default {d.w})")
    p.add_argument("--student-preset", default=d.student_preset, help=f"student preset (default {d.student_preset})")
    p.add_argument("--tasks", nargs="*", default=[], help="extra downstream task files (JSON lines)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    args = p.parse_args(argv)
    setup_logging()
    cfg = PipelineConfig(out=args.out, corpus=tuple(args.corpus), preset=args.preset, tokens=args.tokens,
                         epochs=args.epochs, lr=args.lr, wd=args.wd, k=args.k, synthetic_tokens=args.synthetic_tokens,
                         w=args.w, student_preset=args.student_preset, tasks=tuple(args.tasks), address=args.address)
    with exit_on(ValueError):  # every stage's input errors are ValueErrors that name the problem
        run(cfg)


if __name__ == "__main__":
    main()
