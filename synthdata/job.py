"""A generation job: an exact token budget of unconditional teacher samples, as Parquet shards with a manifest.

Layout of a synthetic data directory:
    manifest.json        the job (teacher hash, mode, sampling settings, budget, seed, shard quota) and every
                         finished shard's rows, tokens and sha256; rewritten atomically after each shard
    shard-NNNNN.parquet  one row per sequence: tokens (list<int32>, BOS first), length, seed (the shard's),
                         sequence_seed (the sequence's own, 63-bit), content_sha256 (of its token ids: the
                         job counts and reports sequences that repeat another exactly),
                         member (mixture: which member sampled it; ensemble: -1), sample_logprob (the engine's
                         log-probability of the stored tokens after BOS), teacher_sha256, sampling (JSON)
    teacher-members/     mixture mode only: the members extracted from a packed teacher

The budget counts stored tokens, BOS and EOS included, like train/'s budgets. It is cut into shards of
`shard_tokens` (the last one holds the remainder). Shard i's seed comes from (job seed, i) and sequence j
of shard i has its own seed from (shard seed, j). A shard samples sequences j = 0, 1, ... in rounds
until its quota is reached; the last sequence it keeps is cut to fit, later ones are dropped. So a shard's
content is fixed by the job, whichever replica makes it and however often it is remade.

Exactly-once: a shard is written to a temp file, renamed, then recorded in the manifest. On restart a
recorded shard whose bytes no longer match its sha256 is named and remade, a shard file that never made
it into the manifest (killed between rename and record) is remade, and temp files are deleted.

Replicas are Ray actors each holding one vLLM engine (local Ray by default, or `address`). The driver keeps
one thread per replica slot, each taking the next pending shard; the driver alone writes files. Ray
actors rather than Ray Data or the Ray Serve deployment: a shard must be one unit (made in full or not at
all, by one writer), and actor calls with explicit seeds give that with the least machinery; a Serve
endpoint would add HTTP and batching we do not need for offline work.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from synthdata.engine import SamplingSettings, TeacherEngine, engine_env
from synthdata.teacher import Teacher, member_dirs, read_teacher
from train.artifacts import OutputLock, atomic_write_json, publish_file
from train.data import read_json_manifest, sha256_file
from train.ray_session import connect_ray, disconnect_ray

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "chorus.synthetic.v2"  # v2: 63-bit sequence seeds, a content hash per sequence
MODES = ("ensemble", "mixture")
MAX_ROUND = 1024  # sequences per engine call: bounds memory, large enough to keep the engine busy


class JobError(ValueError):
    """Bad job settings, or an output directory that holds another job."""


@dataclass(frozen=True)
class GenerateConfig:
    teacher: str
    tokens: int
    out: str
    mode: str = "ensemble"
    replicas: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_len: int | None = None  # default: the teacher's context
    seed: int = 0
    shard_tokens: int = 100_000
    address: str | None = None
    kv_cache_gib: float = 1.0
    progress: bool = True


@dataclass(frozen=True)
class ShardPlan:
    index: int
    quota: int
    seed: int

    @property
    def file(self) -> str:
        return f"shard-{self.index:05d}.parquet"


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


def sequence_draws(shard_seed: int, start: int, count: int, members: int) -> list[tuple[int, int]]:
    """(sequence seed, member) for sequences start .. start+count-1 of a shard; member is 0 when members == 1."""
    draws = []
    for j in range(start, start + count):
        state = np.random.SeedSequence([shard_seed, j]).generate_state(3, np.uint32)
        draws.append(((int(state[0]) << 32 | int(state[1])) >> 1, int(state[2] % members)))
    return draws


def content_hash(tokens: np.ndarray) -> str:
    """sha256 of a sequence's token ids (int32 little-endian): equal sequences, equal hashes."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i4").tobytes()).hexdigest()


