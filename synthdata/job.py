"""A generation job: an exact token budget of unconditional teacher samples, as Parquet shards with a manifest.

Layout of a synthetic data directory (the format and its repairs: synthdata/shards.py):
    manifest.json        the job (teacher hash, mode, sampling settings, budget, seed, shard quota) and every
                         finished shard's rows, tokens and sha256; rewritten atomically after each shard
    shard-NNNNN.parquet  one row per sequence (tokens, its seeds, content hash, member, log-prob, teacher, sampling;
                         with `topk` > 0 the teacher's top-k at every position but the last)
    teacher-members/     mixture mode only: the members extracted from a packed teacher

The budget counts stored tokens, BOS and EOS included, like train/'s budgets. It is cut into shards of
`shard_tokens` (the last one holds the remainder). Shard i's seed comes from (job seed, i) and sequence j
of shard i has its own seed from (shard seed, j). A shard keeps sequences j = 0, 1, ... until its quota is
reached; the last sequence it keeps is cut to fit, later ones are dropped. So a shard's content is fixed by the
job, whichever replica makes it, however it is batched and however often it is remade.

Continuous batching (`run_shards`, synthdata/batching.py): the driver keeps each engine's queue about `inflight`
sequences deep for the whole job. Shards are opened in order; a shard gets as many sequences as its remaining quota
needs at the observed mean length, and when its open sequences are expected to cover it the next shard's go in behind
them, so the engine never waits for a shard to be cut, scored (`topk`: the rows go back into the same engine's queue
as prefill requests) or written (a writer thread writes, hashes and records). Sequences a covered shard no longer
needs are aborted. Exactly-once: a shard is written to a temp file, renamed, then recorded in the manifest; on
restart `open_job` names and remakes a corrupt or unrecorded shard and deletes temp files.

Replicas (synthdata/replicas.py) are Ray actors each holding one vLLM engine (local Ray by default, or `address`),
driven by `TeacherEngine.advance` calls (add requests, abort requests, step for half a second, return what
finished) from one driver loop; the driver alone writes files.

On a cluster (`address`) the replicas are spread over the nodes, and a replica that dies with its node (or
alone) or hangs (a call unanswered for `hang_timeout_s`) loses only the shards it was making: they go back to the
queue, whole, and the slot starts a new replica on a live node (at most `max_restarts` times per job). Ctrl-C or
SIGTERM ends the loop at once (engines killed, Ray stopped; a shard being written is finished and recorded whole,
none is recorded partly) and the same command resumes. Since a shard's content is fixed by
its seeds and only the driver writes, the job still ends with the exact budget and every shard once.

`endpoint`: sample through a live Chorus endpoint (serve/app.py) instead of starting engines, one request
per sequence carrying its seed (synthdata/endpoint.py), kept `inflight` deep per slot across shards by the same
loop (`replicas` slots). Same shards, manifest and resume; each manifest entry records which source made it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve.draft import check_draft, draft_identity, speculative_config
from synthdata.batching import run_shards
from synthdata.endpoint import EndpointSampler
from synthdata.engine import SamplingSettings
from synthdata.replicas import EndpointReplicas, EngineReplicas
from synthdata.shards import JobError, ShardPlan, duplicate_sequences, open_job
from synthdata.soft_targets import METHOD as SOFT_TARGET_METHOD
from synthdata.teacher import Teacher, member_dirs, read_teacher
from plumbing.artifacts import OutputLock
from plumbing.config_flags import setting
from plumbing.ray_session import connect_ray, disconnect_ray

log = logging.getLogger(__name__)

MODES = ("ensemble", "mixture")


@dataclass(frozen=True)
class GenerateConfig:
    """A generation job; `python -m synthdata generate`'s flags are derived from these fields."""
    teacher: str = setting(help="teacher model directory (serve/'s packed ensemble, or a member)")
    tokens: int = setting(help="exact budget of stored tokens (BOS and EOS included)")
    out: str = setting(help="output directory (shards + manifest.json)")
    mode: str = setting("ensemble", "ensemble: sample the logit-averaged ensemble (default); mixture: each sequence "
                                    "from one member drawn at random (one engine per member)", choices=MODES)
    replicas: int = setting(1, "engine replicas in parallel (default %(default)s)")
    temperature: float = setting(1.0, "sampling temperature (default %(default)g)")
    top_p: float = setting(1.0, "nucleus sampling threshold (default %(default)g: off)")
    max_len: int | None = setting(None, "tokens per sequence, BOS included (default: the teacher's context)")
    seed: int = setting(0, "job seed: fixes every shard's and sequence's seed (default %(default)s)")
    shard_tokens: int = setting(100_000, "tokens per shard, the unit of resume (default %(default)s)")
    address: str | None = setting(None, "Ray cluster address (default: start a local Ray); every node must see "
                                        "--teacher and --out at the same paths (a shared filesystem)")
    kv_cache_gib: float = setting(1.0, "KV cache per engine on CPU, GiB (default %(default)g)")
    progress: bool = setting(True, "no progress bar")  # the flag is --no-progress
    endpoint: str | None = setting(  # a live Chorus endpoint's base URL: sample through it, start no engines
        None, "base URL of a live Chorus endpoint (`python -m serve up`) serving --teacher: sample through it (one "
              "request per sequence, with its seed) instead of starting engines; --replicas shards at a time; key "
              "from $CHORUS_API_KEY")
    max_restarts: int = setting(  # replicas started again after one died (a node lost), per job
        4, "replicas restarted (or endpoint failures retried) per job after one is lost (default %(default)s)")
    restart_timeout_s: float = 600.0  # how long a replacement replica may wait for room on a live node
    topk: int = setting(  # > 0: the teacher's top-k next-token log-probs at every position (synthdata.soft_targets)
        0, "also store the teacher's k most likely next tokens and their log-probs at every position (soft labels "
           "for `python -m distill --blend`; temperature 1, no top-p); default %(default)s: off")
    inflight: int = setting(512, "sequences kept in each engine's queue (endpoint: requests in flight per slot); "
                                 "default %(default)s")
    hang_timeout_s: float = setting(300.0, "an engine call unanswered this long is a hung engine, replaced like a "
                                           "dead one (default %(default)g)")
    draft: str | None = setting(  # speculative decoding (serve/draft.py): this model drafts, the teacher verifies
        None, "speculative decoding: this model (the distilled student, a member, any Llama sharing the tokenizer) "
              "drafts, the teacher verifies; samples keep the teacher's distribution (other tokens than without it, "
              "so another job)")
    num_speculative_tokens: int = setting(4, "tokens the draft proposes per step (default %(default)s)")


