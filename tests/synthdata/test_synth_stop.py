"""synthdata generate: stopping mid-generation and hung engines.

- SIGTERM once generation has started (after the first shard is recorded, not during start-up) ends the job within
  ~10 s with nothing partial recorded and no process of its own left, and the same command resumes to the exact
  budget. Negative controls: the process check does see the job's processes while it runs, and the stop really cut
  the job short (shards were left for the resume to make).
- An engine that hangs (alive, no progress: an injected sleep, CHORUS_TEST_ENGINE_HANG) is caught by the hang
  timeout and replaced; its shards go back to the queue whole and the job stores what a job without the hang stores.
  Negative control: with the default timeout the same hang stalls the job (no shard for a minute).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from synthdata.batching import sequence_draws
from synthdata.engine import HANG_ENV
from synthdata.job import GenerateConfig, generate, plan_shards
from plumbing.artifacts import sha256_file

ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def session_processes(sid: int) -> list[str]:
    """Processes of the session `sid` (the job and everything it started: Ray, its workers, the engines)."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if line.split(None, 2)[1] == str(sid)]


def wait_for_shards(manifest: Path, proc: subprocess.Popen, n: int, timeout: float) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists():
            shards = json.loads(manifest.read_text())["shards"]
            if len(shards) >= n:
                return shards
        time.sleep(0.1)
    return json.loads(manifest.read_text())["shards"] if manifest.exists() else []


def check_complete(out: Path, tokens: int, shard_tokens: int, seed: int = 0) -> dict:
    """Exact budget, every shard once with its own sequences (the seeds of sequences 0, 1, ... of the shard)."""
    manifest = json.loads((out / "manifest.json").read_text())
    plans = plan_shards(tokens, shard_tokens, seed)
    assert [s["index"] for s in manifest["shards"]] == [p.index for p in plans]
    assert sum(s["tokens"] for s in manifest["shards"]) == tokens
    assert sorted(p.name for p in out.glob("shard-*.parquet")) == [s["file"] for s in manifest["shards"]]
    assert not list(out.glob("*.tmp"))
    for s, plan in zip(manifest["shards"], plans):
        assert sha256_file(out / s["file"]) == s["sha256"]
        table = pq.read_table(out / s["file"], columns=["length", "sequence_seed"])
        assert sum(table.column("length").to_pylist()) == s["tokens"] == plan.quota
        assert table.column("sequence_seed").to_pylist() == [d for d, _ in sequence_draws(plan.seed, 0, s["rows"], 1)]
    return manifest


def test_sigterm_mid_generation_stops_fast_and_resumes_exactly(packed_teacher, tmp_path):
    tokens, shard_tokens = 60_000, 1_500
    out = tmp_path / "job"
    cmd = [sys.executable, "-m", "synthdata", "generate", "--teacher", str(packed_teacher), "--tokens", str(tokens),
           "--shard-tokens", str(shard_tokens), "--out", str(out), "--no-progress"]
    with open(tmp_path / "first.log", "w") as log_file:
        proc = subprocess.Popen(cmd, env=ENV, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            first = wait_for_shards(out / "manifest.json", proc, 1, 600)
            assert first and proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            running = session_processes(proc.pid)
            assert len(running) > 1, running  # control: the check sees the job's own processes (Ray, engine)
            stopped_at = time.time()
            os.kill(proc.pid, signal.SIGTERM)
            rc = proc.wait(timeout=60)
            took = time.time() - stopped_at
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "first.log").read_text()
    assert rc == 130, text[-3000:]
    assert took < 12, f"the job took {took:.1f} s to stop"
    time.sleep(2)
    assert session_processes(proc.pid) == [], "processes of the stopped job are left"
    manifest = json.loads((out / "manifest.json").read_text())
    n_shards = len(plan_shards(tokens, shard_tokens, 0))
    assert 1 <= len(manifest["shards"]) < n_shards  # control: the stop cut the job short
    for s in manifest["shards"]:  # what is recorded is whole
        assert sha256_file(out / s["file"]) == s["sha256"] and s["tokens"] == shard_tokens
    resumed = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["tokens"] == tokens and summary["generated_this_run"] > 0
    check_complete(out, tokens, shard_tokens)


def shard_tokens_of(out: Path) -> list[list[list[int]]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [pq.read_table(out / s["file"], columns=["tokens"]).column(0).to_pylist() for s in manifest["shards"]]


def test_hung_engine_is_replaced_and_its_shards_remade_whole(packed_teacher, tmp_path, caplog, monkeypatch):
    tokens, shard_tokens = 15_000, 1_500
    common = {"teacher": str(packed_teacher), "tokens": tokens, "shard_tokens": shard_tokens, "progress": False}
    generate(GenerateConfig(out=str(tmp_path / "control"), **common))  # no hang: what the job stores

    flag = tmp_path / "hang-once"
    flag.write_text("")
    # the engine's 3rd call hangs: ~1 s into generation, with shards open (each call steps ~0.5 s; the whole job
    # takes ~10 calls: at 9,000 tokens and the 6th call, the faster engine had finished before the hang)
    monkeypatch.setenv(HANG_ENV, f"{flag}:3")
    with caplog.at_level(logging.WARNING, logger="synthdata.batching"):
        summary = generate(GenerateConfig(out=str(tmp_path / "hung"), hang_timeout_s=20, **common))
    assert not flag.exists()  # the hang happened ...
    assert "hung" in caplog.text and "back to the queue, whole" in caplog.text  # ... was caught, and the engine replaced
    assert summary["complete"] and summary["tokens"] == tokens
    check_complete(tmp_path / "hung", tokens, shard_tokens)
    assert shard_tokens_of(tmp_path / "hung") == shard_tokens_of(tmp_path / "control")

    # negative control: the same hang without a short timeout (the CLI's default) stalls the job
    flag.write_text("")
    out = tmp_path / "stalled"
    cmd = [sys.executable, "-m", "synthdata", "generate", "--out", str(out), "--teacher", str(packed_teacher),
           "--tokens", str(tokens), "--shard-tokens", str(shard_tokens), "--no-progress"]
    with open(tmp_path / "stalled.log", "w") as log_file:
        proc = subprocess.Popen(cmd, env={**ENV, HANG_ENV: f"{flag}:1"}, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.time() + 600
            while flag.exists() and time.time() < deadline and proc.poll() is None:
                time.sleep(0.2)
            assert not flag.exists(), (tmp_path / "stalled.log").read_text()[-3000:]  # it hung at its first call
            time.sleep(45)
            assert proc.poll() is None
            assert json.loads((out / "manifest.json").read_text())["shards"] == []
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
