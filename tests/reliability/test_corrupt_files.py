"""Damaged files on disk are detected and named, never half-used; nothing loads pickled Python objects.

Weights (a member's or a packed ensemble's model.safetensors), token shards and manifests (a train/
dataset's and a synthetic job's) are truncated or overwritten, and every reader that opens them must
raise an error that names the damaged file, before any engine starts; a bit flipped inside a tensor is caught
by the sha256 recorded when the weights were written. (Bit flips inside a shard are already covered by tests/train/test_data.py and tests/synthdata/; kill -9 resumes by tests/train,
tests/synthdata and tests/distill.)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serve.app import EnsembleConfig
from serve.pack import PackError, pack_ensemble
from serve.reference import ReferenceEnsemble
from plumbing.artifacts import atomic_write_json
from synthdata.job import GenerateConfig, check_config, job_record, plan_shards
from synthdata.shards import JobError, ShardRows, open_job, write_shard
from synthdata.loader import TokenShards
from synthdata.teacher import TeacherError, read_teacher
from train.data import DataError, load_tokens

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("train", "serve", "synthdata", "distill", "bench")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble_header(path: Path) -> None:
    """Overwrite bytes inside a safetensors JSON header (the 8-byte length prefix comes first)."""
    data = bytearray(path.read_bytes())
    data[10:26] = b"\xff" * 16
    path.write_bytes(bytes(data))


def flip_bit_in_tensor(path: Path) -> None:
    """Flip one bit inside the tensor data: the header still parses and covers the file, so only the recorded
    sha256 (written by train/ and by pack) can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) - 5] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": truncate, "garbled header": garble_header, "bit flip in a tensor": flip_bit_in_tensor}


@pytest.fixture(params=["member", "packed ensemble"])
def model_copy(request, tiny_members, tiny_ensemble, tmp_path) -> tuple[str, Path]:
    source = tiny_members[0] if request.param == "member" else tiny_ensemble
    copy = tmp_path / "model"
    shutil.copytree(source, copy)
    return request.param, copy


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_weights_are_named_by_every_reader(model_copy, damage, tiny_members, tmp_path):
    kind, model = model_copy
    weights = model / "model.safetensors"
    DAMAGE[damage](weights)
    named = re.escape(str(weights))
    with pytest.raises(PackError, match=named):
        EnsembleConfig(model_dir=str(model)).check()  # what `serve up` and start_app run before Ray and vLLM
    with pytest.raises(PackError, match=named):
        ReferenceEnsemble.from_dir(model)  # bench loss, synthdata check
    with pytest.raises(TeacherError, match=named):
        read_teacher(model)  # synthdata generate, before its engines start
    if kind == "member":
        with pytest.raises(PackError, match=named):
            pack_ensemble([tiny_members[1], model], tmp_path / "pack")
        assert not (tmp_path / "pack").exists()
    print(f"{kind}, {damage}: named by EnsembleConfig.check, ReferenceEnsemble, read_teacher"
          + (", pack_ensemble" if kind == "member" else ""))


def test_serve_up_refuses_damaged_weights_before_starting_anything(tiny_ensemble, tmp_path):
    model = tmp_path / "ens"
    shutil.copytree(tiny_ensemble, model)
    truncate(model / "model.safetensors")
    cli = subprocess.run([sys.executable, "-m", "serve", "up", "--model", str(model), "--port", "1"],
                         capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert cli.returncode == 2, cli.stderr[-2000:]
    assert str(model / "model.safetensors") in cli.stderr and "truncated or corrupt" in cli.stderr


# ---- token shards and manifests ------------------------------------------------------------------

@pytest.fixture
def dataset_copy(tiny_dataset, tmp_path) -> Path:
    copy = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, copy)
    return copy


def test_truncated_token_shard_is_named(dataset_copy):
    manifest = json.loads((dataset_copy / "manifest.json").read_text())
    shard = dataset_copy / manifest["splits"]["val"]["shards"][0]["file"]
    truncate(shard)
    with pytest.raises(DataError, match=re.escape(str(shard))):
        load_tokens(dataset_copy, "val")
    with pytest.raises(DataError, match=re.escape(str(shard))):
        TokenShards.open(dataset_copy, split="val").stream()