def derive_seed(*entropy: int) -> int:
    """A 63-bit seed from integers: independent streams for (job, shard) and (shard, sequence).

    63 bits, not 31: every sequence starts from the same prompt (BOS), so two equal seeds are two equal
    sequences; with 31 bits a job of 25k sequences has a ~14% chance of one such pair, at 63 bits a job of a
    billion sequences has ~5e-2. (63 rather than 64 so the seed fits Parquet's int64 and any JSON reader.)"""
    hi, lo = np.random.SeedSequence(list(entropy)).generate_state(2, np.uint32)
    return int((int(hi) << 32 | int(lo)) >> 1)


def plan_shards(tokens: int, shard_tokens: int, seed: int) -> list[ShardPlan]:
    n = -(-tokens // shard_tokens)
    return [ShardPlan(i, min(shard_tokens, tokens - i * shard_tokens), derive_seed(seed, i)) for i in range(n)]


def check_config(cfg: GenerateConfig, teacher: Teacher) -> SamplingSettings:
    if cfg.tokens <= 0:
        raise JobError(f"token budget must be positive (got {cfg.tokens})")
    if cfg.mode not in MODES:
        raise JobError(f"unknown mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    if cfg.replicas < 1:
        raise JobError(f"replicas must be >= 1 (got {cfg.replicas})")
    if cfg.endpoint and cfg.mode != "ensemble":
        raise JobError("--endpoint samples the served ensemble: only --mode ensemble (mixture mode needs an engine "
                       "per member)")
    if not 0 <= cfg.topk <= teacher.vocab_size:
        raise JobError(f"topk must be in [0, {teacher.vocab_size}] (the teacher's vocabulary); got {cfg.topk}")
    if cfg.topk and cfg.endpoint:
        raise JobError("--topk scores each finished sequence with the teacher's engine: it needs engines, not "
                       "--endpoint")
    if cfg.inflight < 1:
        raise JobError(f"inflight must be >= 1 (got {cfg.inflight})")
    if cfg.draft is not None:
        if cfg.endpoint:
            raise JobError("--draft starts the job's own engines with a draft: with --endpoint, give the draft to "
                           "`serve up --draft` instead")
        check_draft(teacher.path, cfg.draft)  # another tokenizer or vocabulary is named before any engine starts
        speculative_config(cfg.draft, cfg.num_speculative_tokens)
    if not cfg.hang_timeout_s > 0:
        raise JobError(f"hang_timeout_s must be > 0 (got {cfg.hang_timeout_s})")
    if cfg.shard_tokens < 1:
        raise JobError(f"shard_tokens must be >= 1 (got {cfg.shard_tokens})")
    if not cfg.temperature > 0:
        raise JobError(f"temperature must be > 0 (got {cfg.temperature}); greedy decoding is not sampling")
    if not 0 < cfg.top_p <= 1:
        raise JobError(f"top_p must be in (0, 1] (got {cfg.top_p})")
    max_len = cfg.max_len or teacher.context
    if not 2 <= max_len <= teacher.context:
        raise JobError(f"max_len must be in [2, {teacher.context}] (the teacher's context); got {max_len}")
    return SamplingSettings(cfg.temperature, cfg.top_p, max_len)


def job_record(cfg: GenerateConfig, teacher: Teacher, settings: SamplingSettings) -> dict:
    """What makes two runs the same job (replicas, address and progress do not change the tokens)."""
    job = {"teacher_sha256": teacher.sha256, "teacher_members": teacher.members, "mode": cfg.mode,
           "tokens": cfg.tokens, "seed": cfg.seed, "shard_tokens": cfg.shard_tokens, "sampling": settings.as_dict(),
           "bos_token_id": teacher.bos_token_id, "eos_token_id": teacher.eos_token_id,
           "vocab_size": teacher.vocab_size, "tokenizer_sha256": teacher.tokenizer_sha256}
    if cfg.topk:  # absent when off: jobs made before --topk existed stay the same jobs
        job["soft_targets"] = {"k": cfg.topk, "method": SOFT_TARGET_METHOD}
    if cfg.draft is not None:  # the same distribution, other tokens: a job with a draft is another job
        job["draft"] = draft_identity(cfg.draft, cfg.num_speculative_tokens)
    return job


def engine_cores(n_engines: int) -> list[str | None]:
    """Local machine: split its cores between the engines (vLLM binds its threads; unsplit, every engine
    would bind the same ones). More engines than cores share cores round-robin."""
    cores = sorted(os.sched_getaffinity(0))
    if n_engines <= len(cores):
        per = len(cores) // n_engines
        blocks = [cores[i * per: (i + 1) * per] for i in range(n_engines)]
        return [f"{b[0]}-{b[-1]}" if len(b) > 1 else str(b[0]) for b in blocks]
    return [str(cores[i % len(cores)]) for i in range(n_engines)]


def generate(cfg: GenerateConfig) -> dict:
    """Run (or finish) the job; return its summary. Re-running a finished job does nothing.

    Two jobs on one --out would delete each other's shards: the second is refused, naming the first. Ctrl-C or
    SIGTERM (KeyboardInterrupt) ends generation at once: the engines are killed, no partial shard is recorded,
    and the same command resumes."""
    with OutputLock(cfg.out):
        return _generate(cfg)


def _generate(cfg: GenerateConfig) -> dict:
    teacher = read_teacher(cfg.teacher)
    settings = check_config(cfg, teacher)
    job = job_record(cfg, teacher, settings)
    out = Path(cfg.out)
    manifest = open_job(out, job)
    plans = plan_shards(cfg.tokens, cfg.shard_tokens, cfg.seed)
    done = {s["index"] for s in manifest["shards"]}
    pending = [p for p in plans if p.index not in done]
    done_tokens = sum(s["tokens"] for s in manifest["shards"])
    if not pending:
        log.info("%s is complete: %d shards, %d tokens; nothing to do", out, len(plans), done_tokens)
        return summarize(out, manifest, generated=0, wall=0.0)
    log.info("%s: %d of %d shards to generate (%d of %d tokens already done)", out, len(pending), len(plans),
             done_tokens, cfg.tokens)

    replicas = min(cfg.replicas, len(pending))
    if cfg.endpoint:
        log.info("sampling through the endpoint %s, %d slot(s) of up to %d requests in flight", cfg.endpoint, replicas,
                 cfg.inflight)
        source = EndpointReplicas(EndpointSampler.connect(cfg.endpoint, teacher.path, cfg.inflight), replicas,
                                  settings, cfg)
        try:
            made = run_shards(cfg, out, job, manifest, pending, source, replicas, teacher.bos_token_id, done_tokens,
                              "endpoint")
        finally:
            for slot in range(replicas):
                source.release(slot)
    else:
        model_dirs = [teacher.path] if cfg.mode == "ensemble" else member_dirs(teacher, out / "teacher-members")
        log.info("starting %d replica(s) x %d engine(s) on %s (%s mode)", replicas, len(model_dirs), teacher.path,
                 cfg.mode)
        started_ray = connect_ray(cfg.address,
                                  None if cfg.address else max(os.cpu_count() or 1, replicas * len(model_dirs)))
        try:
            n_engines = replicas * len(model_dirs)
            cores = engine_cores(n_engines) if cfg.address is None else [None] * n_engines
            source = EngineReplicas(model_dirs, replicas, settings, cfg, cores)
            try:
                made = run_shards(cfg, out, job, manifest, pending, source, replicas, teacher.bos_token_id,
                                  done_tokens, "engine")
            finally:
                for slot in range(replicas):
                    source.release(slot)  # at once, also on Ctrl-C / SIGTERM: nothing keeps sampling
        finally:
            disconnect_ray(started_ray)  # only a Ray this job started; a caller's Ray is left running
    summary = {**summarize(out, manifest, made["generated"], made["wall_s"]),
               "aborted_sequences": made["aborted_sequences"], "top_ups": made["top_ups"]}
    log.info("done: %d tokens in %d sequences (mean length %.1f); this run made %d tokens in %.1f s (%.0f tokens/s)",
             summary["tokens"], summary["sequences"], summary["mean_length"], summary["generated_this_run"],
             summary["wall_s"], summary["tokens_per_s"])
    return summary


def summarize(out: Path, manifest: dict, generated: int, wall: float) -> dict:
    tokens = sum(s["tokens"] for s in manifest["shards"])
    duplicates = duplicate_sequences(out, manifest)
    if duplicates:
        log.warning("%s: %d sequence(s) repeat an earlier sequence's tokens exactly", out, duplicates)
    sequences = sum(s["rows"] for s in manifest["shards"])
    return {"tokens": tokens, "sequences": sequences, "shards": len(manifest["shards"]),
            "mean_length": tokens / max(1, sequences), "generated_this_run": generated, "wall_s": wall,
            "tokens_per_s": generated / wall if wall else 0.0,
            "duplicates": duplicates, "complete": tokens == manifest["job"]["tokens"]}

