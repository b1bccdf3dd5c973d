"""Shared fixtures: a small real dataset and a few tiny trained members, built once per test session.

They read the Wikipedia corpus in ../shared/data (CI has it); tests that need them skip with the
reason where it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CHORUS_SHARED_DATA", REPO.parent / "shared" / "data"))
WIKI = SHARED_DATA / "corpus" / "enwiki2015_30k.jsonl.zst"
EVAL_DIR = SHARED_DATA / "eval"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (../shared/data is absent on this machine)")
    return path


@pytest.fixture(scope="session")
def wiki_corpus() -> Path:
    return require(WIKI)


@pytest.fixture(scope="session")
def tiny_dataset(wiki_corpus, tmp_path_factory) -> Path:
    """~2M characters of Wikipedia: a 2048-token BPE and ~450k training tokens."""
    from train.data import DatasetSpec, prepare_dataset

    out = tmp_path_factory.mktemp("tiny_dataset")
    prepare_dataset(DatasetSpec(corpus=(str(wiki_corpus),), vocab_size=2048, max_chars=2_000_000,
                                val_max_tokens=20_000), out)
    return out


@pytest.fixture(scope="session")
def tiny_members(tiny_dataset, tmp_path_factory) -> list[Path]:
    """Three cpu-xs members (seeds 0, 1, 2) on 40k tokens x 2 epochs: model directories."""
    from train.trainer import TrainConfig, train_member

    root = tmp_path_factory.mktemp("tiny_members")
    dirs = []
    for seed in range(3):
        cfg = TrainConfig(data_dir=str(tiny_dataset), preset="cpu-xs", tokens=40_000, epochs=2, lr=3e-3,
                          weight_decay=0.4, seed=seed, batch_size=16, context=128)
        dirs.append(Path(train_member(cfg, root / f"seed-{seed}", progress=False)["model_dir"]))
    return dirs


# ---- synthdata/ and distill/ -------------------------------------------------------------------

SYNTH_TOKENS, SYNTH_SHARD_TOKENS = 12_000, 1_500


@pytest.fixture(scope="session")
def packed_teacher(tiny_members, tmp_path_factory) -> Path:
    """The three tiny members packed into one logit-averaged ensemble directory."""
    from serve.pack import pack_ensemble

    return pack_ensemble(tiny_members, tmp_path_factory.mktemp("teacher") / "ensemble")


@pytest.fixture(scope="session")
def synthetic_job(packed_teacher, tmp_path_factory) -> dict:
    """A finished `python -m synthdata generate` job on the packed teacher, made the hard way: the first
    run is killed with SIGKILL after its first shard is recorded; before the re-run one recorded shard is
    corrupted and a stray temp file planted. Tests read the job and what was done to it, so the kill/resume
    check and every test that needs synthetic tokens share two engine starts."""
    import json
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path_factory.mktemp("synthetic") / "job"
    cmd = [sys.executable, "-m", "synthdata", "generate", "--teacher", str(packed_teacher),
           "--tokens", str(SYNTH_TOKENS), "--shard-tokens", str(SYNTH_SHARD_TOKENS), "--out", str(out),
           "--no-progress"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    log_path = out.parent / "first-run.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        manifest_path, deadline = out / "manifest.json", time.time() + 600
        shards_at_kill = []
        while time.time() < deadline and proc.poll() is None:
            if manifest_path.exists():
                shards_at_kill = json.loads(manifest_path.read_text())["shards"]
                if shards_at_kill:
                    break
            time.sleep(0.1)
        assert proc.poll() is None, f"the first run ended before the kill:\n{log_path.read_text()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(3)
        try:  # Ray's own processes die with their driver; make sure nothing of ours survives either way
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    manifest = json.loads(manifest_path.read_text())
    corrupted = manifest["shards"][0]
    (out / corrupted["file"]).write_bytes(b"not parquet")
    (out / "shard-99999.parquet.tmp").write_bytes(b"half-written")
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"out": out, "cmd": cmd, "env": env, "shards_at_kill": manifest["shards"], "corrupted": corrupted,
            "resume_log": resumed.stderr, "summary": json.loads(resumed.stdout.strip().splitlines()[-1])}


@pytest.fixture(scope="session")
def tiny_ensemble(tiny_members, tmp_path_factory) -> Path:
    """The first two tiny members packed as one K=2 logit-averaging ensemble directory (serve/)."""
    from serve.pack import pack_ensemble

    return pack_ensemble(tiny_members[:2], tmp_path_factory.mktemp("tiny_ensemble") / "ens-k2")


@pytest.fixture(scope="session")
def eval_dir() -> Path:
    """../shared/data/eval: the zero-shot multiple-choice tasks (JSON lines)."""
    return require(EVAL_DIR)


# ---- reliability suite -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for one module's server."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- kill -9 and resume --------------------------------------------------------------------------

def kill_once_past_checkpoint(cmd: list[str], out: Path, timeout_s: float, **popen) -> None:
    """Start a training command (train/ or distill/) and kill -9 it once a checkpoint exists and training has
    moved past it, so the resume must both reload the checkpoint and redo the steps after it."""
    import json
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if (out / "checkpoint.json").exists():
            ckpt_step = json.loads((out / "checkpoint.json").read_text())["step"]
            lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
            if ckpt_step >= 10 and lines and json.loads(lines[-1])["step"] > ckpt_step:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists(), "the run finished before it could be killed; make it longer"


@pytest.fixture
def kill_past_checkpoint():
    return kill_once_past_checkpoint
