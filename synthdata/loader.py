"""Reading token shards for training: a synthetic data directory (this stage) or a train/ dataset's split.

Both are Parquet files of one sequence per row (`tokens`, list<int32>, BOS first) listed with their sha256
in a manifest; `TokenShards` reads their manifests and streams the rows in manifest order through train.data's
shard reader, which checks each file's bytes before use. The synthetic format is synthdata/shards.py's: reading it
imports no engine, vLLM or Ray.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from synthdata.shards import JobError, read_manifest
from synthdata.soft_targets import COLUMNS as SOFT_COLUMNS
from synthdata.soft_targets import SoftTargetError, SoftTargets, read_columns
from plumbing.artifacts import sha256_file
from train.data import DataError, check_shard, read_token_stream, shard_rows
from train.data import read_manifest as read_dataset_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardFile:
    path: Path
    sha256: str
    rows: int
    tokens: int


@dataclass(frozen=True)
class TokenShards:
    root: Path
    kind: str  # "synthetic" or "real"
    files: tuple[ShardFile, ...]
    tokenizer_sha256: str
    vocab_size: int
    manifest_sha256: str  # identity of the data: the manifest file's hash
    teacher_sha256: str | None = None
    teacher_members: int | None = None
    topk: int = 0  # synthetic shards made with --topk: k of their soft-target columns

    @property
    def tokens(self) -> int:
        return sum(f.tokens for f in self.files)

    @property
    def sequences_count(self) -> int:
        return sum(f.rows for f in self.files)

    @classmethod
    def open(cls, root: str | Path, split: str = "train", require_complete: bool = True) -> "TokenShards":
        """A synthetic data directory, or the `split` of a train/ dataset directory."""
        root = Path(root)
        path = root / "manifest.json"
        if not path.exists():
            raise DataError(f"{root} holds no token shards: {path} is missing")
        manifest_sha = sha256_file(path)
        try:
            manifest = read_manifest(root)
        except JobError:
            manifest = None
        if manifest is not None:
            job = manifest["job"]
            files = tuple(ShardFile(root / s["file"], s["sha256"], s["rows"], s["tokens"]) for s in manifest["shards"])
            done = sum(f.tokens for f in files)
            if not files:
                raise DataError(f"synthetic data directory {root} holds no shards yet")
            if require_complete and done != job["tokens"]:
                raise DataError(f"synthetic data in {root} is incomplete ({done:,} of {job['tokens']:,} tokens); "
                                "re-run its `python -m synthdata generate` command to finish it")
            return cls(root, "synthetic", files, job["tokenizer_sha256"], job["vocab_size"], manifest_sha,
                       job["teacher_sha256"], job["teacher_members"], job.get("soft_targets", {}).get("k", 0))
        dataset = read_dataset_manifest(root)  # raises a clear DataError for anything else
        files = tuple(ShardFile(root / s["file"], s["sha256"], s["rows"], s["tokens"])
                      for s in dataset["splits"][split]["shards"])
        return cls(root, "real", files, dataset["tokenizer_sha256"], dataset["vocab_size"], manifest_sha)

    def sequences(self, verify: bool = True) -> Iterator[np.ndarray]:
        """Every row's tokens (int32), shard by shard, streamed one record batch at a time."""
        for f in self.files:
            if verify:
                check_shard(f.path, f.sha256)
            yield from shard_rows(f.path)

    def soft_targets(self, verify: bool = True) -> SoftTargets:
        """The teacher's top-k at every position of `stream()` (synthdata.soft_targets): a row's last token has
        none (what follows it in the stream is the next row's BOS), so it is marked invalid."""
        if not self.topk:
            raise DataError(f"{self.root} holds no teacher top-k: it was generated without --topk")
        parts = []
        for f in self.files:
            if verify:
                check_shard(f.path, f.sha256)
            table = pq.read_table(f.path, columns=["length", *SOFT_COLUMNS])
            lengths = table.column("length").to_numpy().astype(np.int64)
            try:
                flat = read_columns(table, self.topk, lengths - 1, str(f.path))
            except SoftTargetError as e:
                raise DataError(str(e)) from None
            part = SoftTargets.empty(int(lengths.sum()), self.topk)
            part.valid[:] = True
            part.valid[np.cumsum(lengths) - 1] = False
            part.ids[part.valid], part.logprobs[part.valid], part.tail[part.valid] = flat.ids, flat.logprobs, flat.tail
            parts.append(part)
        return SoftTargets.concat(parts)

    def stream(self, max_tokens: int | None = None) -> np.ndarray:
        """The rows concatenated into one token stream (what `train.data.windows` cuts), optionally truncated."""
        return read_token_stream([(f.path, f.sha256) for f in self.files], max_tokens)
