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

Continuous batching (`run_shards`): the driver keeps each engine's queue about `inflight` sequences deep for the
whole job. Shards are opened in order; a shard gets as many sequences as its remaining quota needs at the observed
mean length, and when its open sequences are expected to cover it the next shard's go in behind them, so the engine
never waits for a shard to be cut, scored (`topk`: the rows go back into the same engine's queue as prefill
requests) or written (a writer thread writes, hashes and records). Sequences a covered shard no longer needs are
aborted. Exactly-once: a shard is written to a temp file, renamed, then recorded in the manifest; on restart
`open_job` names and remakes a corrupt or unrecorded shard and deletes temp files.

Replicas are Ray actors each holding one vLLM engine (local Ray by default, or `address`), driven by
`TeacherEngine.advance` calls (add requests, abort requests, step for half a second, return what finished) from
one driver loop; the driver alone writes files. Ray
actors rather than Ray Data or the Ray Serve deployment: a shard must be one unit (made in full or not at
all, by one writer), and actor calls with explicit seeds give that with the least machinery; a Serve
endpoint would add HTTP and batching we do not need for offline work.

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
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from serve.draft import check_draft, draft_identity, speculative_config
from synthdata.endpoint import EndpointClient, EndpointSampler
from synthdata.engine import SamplingSettings, TeacherEngine, engine_env
from synthdata.shards import (MANIFEST_FORMAT, SYNTHETIC, JobError, ShardedOutput, ShardPlan, ShardRows,  # noqa: F401
                              content_hash, duplicate_sequences, open_job, read_manifest, record_shard, write_shard)
from synthdata.soft_targets import METHOD as SOFT_TARGET_METHOD
from synthdata.teacher import Teacher, member_dirs, read_teacher
from plumbing.artifacts import OutputLock
from plumbing.ray_session import connect_ray, disconnect_ray

log = logging.getLogger(__name__)

MODES = ("ensemble", "mixture")
MAX_ROUND = 1024  # sequences of one shard added in one go: bounds what a top-up asks for

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
    inflight: int = 512  # sequences kept in each engine's queue (endpoint: requests in flight per slot)
    hang_timeout_s: float = 300.0  # an engine call unanswered this long is a hung engine: replaced like a dead one
    draft: str | None = None  # speculative decoding (serve/draft.py): this model drafts, the teacher verifies
    num_speculative_tokens: int = 4  # tokens the draft proposes per step


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
    slot whose group died (its node lost, an engine killed) or hung: at most `cfg.max_restarts` per job.

    `call(slot, member, ...)` sends one `TeacherEngine.advance` to an engine (requests to add and to abort; the
    engine steps for `BUDGET_S` and returns what finished); `wait` / `result` are Ray's."""

    def __init__(self, model_dirs: list[Path], replicas: int, settings: SamplingSettings, cfg: GenerateConfig):
        import ray

        self.model_dirs, self.settings, self.cfg = model_dirs, settings, cfg
        self.members = len(model_dirs)
        n = replicas * len(model_dirs)
        self.local = cfg.address is None
        self.cores = engine_cores(n) if self.local else [None] * n
        self.actor = ray.remote(num_cpus=1)(TeacherEngine)
        self.speculative = (speculative_config(cfg.draft, cfg.num_speculative_tokens) if cfg.draft is not None
                            else None)
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
                         .remote(str(d), self.settings.max_len, self.cfg.seed, self.cfg.topk, self.speculative))
        return group

    def call(self, slot: int, member: int, bos: int, sample: list, score: list, abort: list):
        return self.groups[slot][member].advance.remote(bos, self.settings, sample, score, abort, self.cfg.topk,
                                                         BUDGET_S)

    @staticmethod
    def wait(handles: list, timeout: float) -> list:
        import ray

        return ray.wait(handles, num_returns=1, timeout=timeout)[0] if handles else []

    @staticmethod
    def result(handle) -> list:
        import ray

        return ray.get(handle)

    def release(self, slot: int) -> None:
        """Stop a slot's engines (its work is done, it died or hung): frees its node for a replacement."""
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
                raise JobError(f"replica {slot} was lost and {self.restarts} replicas were already restarted in this "
                               f"job (max_restarts): giving up; re-run the same command to finish the job")
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
    """`replicas` slots on one live endpoint, each with its own requests in flight (EndpointClient); a failed request
    loses its slot's shards, which go back to the queue whole; retried after a pause (at most `cfg.max_restarts`
    times per job)."""

    members = 1

    def __init__(self, sampler: EndpointSampler, replicas: int, settings: SamplingSettings, cfg: GenerateConfig):
        self.endpoint, self.settings, self.cfg = sampler, settings, cfg
        self.restarts, self.lock = 0, threading.Lock()
        self.clients = [EndpointClient(sampler, settings) for _ in range(replicas)]

    def call(self, slot: int, member: int, bos: int, sample: list, score: list, abort: list):
        return self.clients[slot].advance(bos, sample, abort, BUDGET_S)

    @staticmethod
    def wait(handles: list, timeout: float) -> list:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_futures

        return list(wait_futures(handles, timeout=timeout, return_when=FIRST_COMPLETED).done) if handles else []

    @staticmethod
    def result(handle) -> list:
        return handle.result()

    def release(self, slot: int) -> None:
        self.clients[slot].close()

    def replace(self, slot: int, still_needed) -> bool:
        with self.lock:
            if self.restarts >= self.cfg.max_restarts:
                raise JobError(f"the endpoint {self.cfg.endpoint} failed {self.restarts + 1} times in this job: "
                               "giving up; re-run the same command to finish the job")
            self.restarts += 1
        self.clients[slot].close()
        time.sleep(5.0)  # let Serve replace a lost replica
        self.clients[slot] = EndpointClient(self.endpoint, self.settings)
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
            summary = run_shards(cfg, out, job, manifest, pending, source, replicas, teacher.bos_token_id,
                                 done_tokens, "endpoint")
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
            source = EngineReplicas(model_dirs, replicas, settings, cfg)
            try:
                summary = run_shards(cfg, out, job, manifest, pending, source, replicas, teacher.bos_token_id,
                                     done_tokens, "engine")
            finally:
                for slot in range(replicas):
                    source.release(slot)  # at once, also on Ctrl-C / SIGTERM: nothing keeps sampling
        finally:
            disconnect_ray(started_ray)  # only a Ray this job started; a caller's Ray is left running
    log.info("done: %d tokens in %d sequences (mean length %.1f); this run made %d tokens in %.1f s (%.0f tokens/s)",
             summary["tokens"], summary["sequences"], summary["mean_length"], summary["generated_this_run"],
             summary["wall_s"], summary["tokens_per_s"])
    return summary


