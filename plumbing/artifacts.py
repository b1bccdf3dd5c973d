"""The one ground floor for files every stage writes: atomic writes, hashes, JSON manifests, output locks.

A file a later run trusts (a manifest, a pointer, a result, a report) appears whole or not at all, and survives
a power cut once this module returns: the bytes go to a temporary name beside it, are fsync'ed, renamed into
place, and the directory holding them is fsync'ed so the rename itself is durable. A directory (a model, a
checkpoint) is published the same way. Two jobs writing one output directory would delete each other's files:
`OutputLock` makes the second fail at once, naming the holder.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from plumbing.console import ChorusError

log = logging.getLogger(__name__)


class ArtifactError(ChorusError):
    """A file is missing, damaged, or held by another job; the message names it."""


class DiskFullError(ArtifactError):
    """The disk (or the user's quota) filled up while a file was written: nothing half-written was published."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, as an OSError or as a native library's error that carries the OS message (safetensors'
    and Arrow's writers raise their own types: "No space left on device (os error 28)")."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno in DISK_FULL
    text = str(e)
    return any(os.strerror(code) in text for code in DISK_FULL)


@contextmanager
def disk_full_named(path: str | Path, cleanup: str | Path | None = None) -> Iterator[None]:
    """Turn ENOSPC / EDQUOT in the block into a DiskFullError naming `path`; `cleanup` (a temporary file or
    directory) is removed first, so the space it held is given back and nothing partial is left."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        if cleanup is not None:
            cleanup = Path(cleanup)
            if cleanup.is_dir():
                shutil.rmtree(cleanup, ignore_errors=True)
            else:
                cleanup.unlink(missing_ok=True)
        raise DiskFullError(f"no space left on the device writing {path} ({e}): it was not "
                            f"published, what was there before is unchanged; free some space and re-run the same "
                            f"command to resume") from e


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make the entries of a directory (renames, creations) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and directory under `path` (a directory about to be published)."""
    path = Path(path)
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader (or a crash) sees the old file or the new one, never a part."""
    path = Path(path)
    tmp = _tmp_name(path)
    with disk_full_named(path):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def publish_file(tmp: str | Path, path: str | Path) -> None:
    """Rename a file written elsewhere (e.g. by pyarrow) into place, durably."""
    tmp, path = Path(tmp), Path(path)
    with disk_full_named(path, cleanup=tmp):
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)


def publish_dir(tmp: str | Path, final: str | Path) -> None:
    """Move a fully written directory into place, replacing any old one; durable on return.

    A directory cannot be renamed over a non-empty one, so an old `final` is first moved aside and deleted
    after: a crash in between leaves either the old directory, or the new one plus a `.old` leftover
    that the next publish removes."""
    tmp, final = Path(tmp), Path(final)
    with disk_full_named(final, cleanup=tmp):
        fsync_tree(tmp)  # where a filesystem reports a full disk late (NFS: at fsync), before anything moves
    aside = final.with_name(f".{final.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def fresh_tmp_dir(final: str | Path) -> Path:
    """An empty temporary directory beside `final`, for writing it before `publish_dir`."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def read_json(path: str | Path, what: str = "file") -> dict:
    """A JSON object from `path`; a missing, truncated or non-object file is named (ArtifactError)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{what} {path} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{what} {path} is corrupt (not valid JSON: {e})") from e
    if not isinstance(value, dict):
        raise ArtifactError(f"{what} {path} is corrupt (a JSON {type(value).__name__}, not an object)")
    return value


def read_manifest(path: str | Path, fmt: str, what: str, missing: str | None = None,
                  error: type[Exception] = ArtifactError) -> dict:
    """A JSON manifest of format `fmt` (a `what`), or `error` naming the file: missing (message `missing`),
    corrupt, or of another format. Every stage's manifest is read through here; written with atomic_write_json."""
    path = Path(path)
    if not path.exists():
        raise error(missing or f"{what} {path} does not exist")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"corrupt manifest {path}: {e}") from None
    found = manifest.get("format") if isinstance(manifest, dict) else f"none: a JSON {type(manifest).__name__}"
    if found != fmt:
        raise error(f"{path} is not a {what} (format {found!r}, expected {fmt!r})")
    return manifest


def read_json_lines(path: Path, error: type[Exception]) -> Iterator[tuple[str, dict]]:
    """('file:line', record) for each non-blank line; a missing file or a bad line raises `error`, named."""
    if not path.exists():
        raise error(f"{path} does not exist")
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{number}: not JSON ({e})") from None
            if not isinstance(record, dict):
                raise error(f"{path}:{number}: expected a JSON object")
            yield f"{path}:{number}", record


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, filesystem type, options) of every mount, from /proc/mounts; empty where there is none."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 4:
            point = fields[1].encode().decode("unicode_escape")  # /proc/mounts writes a space as \040
            mounts.append((point, fields[2], fields[3].split(",")))
    return mounts


