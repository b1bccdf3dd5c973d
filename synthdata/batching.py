"""Continuous batching across shards: the one driver loop of a generation job (synthdata/job.py).

The driver keeps each engine's queue about `inflight` sequences deep for the whole job. Shards are opened in order;
a shard gets as many sequences as its remaining quota needs at the observed mean length, and when its open sequences
are expected to cover it the next shard's go in behind them, so the engine never waits for a shard to be cut, scored
(`topk`: the rows go back into the same engine's queue as prefill requests) or written (a writer thread writes,
hashes and records). Sequences a covered shard no longer needs are aborted. Sequence j of a shard has its own seed
from (shard seed, j) (`sequence_draws`), and a shard keeps sequences 0, 1, ... until its quota (`ShardWork.cut`), so
its content is fixed by its seeds however it is batched and wherever it is made.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from synthdata.replicas import replica_lost_errors
from synthdata.shards import JobError, ShardPlan, ShardRows, record_shard, write_shard

if TYPE_CHECKING:
    from synthdata.job import GenerateConfig

log = logging.getLogger(__name__)

MAX_ROUND = 1024  # sequences of one shard added in one go: bounds what a top-up asks for


def sequence_draws(shard_seed: int, start: int, count: int, members: int) -> list[tuple[int, int]]:
    """(sequence seed, member) for sequences start .. start+count-1 of a shard; member is 0 when members == 1."""
    draws = []
    for j in range(start, start + count):
        state = np.random.SeedSequence([shard_seed, j]).generate_state(3, np.uint32)
        draws.append(((int(state[0]) << 32 | int(state[1])) >> 1, int(state[2] % members)))
    return draws


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
    written stay recorded, none is recorded partly. Returns this run's counts: tokens generated, wall time, sequences
    aborted and shard top-ups."""
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
    # sequences started but not kept (a covered shard's extra ones: over-generation), and rounds a shard needed after
    # its first (its sequences came out shorter than the mean)
    return {"generated": state["generated"], "wall_s": wall, "aborted_sequences": state["aborted"],
            "top_ups": state["topped_up"]}