# ---- continuous batching across shards ------------------------------------------------------------

BUDGET_S = 0.5  # an engine steps this long per call before reporting what finished (requests stay queued)


@dataclass
class ShardWork:
    """A shard being made on one slot: its sequences' results so far and the ones in flight."""
    plan: ShardPlan
    slot: int
    members: int
    results: dict[int, tuple[np.ndarray, np.ndarray, int]] = field(default_factory=dict)  # j -> (ids, lps, member)
    inflight: dict[int, int] = field(default_factory=dict)  # j -> member, sampling now
    next_j: int = 0  # next sequence to submit
    prefix: int = 0  # sequences 0 .. prefix-1 are all finished
    prefix_tokens: int = 0  # their stored tokens (BOS included, uncut)
    other_tokens: int = 0  # stored tokens of finished sequences after the prefix
    rows: ShardRows | None = None  # once the quota is covered
    scoring: dict[int, int] = field(default_factory=dict)  # row -> member, top-k in flight
    seeds: dict[int, int] = field(default_factory=dict)  # j -> sequence seed

    def add(self, j: int, ids: np.ndarray, lps: np.ndarray) -> None:
        member = self.inflight.pop(j)
        self.results[j] = (ids, lps, member)
        self.other_tokens += len(ids) + 1
        while self.prefix in self.results and self.prefix_tokens < self.plan.quota:
            n = len(self.results[self.prefix][0]) + 1
            self.other_tokens -= n
            self.prefix_tokens += n
            self.prefix += 1

    @property
    def covered(self) -> bool:
        return self.prefix_tokens >= self.plan.quota

    def expected(self, mean_len: float) -> float:
        return self.prefix_tokens + self.other_tokens + len(self.inflight) * mean_len

    def cut(self, bos: int) -> ShardRows:
        """Sequences 0, 1, ... until the quota; the last one kept is cut to fit (the shard's content is fixed by its
        seeds: later sequences, finished or not, are dropped)."""
        rows = ShardRows([], [], [], [])
        for j in range(self.prefix):
            ids, logprobs, member = self.results[j]
            keep = min(len(ids) + 1, self.plan.quota - rows.count)
            rows.tokens.append(np.concatenate([[bos], ids[: keep - 1]]).astype(np.int32))
            rows.members.append(member if self.members > 1 else -1)
            rows.logprobs.append(float(logprobs[: keep - 1].sum()))
            rows.seeds.append(self.seeds[j])
        return rows