def host_local_lock(path: str | Path) -> str | None:
    """Why an flock under `path` would hold on one host only, or None: an NFS mount with `nolock` or
    `local_lock=flock|all`, or a Lustre mount with `localflock` (README, 'Locks on network filesystems')."""
    resolved = str(Path(path).resolve())
    inside = [m for m in _mounts() if resolved == m[0] or resolved.startswith(m[0].rstrip("/") + "/")]
    if not inside:
        return None
    point, fstype, options = max(inside, key=lambda m: len(m[0]))
    if fstype.startswith("nfs") and ("nolock" in options or "local_lock=flock" in options or "local_lock=all" in options):
        return f"{fstype} mount {point} with {','.join(o for o in options if 'lock' in o)}"
    if fstype == "lustre" and "localflock" in options:
        return f"lustre mount {point} with localflock"
    return None


class OutputLock:
    """An exclusive lock on an output directory, held for a job's lifetime (`with OutputLock(out): ...`).

    flock is released by the kernel when the holder dies (kill -9 included), so a stale lock never blocks a
    resume; the lock file records who holds it, so a second job is told whom it collided with."""

    NAME = ".chorus.lock"

    def __init__(self, out_dir: str | Path, job: str = ""):
        self.out_dir = Path(out_dir)
        self.job = job or " ".join(sys.argv)
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / self.NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                raise ArtifactError(f"the filesystem of {self.out_dir} does not support locks ({e.strerror}; Lustre "
                                    f"mounted without -o flock, NFS without its lock manager): two jobs on one output "
                                    f"could not be told apart; use an output directory on a local disk or a "
                                    f"filesystem with locks (README, 'Locks on network filesystems')") from None
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            who = (f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('job')})" if holder
                   else "another process")
            raise ArtifactError(f"{self.out_dir} is in use by {who}; two jobs on one output directory would "
                                f"overwrite each other's files. Wait for it, stop it, or choose another output.") from e
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "job": self.job}).encode())
        self._fd = fd
        if reason := host_local_lock(self.out_dir):
            log.warning("%s: the lock on this output directory holds on this host only (%s): a job on another "
                        "host would not see it; run one job per output directory", self.out_dir, reason)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Ledger:
    """Append-only JSON lines, one record per thing done, keyed by everything that defines it (a run's full
    configuration, an evaluation's inputs): a killed job re-reads it and redoes nothing recorded. Each append is
    fsync'ed before it counts; a line cut by a kill is skipped (that work is simply done again)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self.computed = 0  # records this process added
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.records[rec["key"]] = rec

    @staticmethod
    def key(identity: Any) -> str:
        return identity if isinstance(identity, str) else json.dumps(identity, sort_keys=True)

    def get(self, identity: Any) -> dict | None:
        return self.records.get(self.key(identity))

    def add(self, identity: Any, record: dict) -> dict:
        rec = {"key": self.key(identity), **record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[rec["key"]] = rec
        self.computed += 1
        return rec

    def value(self, identity: Any, compute) -> Any:
        """The recorded value for `identity`, computing and recording it first when absent."""
        rec = self.get(identity) or self.add(identity, {"value": compute()})
        return rec["value"]