def test_truncated_dataset_manifest_is_named(dataset_copy):
    truncate(dataset_copy / "manifest.json")
    named = re.escape(str(dataset_copy / "manifest.json"))
    with pytest.raises(DataError, match=f"corrupt manifest {named}"):
        load_tokens(dataset_copy, "train")
    with pytest.raises(DataError, match=f"corrupt manifest {named}"):
        TokenShards.open(dataset_copy)


@pytest.fixture
def synthetic_dir(tiny_ensemble, tiny_dataset, tmp_path) -> Path:
    """A finished synthetic-data directory written by synthdata's own job code (manifest, shard writer), its rows
    cut from real validation tokens: the loaders read files, so no engine is needed to damage them."""
    out = tmp_path / "synthetic"
    cfg = GenerateConfig(teacher=str(tiny_ensemble), tokens=3_000, out=str(out), shard_tokens=1_000, progress=False)
    teacher = read_teacher(tiny_ensemble)
    job = job_record(cfg, teacher, check_config(cfg, teacher))
    manifest = open_job(out, job)
    stream = load_tokens(tiny_dataset, "val", max_tokens=cfg.tokens)
    for plan in plan_shards(cfg.tokens, cfg.shard_tokens, cfg.seed):
        rows = np.split(stream[plan.index * cfg.shard_tokens:][: plan.quota], [400, 700])
        manifest["shards"].append(write_shard(out, plan, ShardRows(rows, [-1] * 3, [0.0] * 3, [1, 2, 3]), job))
    atomic_write_json(out / "manifest.json", manifest)
    assert TokenShards.open(out).tokens == cfg.tokens
    return out


def test_damaged_synthetic_shard_is_named(synthetic_dir):
    shard = synthetic_dir / "shard-00001.parquet"
    truncate(shard)
    with pytest.raises(DataError, match=re.escape(str(shard))):
        TokenShards.open(synthetic_dir).stream()


def test_truncated_synthetic_manifest_is_named(synthetic_dir, tiny_ensemble):
    path = synthetic_dir / "manifest.json"
    job = json.loads(path.read_text())["job"]
    truncate(path)
    with pytest.raises(DataError, match=f"corrupt manifest {re.escape(str(path))}"):
        TokenShards.open(synthetic_dir)  # what distill reads
    with pytest.raises(JobError, match=f"corrupt manifest {re.escape(str(path))}"):
        open_job(synthetic_dir, job)  # what a resumed `synthdata generate` reads


# ---- nothing unpickles ---------------------------------------------------------------------------

# Calls that can turn bytes from disk into arbitrary Python objects.
UNPICKLING = re.compile(r"\b(pickle|cPickle|dill|joblib|cloudpickle)\.(load|loads|Unpickler)\b|\btorch\.load\(|"
                        r"allow_pickle\s*=\s*True|weights_only\s*=\s*False|trust_remote_code\s*=\s*True|"
                        r"\bnp\.load\(|\bnumpy\.load\(|\bshelve\.open\(|\bmarshal\.loads?\(")


def test_no_package_code_unpickles_from_disk():
    sources = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    hits = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in sources
            for n, line in enumerate(p.read_text().splitlines(), 1) if UNPICKLING.search(line)]
    print(f"scanned {len(sources)} source files of {', '.join(PACKAGES)} for unpickling calls: {len(hits)} found")
    assert len(sources) > 20
    assert not hits, "\n".join(hits)
    assert UNPICKLING.search("state = torch.load(path)") and UNPICKLING.search("np.load(f, allow_pickle=True)")


def test_model_directories_hold_no_pickles(tiny_members, tiny_ensemble):
    files = [f for d in [*tiny_members, tiny_ensemble] for f in d.rglob("*") if f.is_file()]
    pickled = [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
               or f.read_bytes()[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
               or f.read_bytes()[:4] == b"PK\x03\x04"]  # torch.save's zip format
    assert files and not pickled, pickled
    assert {f.suffix for f in files} <= {".json", ".safetensors"}, {f.suffix for f in files}