def run_shards(cfg: GenerateConfig, out: Path, job: dict, manifest: dict, pending: list[ShardPlan], source,
               replicas: int, bos: int, done_tokens: int, source_name: str) -> dict:
    """Continuous batching across shards, one driver loop for every slot (replica).

    Each engine always has one `advance` call out; every call adds the requests the slot needs (the next
    sequences of its open shards, and the next shard's once those cover their quota by the observed mean length)
    and aborts sequences a covered shard no longer needs, so the engine's queue holds about `cfg.inflight`
    sequences for the whole job and never waits for a shard to be cut, scored, written or hashed (a writer thread
    does that). A shard is covered when its sequences 0 .. n-1 are finished and hold its quota: exactly what
    the one-shard-at-a-time job stored. A slot whose engine dies (Ray raises) or hangs (a call takes longer than
    `cfg.hang_timeout_s`) loses its open shards: each goes back to the queue, whole, and the slot gets a new
    replica (`source.replace`). Ctrl-C / SIGTERM (KeyboardInterrupt) stops the loop at once; shards already
    written stay recorded, none is recorded partly."""
    lost = replica_lost_errors()
    members = source.members
    todo: deque[ShardPlan] = deque(pending)
    open_: list[list[ShardWork]] = [[] for _ in range(replicas)]
    outbox = [[{"sample": [], "score": [], "abort": []} for _ in range(members)] for _ in range(replicas)]
    calls: dict = {}  # handle -> (slot, member, sent at)
    alive = [True] * replicas
    bar = tqdm(total=cfg.tokens, initial=done_tokens, unit="tok", unit_scale=True, desc="generating",
               disable=not cfg.progress, smoothing=0.1)
    lengths = {"tokens": 0, "sequences": 0}
    state = {"recorded": 0, "generated": 0, "aborted": 0, "topped_up": 0}
    lock = threading.Lock()
    writer = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
    writes = []

    def mean_len() -> float:
        """Stored tokens per sequence, from the kept sequences of covered shards (all of a prefix, so not biased
        toward the short ones that finish first); until there are some, the longest a sequence can be: a shard then
        asks only for sequences it certainly needs, and tops up when they certainly fall short."""
        return lengths["tokens"] / lengths["sequences"] if lengths["sequences"] >= 8 else float(source.settings.max_len)

    def inflight(slot: int) -> int:
        return sum(len(w.inflight) + len(w.scoring) for w in open_[slot])

    def top_up(w: ShardWork) -> None:
        """Submit sequences of `w` until its expected stored tokens cover the quota (at most MAX_ROUND at once)."""
        if w.rows is not None or w.covered:
            return
        need = w.plan.quota - w.expected(mean_len())
        if need <= 0 and w.inflight:
            return
        n = min(MAX_ROUND, max(1, math.ceil(need / mean_len())))
        state["topped_up"] += bool(w.next_j)
        for seed, member in sequence_draws(w.plan.seed, w.next_j, n, members):
            w.inflight[w.next_j] = member
            w.seeds[w.next_j] = seed
            outbox[w.slot][member]["sample"].append((f"s{w.plan.index}:{w.next_j}", seed))
            w.next_j += 1

    def fill(slot: int) -> None:
        for w in open_[slot]:
            top_up(w)
        while todo and inflight(slot) < cfg.inflight * members:
            w = ShardWork(todo.popleft(), slot, members)
            open_[slot].append(w)
            top_up(w)

    def write(w: ShardWork) -> None:
        entry = write_shard(out, w.plan, w.rows, job, source_name)
        with lock:
            record_shard(out, manifest, entry)
            state["recorded"] += 1
            state["generated"] += entry["tokens"]
            bar.update(entry["tokens"])
        log.debug("shard %s: %d sequences, %d tokens (replica %d)", w.plan.file, entry["rows"], entry["tokens"],
                  w.slot)

    def finish(w: ShardWork) -> None:
        open_[w.slot].remove(w)
        w.results = {}  # free the uncut results; the rows are what is written
        writes.append(writer.submit(write, w))

    def covered(w: ShardWork) -> None:
        for j, member in w.inflight.items():  # sampled beyond the quota: not needed (the same ones every time)
            outbox[w.slot][member]["abort"].append(f"s{w.plan.index}:{j}")
        state["aborted"] += len(w.inflight)
        w.inflight = {}
        lengths["tokens"] += w.prefix_tokens
        lengths["sequences"] += w.prefix
        w.rows = w.cut(bos)
        if not cfg.topk:
            return finish(w)
        for r, (tokens, member) in enumerate(zip(w.rows.tokens, w.rows.members)):
            w.scoring[r] = max(member, 0)
            outbox[w.slot][max(member, 0)]["score"].append((f"t{w.plan.index}:{r}", tokens))
        w.rows.topk = [None] * len(w.rows.tokens)

    def receive(slot: int, results: list) -> None:
        by_index = {w.plan.index: w for w in open_[slot]}
        for rid, ids, lps in results:
            kind, (index, j) = rid[0], map(int, rid[1:].split(":"))
            w = by_index.get(index)
            if w is None:
                continue
            if kind == "s" and j in w.inflight:
                w.add(j, ids, lps)
                if w.covered and w.rows is None:
                    covered(w)
            elif kind == "t" and j in w.scoring:
                del w.scoring[j]
                w.rows.topk[j] = (ids, lps)
                if not w.scoring:
                    finish(w)

    def lose(slot: int, why: str) -> None:
        for w in reversed(open_[slot]):
            todo.appendleft(w.plan)  # whole: its sequences are sampled again from their seeds
        names = ", ".join(w.plan.file for w in open_[slot]) or "no shard"
        open_[slot] = []
        for box in outbox[slot]:
            box["sample"], box["score"], box["abort"] = [], [], []
        for h in [h for h, c in calls.items() if c[0] == slot]:
            del calls[h]
        log.warning("replica %d was lost while making %s (%s): back to the queue, whole; starting a new replica",
                    slot, names, why)
        if not source.replace(slot, lambda: bool(todo) or any(open_)):
            alive[slot] = False

    def send(slot: int) -> None:
        for m in range(members):
            box = outbox[slot][m]
            busy = any(c[0] == slot and c[1] == m for c in calls.values())
            has_work = any(member == m for w in open_[slot] for member in (*w.inflight.values(), *w.scoring.values()))
            if busy or not (box["sample"] or box["score"] or box["abort"] or has_work):
                continue
            handle = source.call(slot, m, bos, box["sample"], box["score"], box["abort"])
            calls[handle] = (slot, m, time.monotonic())
            box["sample"], box["score"], box["abort"] = [], [], []

    start = time.perf_counter()
    try:
        while True:
            for slot in range(replicas):
                if alive[slot]:
                    fill(slot)
                    send(slot)
                    if not open_[slot] and not todo and not any(c[0] == slot for c in calls.values()):
                        source.release(slot)  # done: free its node for a replacement elsewhere
                        alive[slot] = False
            for f in [f for f in writes if f.done()]:
                writes.remove(f)
                f.result()  # a write that failed (a full disk) ends the job, named
            if not calls and not any(open_) and not todo:
                break
            if not calls and not any(alive):
                break
            for handle in source.wait(list(calls), 0.5):
                slot, member, _ = calls.pop(handle)
                try:
                    results = source.result(handle)
                except lost as e:
                    lose(slot, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    continue
                receive(slot, results)
            now = time.monotonic()
            for handle, (slot, member, sent) in list(calls.items()):
                if handle in calls and now - sent > cfg.hang_timeout_s:
                    lose(slot, f"engine {member} made no progress for {cfg.hang_timeout_s:.0f} s (hung)")
        for f in writes:
            f.result()
    finally:
        writer.shutdown(wait=True, cancel_futures=True)  # a shard being written is finished and recorded whole
        bar.close()
    wall = time.perf_counter() - start
    if state["recorded"] < len(pending):
        raise JobError(f"{out}: {len(pending) - state['recorded']} shard(s) left unmade; re-run to finish")
    summary = summarize(out, manifest, state["generated"], wall)
    # sequences started but not kept (a covered shard's extra ones: over-generation), and rounds a shard needed after
    # its first (its sequences came out shorter than the mean)
    return {**summary, "aborted_sequences": state["aborted"], "top_ups": state["topped_up"]}


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

