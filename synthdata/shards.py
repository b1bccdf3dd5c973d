"""The one owner of the synthetic shard format: schema, write, read, verify and repair of a sharded job output.

A sharded output directory holds `manifest.json` (a format tag, the job record, every finished shard's file, rows,
tokens and sha256) and `shard-NNNNN.parquet` files. Generation jobs (synthdata/job.py) and teacher annotations
(synthdata/annotate.py) share the manifest handling and repairs; the loader (synthdata/loader.py) and the check
(synthdata/check.py) read through here. Nothing in this module starts an engine or imports vLLM or Ray: reading
synthetic tokens needs only pyarrow.

A synthetic shard holds one row per sequence: tokens (list<int32>, BOS first), length, seed (the shard's),
sequence_seed (the sequence's own, 63-bit), content_sha256 (of its token ids), member (mixture: which member
sampled it; ensemble: -1), sample_logprob (the engine's log-probability of the stored tokens after BOS),
teacher_sha256, sampling (JSON); with the job's `soft_targets` also topk_ids, topk_logprobs, topk_tail (format:
synthdata/soft_targets.py).

Exactly-once: a shard is written to a temp file, renamed, then recorded in the manifest (atomic rewrite). On
restart (`open_job`) a recorded shard whose bytes no longer match its sha256 is named and remade, a shard file
that never made it into the manifest is remade, and temp files are deleted.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synthdata.soft_targets import topk_arrays
from plumbing.artifacts import atomic_write_json, disk_full_named, publish_file
from plumbing.artifacts import sha256_file
from train.data import read_json_manifest
from plumbing.console import ChorusError

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "chorus.synthetic.v2"  # v2: 63-bit sequence seeds, a content hash per sequence


class JobError(ChorusError):
    """Bad job settings, or an output directory that holds another job."""


@dataclass(frozen=True)
class ShardedOutput:
    """A kind of sharded job output: a manifest of its format and shard-NNNNN.parquet files (generation jobs,
    teacher annotations in synthdata/annotate.py share the manifest handling and repairs)."""
    format: str
    what: str  # what the directory holds
    job: str  # what makes it


SYNTHETIC = ShardedOutput(MANIFEST_FORMAT, "synthetic data", "generation job")


@dataclass(frozen=True)
class ShardPlan:
    index: int
    quota: int
    seed: int

    @property
    def file(self) -> str:
        return shard_file(self.index)


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.parquet"


# ---- manifest: read, open (check and repair) ----------------------------------------------------

def read_manifest(out: str | Path, kind: ShardedOutput = SYNTHETIC) -> dict:
    path = Path(out) / "manifest.json"
    return read_json_manifest(path, kind.format, f"Chorus {kind.what} manifest",
                              f"no {kind.what} at {out}: {path} is missing", JobError)


def record_shard(out: Path, manifest: dict, entry: dict) -> None:
    """Add a written shard's entry to the manifest and rewrite it atomically (the shard now counts)."""
    manifest["shards"] = sorted(manifest["shards"] + [entry], key=lambda s: s["index"])
    atomic_write_json(out / "manifest.json", manifest)


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


# ---- one shard: schema and write ---------------------------------------------------------------

def content_hash(tokens: np.ndarray) -> str:
    """sha256 of a sequence's token ids (int32 little-endian): equal sequences, equal hashes."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i4").tobytes()).hexdigest()


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


def shard_table(plan: ShardPlan, rows: ShardRows, job: dict) -> pa.Table:
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
    return table


def write_shard(out: Path, plan: ShardPlan, rows: ShardRows, job: dict, source: str = "engine") -> dict:
    """Write the shard atomically (temp file, fsync'ed rename); return its manifest entry (not yet recorded)."""
    path = out / plan.file
    tmp = out / (plan.file + ".tmp")
    with disk_full_named(path, cleanup=tmp):  # a full disk: named, the half-written temp file removed, nothing recorded
        pq.write_table(shard_table(plan, rows, job), tmp)
    publish_file(tmp, path)
    return {"file": plan.file, "index": plan.index, "seed": plan.seed, "rows": len(rows.tokens), "tokens": rows.count,
            "sha256": sha256_file(path), "source": source}


# ---- reading and verifying ---------------------------------------------------------------------

def read_rows(out: Path, manifest: dict, columns: list[str] | None = None, limit: int | None = None) -> list[dict]:
    """Rows of the recorded shards in manifest order (the first `limit` of them), as dicts of `columns`."""
    rows: list[dict] = []
    for shard in manifest["shards"]:
        rows += pq.read_table(Path(out) / shard["file"], columns=columns).to_pylist()
        if limit is not None and len(rows) >= limit:
            return rows[:limit]
    return rows


def duplicate_sequences(out: Path, manifest: dict) -> int:
    """How many recorded sequences repeat an earlier one's content (by content_sha256)."""
    seen, dups = set(), 0
    for shard in manifest["shards"]:
        for h in pq.read_table(out / shard["file"], columns=["content_sha256"]).column(0).to_pylist():
            dups += h in seen
            seen.add(h)
    return dups
