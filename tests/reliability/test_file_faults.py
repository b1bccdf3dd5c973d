"""Files under fault: crafted paths, a full disk, corrupt records, a held output, a package mirror that hangs.

- A path read from a checkpoint pointer or a synthetic manifest is confined to its directory: a crafted
  "../../x" is named in an error and nothing outside is read or deleted.
- ENOSPC (injected as the OSError the kernel gives) during a checkpoint or a manifest/report write is a named
  DiskFullError; nothing half-written is published, the last good file is intact, and the same call succeeds
  once space is back.
- A corrupt run.json / result.json / config.json is named (a ChorusError), not a JSON traceback; an error that
  is not the project's (a bug) keeps its traceback.
- train_stack takes its output locks before it writes anything.
- The default corpus's apt-get calls are bounded in time and a hang is named.
Each has its control: the same call on sound input succeeds.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from plumbing import artifacts
from train import checkpoint, corpus
from plumbing.artifacts import ArtifactError, DiskFullError, OutputLock, atomic_write_json
from train.checkpoint import load_checkpoint, save_checkpoint
from plumbing.console import ChorusError

REPO = Path(__file__).resolve().parents[2]


def tensors(value: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"model": {"w": torch.full((4,), value)}}


# ---- paths confined to their directory --------------------------------------------------------------

@pytest.mark.parametrize("crafted", ["../../outside", "../outside", "/tmp", "ckpt-1/../../outside", ".", ""])
def test_a_checkpoint_pointer_naming_a_path_outside_the_run_is_refused_by_name(tmp_path, crafted):
    outside = tmp_path / "outside"
    outside.mkdir()
    planted = outside / "model.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.full((4,), 7.0)}, planted)
    run = tmp_path / "a" / "run"
    run.mkdir(parents=True)
    save_checkpoint(run, 3, tensors(1.0))
    assert load_checkpoint(run)[0] == 3  # the control: the run's own pointer loads
    atomic_write_json(run / "checkpoint.json", {"step": 3, "dir": crafted})
    with pytest.raises(ArtifactError, match=f"names {crafted!r}, not a ckpt-<step> directory"):
        load_checkpoint(run)
    assert planted.exists() and sorted(p.name for p in outside.iterdir()) == ["model.safetensors"]


def test_a_synthetic_manifest_naming_a_file_outside_the_job_is_refused_and_the_file_kept(tmp_path):
    from synthdata.shards import MANIFEST_FORMAT, JobError, open_job

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "jobs" / "job"
    job = {"teacher": "t", "budget": 10}
    manifest = open_job(out, job)  # the control: a new job, then its own manifest reopens
    assert open_job(out, job) == manifest
    for crafted in ["../../victim.txt", str(victim), "shard-00000.parquet/../../../victim.txt"]:
        atomic_write_json(out / "manifest.json", {"format": MANIFEST_FORMAT, "job": job, "shards": [
            {"file": crafted, "sha256": "0" * 64, "rows": 1, "tokens": 1}]})
        with pytest.raises(JobError, match="is not a shard-NNNNN.parquet"):
            open_job(out, job)
        assert victim.read_text() == "keep me"  # the recorded sha256 differs: unconfined, it would be deleted


# ---- a full disk ------------------------------------------------------------------------------------

def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_during_a_checkpoint_is_named_and_the_last_checkpoint_stays_live(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_checkpoint(run, 1, tensors(1.0))
    real_save = checkpoint.save_file

    def half_then_full(tensors_, path):  # the disk fills part-way through the file
        Path(path).write_bytes(b"\0" * 100)
        enospc()

    monkeypatch.setattr(checkpoint, "save_file", half_then_full)
    with pytest.raises(DiskFullError, match="no space left on the device writing .*ckpt-0000002"):
        save_checkpoint(run, 2, tensors(2.0))
    assert json.loads((run / "checkpoint.json").read_text()) == {"step": 1, "dir": "ckpt-0000001"}
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.json", "ckpt-0000001"]  # no half-written dir
    step, files = load_checkpoint(run)
    assert step == 1 and torch.equal(files["model"]["w"], torch.full((4,), 1.0))
    monkeypatch.setattr(checkpoint, "save_file", real_save)  # space is back: the same save goes through
    save_checkpoint(run, 2, tensors(2.0))
    assert load_checkpoint(run)[0] == 2


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_during_a_manifest_or_report_write_is_named_and_the_old_file_kept(tmp_path, monkeypatch, where):
    path = tmp_path / "REPORT.md"
    artifacts.atomic_write_text(path, "old\n")
    if where == "fsync":
        monkeypatch.setattr(artifacts.os, "fsync", enospc)
    else:
        real_open = open

        def full_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if "w" in mode and str(file).endswith(".tmp"):
                handle.write = enospc
            return handle

        monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(DiskFullError, match=f"writing {path}"):
        artifacts.atomic_write_text(path, "new\n" * 1000)
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["REPORT.md"]  # no temp file left behind
    artifacts.atomic_write_text(path, "new\n")  # the control: with space, the write goes through
    assert path.read_text() == "new\n"


def test_a_full_disk_while_publishing_a_shard_is_named_and_nothing_published(tmp_path, monkeypatch):
    tmp = tmp_path / "shard-00000.parquet.tmp"
    tmp.write_bytes(b"rows")
    monkeypatch.setattr(artifacts.os, "fsync", enospc)
    with pytest.raises(DiskFullError, match="shard-00000.parquet"):
        artifacts.publish_file(tmp, tmp_path / "shard-00000.parquet")
    assert list(tmp_path.iterdir()) == []  # the temp file is gone (its space given back), nothing published


def test_a_full_disk_while_writing_a_shards_parquet_is_named_and_nothing_left(tmp_path, monkeypatch):
    """The disk fills inside Arrow's Parquet writer (before the rename): named, the half-written temp file removed."""
    import numpy as np

    from synthdata import shards

    plan = shards.ShardPlan(index=0, quota=6, seed=1)
    rows = shards.ShardRows([np.array([0, 5, 6], np.int32), np.array([0, 7, 1], np.int32)], [-1, -1], [-1.0, -2.0],
                            [11, 12])
    job = {"teacher_sha256": "t", "sampling": {"temperature": 1.0, "top_p": 1.0, "max_len": 3}}
    real_write = shards.pq.write_table

    def half_then_full(table, where, *args, **kwargs):
        Path(where).write_bytes(b"PAR1 half")
        raise OSError(f"IOError: {os.strerror(errno.ENOSPC)}. Detail: [errno {errno.ENOSPC}]")  # Arrow's own text

    monkeypatch.setattr(shards.pq, "write_table", half_then_full)
    with pytest.raises(DiskFullError, match="shard-00000.parquet"):
        shards.write_shard(tmp_path, plan, rows, job)
    assert list(tmp_path.iterdir()) == []  # neither the temp file nor a shard
    monkeypatch.setattr(shards.pq, "write_table", real_write)  # the control: with space the same write goes through
    entry = shards.write_shard(tmp_path, plan, rows, job)
    assert entry["rows"] == 2 and (tmp_path / "shard-00000.parquet").exists()


