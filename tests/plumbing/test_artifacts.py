"""plumbing/artifacts: atomic and durable writes, directory publication, manifests, and the output-directory lock."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plumbing import artifacts
from plumbing.artifacts import (ArtifactError, OutputLock, atomic_write_json, atomic_write_text, fresh_tmp_dir,
                             publish_dir, read_json, read_manifest)

REPO = Path(__file__).resolve().parents[2]


def test_atomic_write_is_fsynced_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(artifacts.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                           real_fsync(fd)))
    atomic_write_json(tmp_path / "result.json", {"a": 1})
    assert json.loads((tmp_path / "result.json").read_text()) == {"a": 1}
    # the bytes (under the temporary name) and then the directory holding the rename
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temp file left


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    atomic_write_text(tmp_path / "REPORT.md", "old")

    def killed(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(artifacts.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(tmp_path / "REPORT.md", "new")
    assert (tmp_path / "REPORT.md").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["REPORT.md"]


def test_publish_dir_replaces_a_directory_whole(tmp_path):
    final = tmp_path / "model"
    for version in ("one", "two"):
        tmp = fresh_tmp_dir(final)
        (tmp / "weights").write_text(version)
        publish_dir(tmp, final)
        assert (final / "weights").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_json_and_manifest_readers_name_the_file(tmp_path):
    bad = tmp_path / "manifest.json"
    bad.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ArtifactError, match=f"corrupt manifest {bad}"):
        read_manifest(bad, "chorus.x.v1", "Chorus x manifest")
    with pytest.raises(ArtifactError, match=str(bad)):
        read_json(bad, "result")
    bad.write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="is not a Chorus x manifest .*a JSON list"):
        read_manifest(bad, "chorus.x.v1", "Chorus x manifest")
    bad.write_text(json.dumps({"format": "chorus.y.v1"}))
    with pytest.raises(ArtifactError, match="is not a Chorus x manifest"):
        read_manifest(bad, "chorus.x.v1", "Chorus x manifest")
    with pytest.raises(ArtifactError, match="does not exist"):
        read_json(tmp_path / "absent.json", "result")


HOLDER = """
import sys, time
from plumbing.artifacts import OutputLock
with OutputLock(sys.argv[1], job="holder job"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_second_job_on_one_output_is_refused_naming_the_holder(tmp_path, tiny_dataset):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ArtifactError, match=f"in use by pid {holder.pid} .*holder job"):
            with OutputLock(out):
                pass
        # the same through a stage's command line: one line, exit 2, the holder named
        res = subprocess.run([sys.executable, "-m", "train", "member", "--data-dir", str(tiny_dataset), "--preset",
                              "cpu-xxs", "--tokens", "2000", "--epochs", "1", "--out", str(out)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr[-2000:]
        assert res.stderr.strip().splitlines()[-1].startswith(f"error: {out} is in use by pid {holder.pid}")
        assert not (out / "run.json").exists()  # refused before writing anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # a holder killed with -9 leaves no stale lock: the kernel released it
    deadline = time.time() + 10
    while True:
        try:
            with OutputLock(out):
                break
        except ArtifactError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
