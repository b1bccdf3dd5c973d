"""A generation job: an exact token budget of unconditional teacher samples, as Parquet shards with a manifest.

Layout of a synthetic data directory:
    manifest.json        the job (teacher hash, mode, sampling settings, budget, seed, shard quota) and every
                         finished shard's rows, tokens and sha256; rewritten atomically after each shard
    shard-NNNNN.parquet  one row per sequence: tokens (list<int32>, BOS first), length, seed (the shard's),
                         sequence_seed (the sequence's own, 63-bit), content_sha256 (of its token ids: the
                         job counts and reports sequences that repeat another exactly),
                         member (mixture: which member sampled it; ensemble: -1), sample_logprob (the engine's
                         log-probability of the stored tokens after BOS), teacher_sha256, sampling (JSON);
                         with `topk` > 0 also topk_ids, topk_logprobs, topk_tail: the teacher's k most likely next
                         tokens at every position but the last (format: synthdata/soft_targets.py), scored after
                         the shard is sampled, in one prefill pass per row through the same engine
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

On a cluster (`address`) the replicas are spread over the nodes, and a replica that dies with its node (or
alone) loses only the shard it was making: that shard goes back to the queue, whole, and the slot starts a
new replica on a live node (at most `max_restarts` times per job). Since a shard's content is fixed by
its seeds and only the driver writes, the job still ends with the exact budget and every shard once.

`endpoint`: sample through a live Chorus endpoint (serve/app.py) instead of starting engines, one request
per sequence carrying its seed (synthdata/endpoint.py); `replicas` shards are then made at a time. Same
shards, manifest and resume; each manifest entry records which source made it.
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

from synthdata.endpoint import EndpointSampler
from synthdata.engine import SamplingSettings, TeacherEngine, engine_env
from synthdata.soft_targets import METHOD as SOFT_TARGET_METHOD
from synthdata.soft_targets import topk_arrays
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
    endpoint: str | None = None  # a live Chorus endpoint's base URL: sample through it, start no engines
    max_restarts: int = 4  # replicas started again after one died (a node lost), per job
    restart_timeout_s: float = 600.0  # how long a replacement replica may wait for room on a live node
    topk: int = 0  # > 0: store the teacher's top-k next-token log-probs at every position (synthdata.soft_targets)


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
    if cfg.endpoint and cfg.mode != "ensemble":
        raise JobError("--endpoint samples the served ensemble: only --mode ensemble (mixture mode needs an engine "
                       "per member)")
    if not 0 <= cfg.topk <= teacher.vocab_size:
        raise JobError(f"topk must be in [0, {teacher.vocab_size}] (the teacher's vocabulary); got {cfg.topk}")
    if cfg.topk and cfg.endpoint:
        raise JobError("--topk scores each finished sequence with the teacher's engine: it needs engines, not "
                       "--endpoint")
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
    return job


# ---- manifest ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardedOutput:
    """A kind of sharded job output: a manifest of its format and shard-NNNNN.parquet files (generation jobs here,
    teacher annotations in synthdata/annotate.py share the manifest handling and repairs)."""
    format: str
    what: str  # what the directory holds
    job: str  # what makes it


SYNTHETIC = ShardedOutput(MANIFEST_FORMAT, "synthetic data", "generation job")


def read_manifest(out: str | Path, kind: ShardedOutput = SYNTHETIC) -> dict:
    path = Path(out) / "manifest.json"
    return read_json_manifest(path, kind.format, f"Chorus {kind.what} manifest",
                              f"no {kind.what} at {out}: {path} is missing", JobError)


def open_job(out: Path, job: dict, kind: ShardedOutput = SYNTHETIC) -> dict:
    """The job's manifest: new, or the existing one after checking it is the same job and repairing it.

    Repairs (each logged with the file's name): temp files deleted; recorded shards that are missing or
    whose sha256 differs dropped from the manifest (to be remade); shard files never recorded deleted."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.json"
    if not path.exists():
        manifest = {"format": kind.format, "job": job, "shards": []}
        atomic_write_json(path, manifest)
        return manifest
    manifest = read_manifest(out, kind)
    if manifest["job"] != job:
        diff = sorted(k for k in set(job) | set(manifest["job"]) if job.get(k) != manifest["job"].get(k))
        raise JobError(f"{out} holds another {kind.job} (differs in: {', '.join(diff)}); "
                       "use another --out or delete it")
    for tmp in sorted(out.glob("*.tmp")):
        log.warning("deleting %s: a file left half-written by an interrupted run", tmp.name)
        tmp.unlink()
    kept = []
    for shard in manifest["shards"]:
        name = shard.get("file")
        if not (isinstance(name, str) and Path(name).name == name and name.startswith("shard-")
                and name.endswith(".parquet")):  # "../../x", "/abs/x": a path, not a shard of this job
            raise JobError(f"{path} records a shard file {shard.get('file')!r} that is not a shard-NNNNN.parquet of "
                           f"{out}: the manifest is damaged or crafted; nothing outside {out} is touched (delete it "
                           f"to restart the job)")
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
    topk: list[tuple[np.ndarray, np.ndarray]] | None = None  # per row: (ids, log-probs) [len - 1, k]

    @property
    def count(self) -> int:
        return sum(len(t) for t in self.tokens)


def actor_sampler(engines: list, bos: int, settings: SamplingSettings):
    """A round's sequences to Ray engine actors: one call per member's engine, all at once."""
    import ray

    def sample(seeds_by_member: dict[int, list[int]]) -> dict[int, list]:
        calls = {m: engines[m].sample.remote(bos, seeds, settings) for m, seeds in seeds_by_member.items()}
        return {m: ray.get(ref) for m, ref in calls.items()}

    return sample


def actor_scorer(engines: list, k: int):
    """Top-k of finished rows by the engine that drew them (synthdata.soft_targets): {member: [tokens]} ->
    {member: [(ids, log-probs)]}, one call per member's engine, all at once."""
    import ray

    def score(rows_by_member: dict[int, list[np.ndarray]]) -> dict[int, list]:
        calls = {m: engines[m].topk.remote(rows, k) for m, rows in rows_by_member.items()}
        return {m: ray.get(ref) for m, ref in calls.items()}

    return score


def score_shard(rows: ShardRows, score) -> None:
    """Attach each row's teacher top-k: rows go to the engine of the member that sampled them (ensemble: 0)."""
    engine_of = [max(m, 0) for m in rows.members]
    by_member = {m: [t for t, e in zip(rows.tokens, engine_of) if e == m] for m in sorted(set(engine_of))}
    results = {m: iter(out) for m, out in score(by_member).items()}
    rows.topk = [next(results[e]) for e in engine_of]


def endpoint_sampler(sampler: EndpointSampler, bos: int, settings: SamplingSettings):
    def sample(seeds_by_member: dict[int, list[int]]) -> dict[int, list]:
        return {m: sampler.sample(bos, seeds, settings) for m, seeds in seeds_by_member.items()}

    return sample


def generate_shard(plan: ShardPlan, sample, members: int, bos: int, settings: SamplingSettings,
                   on_tokens=lambda n: None) -> ShardRows:
    """Sample sequences 0, 1, ... of the shard until its quota; cut the last one kept.

    `sample({member: [seeds]})` returns each member's (ids, logprobs) per seed, in order: one engine (ensemble
    mode, member 0) or one per member (mixture mode, `members` > 1)."""
    rows = ShardRows([], [], [], [])
    mean_len, start = float(settings.max_len), 0
    while rows.count < plan.quota:
        # Ask for about as many sequences as the remaining quota needs at the observed mean length.
        want = min(MAX_ROUND, math.ceil((plan.quota - rows.count) / mean_len))
        draws = sequence_draws(plan.seed, start, want, members)
        by_member = {m: [s for s, mm in draws if mm == m] for m in sorted({m for _, m in draws})}
        results = {m: iter(out) for m, out in sample(by_member).items()}
        lengths = []
        for seed, member in draws:
            ids, logprobs = next(results[member])
            lengths.append(len(ids) + 1)
            room = plan.quota - rows.count
            if room <= 0:
                continue  # sampled beyond the quota: dropped (the same sequences every time)
            keep = min(len(ids) + 1, room)
            rows.tokens.append(np.concatenate([[bos], ids[: keep - 1]]).astype(np.int32))
            rows.members.append(member if members > 1 else -1)
            rows.logprobs.append(float(logprobs[: keep - 1].sum()))
            rows.seeds.append(seed)
            on_tokens(keep)
        start += want
        mean_len = float(np.mean(lengths))
    return rows


def write_shard(out: Path, plan: ShardPlan, rows: ShardRows, job: dict, source: str = "engine") -> dict:
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
    if "soft_targets" in job:
        for name, column in topk_arrays([ids for ids, _ in rows.topk], [lps for _, lps in rows.topk],
                                        job["soft_targets"]["k"]).items():
            table = table.append_column(name, column)
    path = out / plan.file
    tmp = out / (plan.file + ".tmp")
    pq.write_table(table, tmp)
    publish_file(tmp, path)
    return {"file": plan.file, "index": plan.index, "seed": plan.seed, "rows": n, "tokens": rows.count,
            "sha256": sha256_file(path), "source": source}


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


class EngineReplicas:
    """The job's replicas on Ray: `replicas` groups of engines (one per model directory), and a new group for a
    slot whose group died (its node lost, an engine killed): at most `cfg.max_restarts` per job."""

    def __init__(self, model_dirs: list[Path], replicas: int, settings: SamplingSettings, cfg: GenerateConfig):
        import ray

        self.model_dirs, self.settings, self.cfg = model_dirs, settings, cfg
        n = replicas * len(model_dirs)
        self.local = cfg.address is None
        self.cores = engine_cores(n) if self.local else [None] * n
        self.actor = ray.remote(num_cpus=1)(TeacherEngine)
        self.restarts, self.lock = 0, threading.Lock()
        self.groups = [self._launch(r) for r in range(replicas)]
        ray.get([e.__ray_ready__.remote() for g in self.groups for e in g])  # engines up before the clock starts

    def _launch(self, slot: int) -> list:
        # On a cluster, one replica per node where there is room (SPREAD): a lost node takes one replica.
        placement = {} if self.local else {"scheduling_strategy": "SPREAD"}
        group = []
        for m, d in enumerate(self.model_dirs):
            env = engine_env(self.cfg.kv_cache_gib, self.cores[slot * len(self.model_dirs) + m])
            group.append(self.actor.options(runtime_env={"env_vars": env}, **placement)
                         .remote(str(d), self.settings.max_len, self.cfg.seed, self.cfg.topk))
        return group

    def sampler(self, slot: int, bos: int):
        return actor_sampler(self.groups[slot], bos, self.settings)

    def scorer(self, slot: int):
        return actor_scorer(self.groups[slot], self.cfg.topk)

    def release(self, slot: int) -> None:
        """Stop a slot's engines (its work is done, or it died): frees its node for a replacement."""
        import ray

        for engine in self.groups[slot]:
            try:
                ray.kill(engine)
            except Exception:  # already gone with its node
                pass

    def replace(self, slot: int, still_needed) -> bool:
        """Start a new group for `slot` on a live node; False when `still_needed()` turns false meanwhile."""
        import ray

        with self.lock:
            if self.restarts >= self.cfg.max_restarts:
                raise JobError(f"replica {slot} died and {self.restarts} replicas were already restarted in this job "
                               f"(max_restarts): giving up; re-run the same command to finish the job")
            self.restarts += 1
        self.release(slot)
        self.groups[slot] = group = self._launch(slot)
        refs = [e.__ray_ready__.remote() for e in group]
        deadline = time.monotonic() + self.cfg.restart_timeout_s
        while True:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
            if len(ready) == len(refs):
                ray.get(ready)  # an engine that failed to start raises here
                return True
            if not still_needed():
                self.release(slot)
                return False
            if time.monotonic() > deadline:
                self.release(slot)
                raise JobError(f"replica {slot} could not be restarted within {self.cfg.restart_timeout_s:.0f} s: "
                               f"no live node has room for it ({len(group)} engine(s) of 1 CPU)")


class EndpointReplicas:
    """`replicas` concurrent shards through one live endpoint; a failed request loses its shard's round, and the
    shard is retried after a pause (at most `cfg.max_restarts` times per job)."""

    def __init__(self, sampler: EndpointSampler, settings: SamplingSettings, cfg: GenerateConfig):
        self.endpoint, self.settings, self.cfg = sampler, settings, cfg
        self.restarts, self.lock = 0, threading.Lock()

    def sampler(self, slot: int, bos: int):
        return endpoint_sampler(self.endpoint, bos, self.settings)

    def release(self, slot: int) -> None:
        pass

    def replace(self, slot: int, still_needed) -> bool:
        with self.lock:
            if self.restarts >= self.cfg.max_restarts:
                raise JobError(f"the endpoint {self.cfg.endpoint} failed {self.restarts + 1} times in this job: "
                               "giving up; re-run the same command to finish the job")
            self.restarts += 1
        time.sleep(5.0)  # let Serve replace a lost replica
        return True


def replica_lost_errors() -> tuple[type[BaseException], ...]:
    """What a lost replica raises: its actor or node died (Ray), or the endpoint failed a request."""
    from synthdata.endpoint import EndpointError

    try:
        from ray import exceptions as rx
    except ImportError:  # an endpoint job on a machine without Ray
        return (EndpointError,)
    return (rx.RayActorError, rx.NodeDiedError, rx.WorkerCrashedError, rx.ObjectLostError, EndpointError)


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

    replicas = min(cfg.replicas, len(pending))
    if cfg.endpoint:
        log.info("sampling through the endpoint %s, %d shard(s) at a time", cfg.endpoint, replicas)
        source, members = EndpointReplicas(EndpointSampler.connect(cfg.endpoint, teacher.path), settings, cfg), 1
        summary = run_shards(cfg, out, job, manifest, pending, source, replicas, members, teacher.bos_token_id,
                             done_tokens, "endpoint")
    else:
        model_dirs = [teacher.path] if cfg.mode == "ensemble" else member_dirs(teacher, out / "teacher-members")
        log.info("starting %d replica(s) x %d engine(s) on %s (%s mode)", replicas, len(model_dirs), teacher.path,
                 cfg.mode)
        started_ray = connect_ray(cfg.address,
                                  None if cfg.address else max(os.cpu_count() or 1, replicas * len(model_dirs)))
        try:
            source = EngineReplicas(model_dirs, replicas, settings, cfg)
            summary = run_shards(cfg, out, job, manifest, pending, source, replicas, len(model_dirs),
                                 teacher.bos_token_id, done_tokens, "engine")
        finally:
            disconnect_ray(started_ray)  # only a Ray this job started; a caller's Ray is left running
    log.info("done: %d tokens in %d sequences (mean length %.1f); this run made %d tokens in %.1f s (%.0f tokens/s)",
             summary["tokens"], summary["sequences"], summary["mean_length"], summary["generated_this_run"],
             summary["wall_s"], summary["tokens_per_s"])
    return summary


def run_shards(cfg: GenerateConfig, out: Path, job: dict, manifest: dict, pending: list[ShardPlan], source,
               replicas: int, members: int, bos: int, done_tokens: int, source_name: str) -> dict:
    """One thread per replica slot takes the next pending shard until none is left; a shard whose replica was
    lost goes back to the queue, whole, and the slot gets a new replica (`source.replace`)."""
    lost = replica_lost_errors()
    manifest_lock, bar_lock = threading.Lock(), threading.Lock()
    todo: queue.Queue[ShardPlan] = queue.Queue()
    for p in pending:
        todo.put(p)
    recorded = {"shards": 0}
    bar = tqdm(total=cfg.tokens, initial=done_tokens, unit="tok", unit_scale=True, desc="generating",
               disable=not cfg.progress, smoothing=0.1)
    generated = 0

    def advance(n: int) -> None:
        nonlocal generated
        with bar_lock:
            generated += n
            bar.update(n)

    def unfinished() -> bool:
        with manifest_lock:
            return recorded["shards"] < len(pending)

    def work(slot: int) -> None:
        sample = source.sampler(slot, bos)
        try:
            while True:
                try:
                    plan = todo.get_nowait()
                except queue.Empty:
                    return
                made = 0

                def count(n: int) -> None:
                    nonlocal made
                    made += n
                    advance(n)

                try:
                    rows = generate_shard(plan, sample, members, bos, source.settings, count)
                    if cfg.topk:
                        score_shard(rows, source.scorer(slot))
                except lost as e:
                    advance(-made)  # the shard's partial rows are dropped; it is made again, whole
                    todo.put(plan)
                    log.warning("replica %d was lost while making %s (%s: %s): the shard goes back to the queue; "
                                "starting a new replica", slot, plan.file, type(e).__name__, str(e).splitlines()[0][:200])
                    if not source.replace(slot, unfinished):
                        return
                    sample = source.sampler(slot, bos)
                    continue
                entry = write_shard(out, plan, rows, job, source_name)
                with manifest_lock:
                    manifest["shards"] = sorted(manifest["shards"] + [entry], key=lambda s: s["index"])
                    atomic_write_json(out / "manifest.json", manifest)
                    recorded["shards"] += 1
                log.debug("shard %s: %d sequences, %d tokens (replica %d)", plan.file, entry["rows"], entry["tokens"],
                          slot)
        finally:
            source.release(slot)  # done: free its node for a replacement elsewhere

    start = time.perf_counter()
    with ThreadPoolExecutor(replicas) as pool:
        for f in [pool.submit(work, slot) for slot in range(replicas)]:
            f.result()
    wall = time.perf_counter() - start
    bar.close()
    if unfinished():  # every slot gave up while shards were left: cannot happen unless a slot raised
        raise JobError(f"{out}: {len(pending) - recorded['shards']} shard(s) left unmade; re-run to finish")
    return summarize(out, manifest, generated, wall)


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

