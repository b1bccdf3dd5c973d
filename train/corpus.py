"""Reading a text corpus: plain text, JSON lines, Parquet, optionally zstd-compressed.

A corpus is one or more files (or directories of them). Each yields documents (strings):
- `*.txt` / `*.md` / `*.rst` / `*.rst.txt`: one document per file;
- `*.jsonl` / `*.json`: one document per line, from its `text` field;
- `*.parquet`: one document per row, from its `text` column.
Any of them may end in `.zst`. The default corpus (`default_corpus()`) is real English text that a
fresh machine gets through its package registry: the reStructuredText sources of the Python 3.11
documentation, Debian package `python3.11-doc` (PSF licence), fetched with `apt-get download`.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from plumbing.artifacts import atomic_write_text
from plumbing.console import ChorusError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
DEFAULT_CORPUS_PACKAGE = "python3.11-doc"
DEFAULT_CORPUS_SUBDIR = "usr/share/doc/python3.11/html/_sources"
APT_TIMEOUT_S = 300  # each apt-get call; a mirror that does not answer would otherwise hang the job forever


class CorpusError(ChorusError):
    """The corpus is missing, empty or unreadable; the message names the file."""


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
        return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _kind(path: Path) -> str | None:
    name = path.name[:-4] if path.name.endswith(".zst") else path.name
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def corpus_files(paths: list[str | Path]) -> list[Path]:
    """Expand files and directories into a sorted list of readable corpus files."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise CorpusError(f"corpus path does not exist: {p}")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
            if not found:
                raise CorpusError(f"corpus directory {p} holds no .txt/.md/.rst/.jsonl/.parquet files")
            files.extend(found)
        elif _kind(p):
            files.append(p)
        else:
            raise CorpusError(f"unsupported corpus file type: {p} (want .txt, .md, .rst, .jsonl, .parquet, optionally .zst)")
    return files


def read_documents(paths: list[str | Path], max_chars: int | None = None) -> Iterator[str]:
    """Yield non-empty documents from the corpus, stopping after `max_chars` characters if given."""
    total = 0
    for path in corpus_files(paths):
        for doc in _read_file(path):
            doc = doc.strip()
            if not doc:
                continue
            yield doc
            total += len(doc)
            if max_chars is not None and total >= max_chars:
                return


def _read_file(path: Path) -> Iterator[str]:
    kind = _kind(path)
    try:
        if kind == "text":
            with _open_text(path) as f:
                yield f.read()
        elif kind == "jsonl":
            with _open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    text = record.get("text") if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise CorpusError(f"{path}:{lineno}: JSON line has no string 'text' field")
                    yield text
        elif kind == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if "text" not in pf.schema_arrow.names:
                raise CorpusError(f"{path}: Parquet file has no 'text' column (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=["text"]):
                yield from (t for t in batch.column(0).to_pylist() if t)
    except (OSError, UnicodeError) as e:
        raise CorpusError(f"cannot read corpus file {path}: {e}") from e
    except Exception as e:  # zstd and Arrow raise their own types for corrupt input
        if isinstance(e, CorpusError):
            raise
        raise CorpusError(f"cannot read corpus file {path}: {type(e).__name__}: {e}") from e


def _run_bounded(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    """Run an apt-get command for at most APT_TIMEOUT_S; past it, it and every process it started are killed and
    the failure is named (CorpusError)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: its download helpers die with it
    try:
        out, err = proc.communicate(timeout=APT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise CorpusError(f"`{' '.join(cmd)}` did not finish within {APT_TIMEOUT_S} s (no network, or a package mirror "
                          f"that does not answer?): the default corpus could not be fetched; pass your own corpus "
                          f"with --corpus") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def default_corpus(cache_dir: str | Path) -> Path:
    """Return the default corpus directory, fetching the Debian package into `cache_dir` if absent.

    `apt-get download` needs no root and installs nothing system-wide; `dpkg-deb -x` unpacks the
    .deb into the cache. If the package lists are missing (a fresh container), run `apt-get update`.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / DEFAULT_CORPUS_PACKAGE
    done_marker = target / ".complete"
    if done_marker.exists():
        return target / DEFAULT_CORPUS_SUBDIR
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusError(f"the default corpus needs '{tool}' (Debian/Ubuntu); pass your own corpus with --corpus")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        log.info("fetching default corpus: Debian package %s", DEFAULT_CORPUS_PACKAGE)
        cmd = ["apt-get", "download", DEFAULT_CORPUS_PACKAGE]
        res = _run_bounded(cmd, tmp)
        if res.returncode != 0 and os.geteuid() == 0:
            _run_bounded(["apt-get", "update", "-qq"], tmp)
            res = _run_bounded(cmd, tmp)
        debs = list(Path(tmp).glob("*.deb"))
        if res.returncode != 0 or not debs:
            raise CorpusError(f"could not fetch {DEFAULT_CORPUS_PACKAGE} with apt-get: {res.stderr.strip()[-500:]}")
        unpacked = Path(tmp) / "unpacked"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        if target.exists():
            shutil.rmtree(target)
        unpacked.rename(target)
    atomic_write_text(done_marker, DEFAULT_CORPUS_PACKAGE + "\n")
    return target / DEFAULT_CORPUS_SUBDIR