def test_other_os_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def eio(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(artifacts.os, "fsync", eio)
    with pytest.raises(OSError) as caught:
        artifacts.atomic_write_text(tmp_path / "x", "x")
    assert not isinstance(caught.value, DiskFullError) and caught.value.errno == errno.EIO
    assert artifacts.is_disk_full(RuntimeError("Error while serializing: No space left on device (os error 28)"))


# ---- corrupt records ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["run.json", "result.json"])
def test_a_corrupt_run_record_is_named(tmp_path, name):
    from train.run_dir import RunDir

    run = tmp_path / "run"
    RunDir(run).claim({"seed": 0})  # the control: a fresh run dir is claimed, and claimed again
    RunDir(run).claim({"seed": 0})
    (run / name).write_text('{"seed": 0, "trunc')
    with pytest.raises(ArtifactError, match=f"{run / name} is corrupt"):
        RunDir(run).claim({"seed": 0})


def test_a_corrupt_model_config_is_named(tmp_path):
    from serve.pack import PackError, read_config

    (tmp_path / "config.json").write_text('{"architectures": ["Llama')
    with pytest.raises(PackError, match=f"{tmp_path / 'config.json'} is corrupt"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    assert read_config(tmp_path)["architectures"] == ["LlamaForCausalLM"]


def test_the_project_errors_are_chorus_errors_and_a_bug_keeps_its_traceback(tmp_path):
    from serve.app import ServeError
    from serve.pack import PackError
    from synthdata.teacher import TeacherError
    from train.corpus import CorpusError
    from train.data import DataError
    from train.model import ShapeError

    for error in (ArtifactError, DataError, DiskFullError, CorpusError, PackError, ServeError, ShapeError, TeacherError):
        assert issubclass(error, ChorusError), error
    script = ("import sys; from plumbing.console import exit_on\n"
              "from train.corpus import CorpusError\n"
              "with exit_on():\n"
              "    raise (CorpusError('the corpus is empty') if sys.argv[1] == 'ours' else ValueError('a bug'))\n")
    ours = subprocess.run([sys.executable, "-c", script, "ours"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ours.returncode == 2 and ours.stderr.strip() == "error: the corpus is empty", ours.stderr
    bug = subprocess.run([sys.executable, "-c", script, "bug"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "ValueError: a bug" in bug.stderr, bug.stderr


# ---- lock order -----------------------------------------------------------------------------------

def test_train_stack_takes_its_locks_before_writing_anything(tiny_dataset, tmp_path):
    from train.stacked import train_stack
    from train.trainer import TrainConfig

    cfg = TrainConfig(data_dir=str(tiny_dataset), preset="cpu-xxs", tokens=2000, epochs=1, lr=3e-3, weight_decay=0.1,
                      seed=0, batch_size=4, context=32)
    runs = [tmp_path / "seed-0", tmp_path / "seed-1"]
    configs = [cfg, dataclasses.replace(cfg, seed=1)]
    with OutputLock(runs[1], job="another job"):
        with pytest.raises(ArtifactError, match="in use by .*another job"):
            train_stack(configs, runs, progress=False)
        assert not (runs[0] / "run.json").exists() and not (runs[1] / "run.json").exists()

    train_stack(configs, runs, progress=False)  # the control: once the lock is released, the same call trains
    assert all((run / "result.json").exists() for run in runs)


# ---- locks on filesystems where they cannot hold ------------------------------------------------------

def test_a_filesystem_without_locks_is_refused_by_name(tmp_path, monkeypatch):
    with OutputLock(tmp_path / "out"):  # the control: a local disk locks
        pass

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(artifacts.fcntl, "flock", no_locks)  # what Lustre without -o flock answers
    with pytest.raises(ArtifactError, match="does not support locks"):
        with OutputLock(tmp_path / "out"):
            pass


@pytest.mark.parametrize("fstype, options, host_local", [
    ("nfs4", "rw,vers=4.2", False), ("nfs", "rw,vers=3,nolock", True), ("nfs4", "rw,local_lock=flock", True),
    ("nfs4", "rw,local_lock=none", False), ("lustre", "rw,flock", False), ("lustre", "rw,localflock", True),
    ("ext4", "rw", False)])
def test_a_lock_that_holds_on_one_host_only_is_warned_about(tmp_path, monkeypatch, caplog, fstype, options, host_local):
    monkeypatch.setattr(artifacts, "_mounts", lambda: [("/", "ext4", ["rw"]), (str(tmp_path), fstype, options.split(","))])
    with caplog.at_level("WARNING", logger="plumbing.artifacts"):
        with OutputLock(tmp_path / "out"):
            pass
    warned = [r.getMessage() for r in caplog.records if "holds on this host only" in r.getMessage()]
    assert bool(warned) == host_local, (fstype, options, warned)


# ---- the default corpus's package fetch -----------------------------------------------------------

def test_a_hanging_apt_get_is_cut_off_and_named(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text("#!/bin/sh\n[ \"$1\" = update ] && exec sleep 300\nexit 100\n")
    (bin_dir / "dpkg-deb").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(corpus.os, "geteuid", lambda: 0)  # the update runs as root only
    monkeypatch.setattr(corpus, "APT_TIMEOUT_S", 3)
    start = time.monotonic()
    with pytest.raises(corpus.CorpusError, match=r"`apt-get update -qq` did not finish within 3 s"):
        corpus.default_corpus(tmp_path / "cache")
    assert time.monotonic() - start < 30
    # The control: an apt-get that answers at once is reported by its own message, not as a hang.
    (bin_dir / "apt-get").write_text("#!/bin/sh\necho 'E: no such package' >&2\nexit 100\n")
    with pytest.raises(corpus.CorpusError, match="could not fetch .*no such package"):
        corpus.default_corpus(tmp_path / "cache")
