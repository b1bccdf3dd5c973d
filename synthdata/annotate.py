"""Teacher annotations of real data: the teacher's top-k next-token log-probs at every position of a train/ dataset's
training windows, so that a student learns the ensemble's view of the real tokens too (`python -m distill --blend`).

Layout of an annotation directory:
    manifest.json        the job (teacher hash, the dataset's manifest sha256 and tokenizer, context, tokens, k, how
                         the top-k were computed) and every finished shard's windows and sha256
    shard-NNNNN.parquet  one row per training window: window (its index), topk_ids / topk_logprobs / topk_tail with
                         `context` entries each (format: synthdata/soft_targets.py)

The windows are train.data.windows(load_tokens(data_dir, "train", tokens), context), the ones a student trains on:
entry j of window i is the teacher's distribution of target j given inputs 0..j of that window, the context the
student has. A student with a budget D <= tokens reads a prefix of them: the teacher's distribution at a position
depends only on the tokens before it, and positions past D are padding whose targets are ignored.

Exactly-once and resume as in synthdata/job.py (same manifest handling and repairs): a shard is written to a temp
file, renamed, then recorded. One engine (a Ray actor on a private local Ray, or on `address`) scores a shard's
windows in one call: vLLM prompt log-probs, one prefill pass per window.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from synthdata.engine import TeacherEngine, engine_env
from synthdata.job import engine_cores
from synthdata.shards import JobError, ShardedOutput, open_job, read_manifest
from synthdata.soft_targets import COLUMNS, METHOD, SoftTargetError, SoftTargets, read_columns, topk_arrays
from synthdata.teacher import read_teacher
from plumbing.artifacts import OutputLock, atomic_write_json, publish_file
from plumbing.artifacts import sha256_file
from plumbing.config_flags import setting
from train.data import DataError, load_tokens, read_manifest as read_dataset_manifest, windows
from plumbing.ray_session import connect_ray, disconnect_ray

log = logging.getLogger(__name__)

ANNOTATIONS = ShardedOutput("chorus.annotations.v1", "teacher annotations", "annotation job")


@dataclass(frozen=True)
class AnnotateConfig:
    """An annotation job; a field's help is its command-line flag's (synthdata/cli.py derives them)."""
    teacher: str = setting(help="teacher model directory (a packed ensemble, or a member)")
    data_dir: str = setting(help="train/ dataset directory (`python -m train data`)")
    out: str = setting(help="output directory (shards + manifest.json)")
    context: int = setting(help="the student's context (window length)")
    tokens: int = setting(  # annotate the windows of the first `tokens` training tokens (a student's budget D, or more)
        help="training tokens to annotate: the student's budget D (a smaller D reuses a prefix)")
    topk: int = setting(32, "teacher tokens kept per position (default %(default)s)")
    windows_per_shard: int = setting(256, "windows per shard, the unit of resume (default %(default)s)")
    kv_cache_gib: float = setting(1.0, "KV cache of the engine on CPU, GiB (default %(default)g)")
    address: str | None = setting(None, "Ray cluster address (default: a private local Ray)")
    progress: bool = setting(True, "no progress bar")  # the flag is --no-progress


def job_record(cfg: AnnotateConfig) -> dict:
    teacher = read_teacher(cfg.teacher)
    dataset = read_dataset_manifest(cfg.data_dir)
    if teacher.tokenizer_sha256 != dataset["tokenizer_sha256"]:
        raise JobError(f"teacher {cfg.teacher} and dataset {cfg.data_dir} use different tokenizers (sha256 "
                       f"{teacher.tokenizer_sha256[:12]} vs {dataset['tokenizer_sha256'][:12]})")
    if not 2 <= cfg.context <= teacher.context:
        raise JobError(f"context must be in [2, {teacher.context}] (the teacher's context); got {cfg.context}")
    if not 1 <= cfg.topk <= teacher.vocab_size:
        raise JobError(f"topk must be in [1, {teacher.vocab_size}] (the teacher's vocabulary); got {cfg.topk}")
    if cfg.windows_per_shard < 1:
        raise JobError(f"windows_per_shard must be >= 1 (got {cfg.windows_per_shard})")
    available = dataset["splits"]["train"]["tokens"]
    if not 2 <= cfg.tokens <= available:
        raise JobError(f"tokens must be in [2, {available:,}] (the training split of {cfg.data_dir}); got {cfg.tokens}")
    return {"teacher_sha256": teacher.sha256, "teacher_members": teacher.members,
            "dataset_manifest_sha256": sha256_file(Path(cfg.data_dir) / "manifest.json"),
            "tokenizer_sha256": dataset["tokenizer_sha256"], "vocab_size": dataset["vocab_size"],
            "context": cfg.context, "tokens": cfg.tokens, "windows_per_shard": cfg.windows_per_shard,
            "soft_targets": {"k": cfg.topk, "method": METHOD}}


def annotate(cfg: AnnotateConfig) -> dict:
    """Run (or finish) the annotation job; return its summary. Re-running a finished job does nothing."""
    with OutputLock(cfg.out):
        job = job_record(cfg)
        out = Path(cfg.out)
        manifest = open_job(out, job, ANNOTATIONS)
        inputs, _ = windows(load_tokens(cfg.data_dir, "train", cfg.tokens), cfg.context)
        starts = range(0, len(inputs), cfg.windows_per_shard)
        done = {s["index"] for s in manifest["shards"]}
        pending = [(i, start) for i, start in enumerate(starts) if i not in done]
        if not pending:
            log.info("%s is complete: %d windows of %d tokens; nothing to do", out, len(inputs), cfg.context)
            return summarize(manifest, len(inputs), 0, 0.0)
        log.info("%s: annotating %d of %d windows (context %d, top-%d) with %s", out,
                 sum(min(cfg.windows_per_shard, len(inputs) - s) for _, s in pending), len(inputs), cfg.context,
                 cfg.topk, cfg.teacher)
        started_ray = connect_ray(cfg.address, None)
        try:
            import ray

            env = engine_env(cfg.kv_cache_gib, None if cfg.address else engine_cores(1)[0])
            engine = ray.remote(num_cpus=1)(TeacherEngine).options(runtime_env={"env_vars": env}).remote(
                str(Path(cfg.teacher).resolve()), cfg.context, 0, cfg.topk)
            ray.get(engine.__ray_ready__.remote())
            bar = tqdm(total=len(pending), unit="shard", desc="annotating", disable=not cfg.progress)
            start_time, scored = time.perf_counter(), 0
            for index, start in pending:
                rows = inputs[start: start + cfg.windows_per_shard]
                topk = ray.get(engine.topk.remote(list(rows), cfg.topk, True))
                entry = write_shard(out, index, start, topk, cfg.topk)
                manifest["shards"] = sorted(manifest["shards"] + [entry], key=lambda s: s["index"])
                atomic_write_json(out / "manifest.json", manifest)
                scored += rows.size
                bar.update(1)
            bar.close()
            wall = time.perf_counter() - start_time
            ray.kill(engine)
        finally:
            disconnect_ray(started_ray)
    summary = summarize(manifest, len(inputs), scored, wall)
    log.info("annotated %d windows (%d positions) in %.1f s (%.0f positions/s)", len(inputs), scored, wall,
             summary["positions_per_s"])
    return summary


def write_shard(out: Path, index: int, start: int, topk: list[tuple[np.ndarray, np.ndarray]], k: int) -> dict:
    name = f"shard-{index:05d}.parquet"
    table = pa.table({"window": pa.array(np.arange(start, start + len(topk)), type=pa.int64()),
                      **topk_arrays([ids for ids, _ in topk], [lps for _, lps in topk], k)})
    tmp = out / (name + ".tmp")
    pq.write_table(table, tmp)
    publish_file(tmp, out / name)
    return {"file": name, "index": index, "first_window": start, "windows": len(topk),
            "sha256": sha256_file(out / name)}


def summarize(manifest: dict, windows_total: int, scored: int, wall: float) -> dict:
    annotated = sum(s["windows"] for s in manifest["shards"])
    return {"windows": annotated, "complete": annotated == windows_total, "scored_this_run": scored,
            "wall_s": wall, "positions_per_s": scored / wall if wall else 0.0}


@dataclass(frozen=True)
class Annotations:
    root: Path
    manifest: dict

    @property
    def job(self) -> dict:
        return self.manifest["job"]

    @property
    def k(self) -> int:
        return self.job["soft_targets"]["k"]

    @classmethod
    def open(cls, root: str | Path) -> "Annotations":
        try:
            manifest = read_manifest(root, ANNOTATIONS)
        except JobError as e:
            raise DataError(str(e)) from None
        windows_total = -(-(manifest["job"]["tokens"] - 1) // manifest["job"]["context"])
        if sum(s["windows"] for s in manifest["shards"]) != windows_total:
            raise DataError(f"teacher annotations in {root} are incomplete; re-run their `python -m synthdata "
                            "annotate` command to finish them")
        return cls(Path(root), manifest)

    def windows(self, data_dir: str | Path, context: int, n_windows: int) -> SoftTargets:
        """Soft targets of the first `n_windows` training windows of `data_dir` at `context`: [n, context, ...].
        Annotations of another dataset or context, or too few windows, are refused with the reason."""
        job = self.job
        if job["dataset_manifest_sha256"] != sha256_file(Path(data_dir) / "manifest.json"):
            raise DataError(f"teacher annotations in {self.root} were made for another dataset than {data_dir}")
        if job["context"] != context:
            raise DataError(f"teacher annotations in {self.root} are for context {job['context']}, the student's is "
                            f"{context}")
        if n_windows > sum(s["windows"] for s in self.manifest["shards"]):
            raise DataError(f"teacher annotations in {self.root} cover {job['tokens']:,} training tokens; the student "
                            f"needs {n_windows} windows of {context}: annotate a larger --tokens")
        parts, have = [], 0
        for shard in self.manifest["shards"]:
            if have >= n_windows:
                break
            path = self.root / shard["file"]
            if not path.exists() or sha256_file(path) != shard["sha256"]:
                raise DataError(f"annotation shard {path} is missing or corrupt (sha256 differs from the manifest)")
            table = pq.read_table(path, columns=["window", *COLUMNS])
            try:
                flat = read_columns(table, self.k, np.full(table.num_rows, context), str(path))
            except SoftTargetError as e:
                raise DataError(str(e)) from None
            parts.append(flat)
            have += table.num_rows
        return SoftTargets.concat(parts).truncate(n_windows * context).windows(context, n_windows)