def check_config(cfg: GenerateConfig, teacher: Teacher) -> SamplingSettings:
    if cfg.tokens <= 0:
        raise JobError(f"token budget must be positive (got {cfg.tokens})")
    if cfg.mode not in MODES:
        raise JobError(f"unknown mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    if cfg.replicas < 1:
        raise JobError(f"replicas must be >= 1 (got {cfg.replicas})")
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
    return {"teacher_sha256": teacher.sha256, "teacher_members": teacher.members, "mode": cfg.mode,
            "tokens": cfg.tokens, "seed": cfg.seed, "shard_tokens": cfg.shard_tokens, "sampling": settings.as_dict(),
            "bos_token_id": teacher.bos_token_id, "eos_token_id": teacher.eos_token_id,
            "vocab_size": teacher.vocab_size, "tokenizer_sha256": teacher.tokenizer_sha256}


# ---- manifest ----------------------------------------------------------------------------------

def read_manifest(out: str | Path) -> dict:
    path = Path(out) / "manifest.json"
    return read_json_manifest(path, MANIFEST_FORMAT, "Chorus synthetic-data manifest",
                              f"no synthetic data at {out}: {path} is missing", JobError)


def open_job(out: Path, job: dict) -> dict:
    """The job's manifest: new, or the existing one after checking it is the same job and repairing it.

    Repairs (each logged with the file's name): temp files deleted; recorded shards that are missing or
    whose sha256 differs dropped from the manifest (to be remade); shard files never recorded deleted."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.json"
    if not path.exists():
        manifest = {"format": MANIFEST_FORMAT, "job": job, "shards": []}
        atomic_write_json(path, manifest)
        return manifest
    manifest = read_manifest(out)
    if manifest["job"] != job:
        diff = sorted(k for k in set(job) | set(manifest["job"]) if job.get(k) != manifest["job"].get(k))
        raise JobError(f"{out} holds another generation job (differs in: {', '.join(diff)}); "
                       "use another --out or delete it")
    for tmp in sorted(out.glob("*.tmp")):
        log.warning("deleting %s: a file left half-written by an interrupted run", tmp.name)
        tmp.unlink()
    kept = []
    for shard in manifest["shards"]:
        file = out / shard["file"]
        if not file.exists():
            log.warning("shard %s is recorded but missing: it will be regenerated", shard["file"])
        elif sha256_file(file) != shard["sha256"]:
            log.warning("shard %s is corrupt (sha256 differs from the manifest): it will be regenerated", shard["file"])
            file.unlink()
        else:
            kept.append(shard)
    recorded = {s["file"] for s in kept}
    for file in sorted(out.glob("shard-*.parquet")):
        if file.name not in recorded:
            log.warning("shard %s was written but never recorded: it will be regenerated", file.name)
            file.unlink()
    if kept != manifest["shards"]:
        manifest["shards"] = kept
        atomic_write_json(path, manifest)
    return manifest


# ---- one shard ---------------------------------------------------------------------------------

@dataclass
class ShardRows:
    tokens: list[np.ndarray]
    members: list[int]
    logprobs: list[float]
    seeds: list[int]

    @property
    def count(self) -> int:
        return sum(len(t) for t in self.tokens)


def generate_shard(plan: ShardPlan, engines: list, bos: int, settings: SamplingSettings,
                   on_tokens=lambda n: None) -> ShardRows:
    """Sample sequences 0, 1, ... of the shard until its quota; cut the last one kept.

    `engines` holds one actor (ensemble mode) or one per member (mixture mode); a round's sequences go to
    the engine of their member, all at once."""
    import ray

    rows = ShardRows([], [], [], [])
    mean_len, start = float(settings.max_len), 0
    while rows.count < plan.quota:
        # Ask for about as many sequences as the remaining quota needs at the observed mean length.
        want = min(MAX_ROUND, math.ceil((plan.quota - rows.count) / mean_len))
        draws = sequence_draws(plan.seed, start, want, len(engines))
        calls = {m: engines[m].sample.remote(bos, [s for s, mm in draws if mm == m], settings)
                 for m in sorted({m for _, m in draws})}
        results = {m: iter(ray.get(ref)) for m, ref in calls.items()}
        lengths = []
        for seed, member in draws:
            ids, logprobs = next(results[member])
            lengths.append(len(ids) + 1)
            room = plan.quota - rows.count
            if room <= 0:
                continue  # sampled beyond the quota: dropped (the same sequences every time)
            keep = min(len(ids) + 1, room)
            rows.tokens.append(np.concatenate([[bos], ids[: keep - 1]]).astype(np.int32))
            rows.members.append(member if len(engines) > 1 else -1)
            rows.logprobs.append(float(logprobs[: keep - 1].sum()))
            rows.seeds.append(seed)
            on_tokens(keep)
        start += want
        mean_len = float(np.mean(lengths))
    return rows


def write_shard(out: Path, plan: ShardPlan, rows: ShardRows, job: dict) -> dict:
    """Write the shard atomically; return its manifest entry."""
    n = len(rows.tokens)
    table = pa.table({
        "tokens": pa.array(rows.tokens, type=pa.list_(pa.int32())),
        "length": pa.array([len(t) for t in rows.tokens], type=pa.int32()),
        "seed": pa.array([plan.seed] * n, type=pa.int64()),
        "sequence_seed": pa.array(rows.seeds, type=pa.int64()),
        "content_sha256": pa.array([content_hash(t) for t in rows.tokens], type=pa.string()),
        "member": pa.array(rows.members, type=pa.int16()),
        "sample_logprob": pa.array(rows.logprobs, type=pa.float64()),
        "teacher_sha256": pa.array([job["teacher_sha256"]] * n, type=pa.string()),
        "sampling": pa.array([json.dumps(job["sampling"], sort_keys=True)] * n, type=pa.string()),
    })
    path = out / plan.file
    tmp = out / (plan.file + ".tmp")
    pq.write_table(table, tmp)
    publish_file(tmp, path)
    return {"file": plan.file, "index": plan.index, "seed": plan.seed, "rows": n, "tokens": rows.count,
            "sha256": sha256_file(path)}


# ---- the job -----------------------------------------------------------------------------------

def engine_cores(n_engines: int) -> list[str | None]:
    """Local machine: split its cores between the engines (vLLM binds its threads; unsplit, every engine
    would bind the same ones). More engines than cores share cores round-robin."""
    cores = sorted(os.sched_getaffinity(0))
    if n_engines <= len(cores):
        per = len(cores) // n_engines
        blocks = [cores[i * per: (i + 1) * per] for i in range(n_engines)]
        return [f"{b[0]}-{b[-1]}" if len(b) > 1 else str(b[0]) for b in blocks]
    return [str(cores[i % len(cores)]) for i in range(n_engines)]


def start_engines(model_dirs: list[Path], replicas: int, settings: SamplingSettings, cfg: GenerateConfig) -> list[list]:
    """`replicas` groups of engines, one engine per model directory in each group."""
    import ray

    n = replicas * len(model_dirs)
    local = cfg.address is None
    cores = engine_cores(n) if local else [None] * n
    actor = ray.remote(num_cpus=1)(TeacherEngine)
    groups = []
    for r in range(replicas):
        group = []
        for m, d in enumerate(model_dirs):
            env = engine_env(cfg.kv_cache_gib, cores[r * len(model_dirs) + m])
            group.append(actor.options(runtime_env={"env_vars": env}).remote(str(d), settings.max_len, cfg.seed))
        groups.append(group)
    ray.get([e.__ray_ready__.remote() for g in groups for e in g])  # engines up before the clock starts
    return groups


def generate(cfg: GenerateConfig) -> dict:
    """Run (or finish) the job; return its summary. Re-running a finished job does nothing.

    Two jobs on one --out would delete each other's shards: the second is refused, naming the first."""
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

    model_dirs = [teacher.path] if cfg.mode == "ensemble" else member_dirs(teacher, out / "teacher-members")
    replicas = min(cfg.replicas, len(pending))
    log.info("starting %d replica(s) x %d engine(s) on %s (%s mode)", replicas, len(model_dirs), teacher.path, cfg.mode)
    started_ray = connect_ray(cfg.address, None if cfg.address else max(os.cpu_count() or 1, replicas * len(model_dirs)))
    try:
        groups = start_engines(model_dirs, replicas, settings, cfg)
        manifest_lock, bar_lock = threading.Lock(), threading.Lock()
        todo: queue.Queue[ShardPlan] = queue.Queue()
        for p in pending:
            todo.put(p)
        bar = tqdm(total=cfg.tokens, initial=done_tokens, unit="tok", unit_scale=True, desc="generating",
                   disable=not cfg.progress, smoothing=0.1)
        generated = 0

        def advance(n: int) -> None:
            nonlocal generated
            with bar_lock:
                generated += n
                bar.update(n)

        def work(engines: list) -> None:
            while True:
                try:
                    plan = todo.get_nowait()
                except queue.Empty:
                    return
                rows = generate_shard(plan, engines, teacher.bos_token_id, settings, advance)
                entry = write_shard(out, plan, rows, job)
                with manifest_lock:
                    manifest["shards"] = sorted(manifest["shards"] + [entry], key=lambda s: s["index"])
                    atomic_write_json(out / "manifest.json", manifest)
                log.debug("shard %s: %d sequences, %d tokens", plan.file, entry["rows"], entry["tokens"])

        start = time.perf_counter()
        with ThreadPoolExecutor(len(groups)) as pool:
            for f in [pool.submit(work, g) for g in groups]:
                f.result()
        wall = time.perf_counter() - start
        bar.close()
    finally:
        disconnect_ray(started_ray)  # only a Ray this job started; a caller's Ray is left running
    summary = summarize(out, manifest, generated, wall)
    log.info("done: %d tokens in %d sequences (mean length %.1f); this run made %d tokens in %.1f s (%.0f tokens/s)",
             summary["tokens"], summary["sequences"], summary["mean_length"], generated, wall,
             summary["tokens_per_s"])
    return summary


def duplicate_sequences(out: Path, manifest: dict) -> int:
    """How many recorded sequences repeat an earlier one's content (by content_sha256)."""
    seen, dups = set(), 0
    for shard in manifest["shards"]:
        for h in pq.read_table(out / shard["file"], columns=["content_sha256"]).column(0).to_pylist():
            dups += h in seen
            seen.add(h)
    return dups


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

