"""The teacher: what a generation job samples from, and its identity (content hash of its weights).

A teacher directory is a packed ensemble (serve.pack) or a single member. In `ensemble` mode the whole
directory is one engine: vLLM runs the logit-averaged ensemble. In `mixture` mode every sequence comes
from one member, so each member becomes its own model directory (extracted once from the pack into the
job's output directory) and its own engine.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from serve.pack import WEIGHTS, PackError, check_weights, ensemble_info, member_prefix, read_config, weights_sha256
from train.data import tokenizer_hash


class TeacherError(ValueError):
    """The teacher directory is missing or is not a model directory."""


@dataclass(frozen=True)
class Teacher:
    path: Path
    sha256: str
    members: int
    context: int
    bos_token_id: int
    eos_token_id: int
    vocab_size: int
    tokenizer_sha256: str


def read_teacher(path: str | Path) -> Teacher:
    path = Path(path)
    if not path.is_dir():
        raise TeacherError(f"teacher {path} is not a directory")
    try:
        config = read_config(path)
        check_weights(path)  # a truncated, damaged or corrupt weights file is named before any engine starts
        sha = weights_sha256(path)
    except PackError as e:
        raise TeacherError(f"teacher {path} is not a model directory: {e}") from None
    if not (path / "tokenizer.json").exists():
        raise TeacherError(f"teacher {path} has no tokenizer.json (a Chorus model directory carries its tokenizer)")
    for key in ("bos_token_id", "eos_token_id", "max_position_embeddings", "vocab_size"):
        if config.get(key) is None:
            raise TeacherError(f"teacher {path}/config.json has no {key}")
    return Teacher(path=path.resolve(), sha256=sha, members=int(ensemble_info(path)["members"]),
                   context=int(config["max_position_embeddings"]), bos_token_id=int(config["bos_token_id"]),
                   eos_token_id=int(config["eos_token_id"]), vocab_size=int(config["vocab_size"]),
                   tokenizer_sha256=tokenizer_hash(path))


def member_dirs(teacher: Teacher, cache_dir: Path) -> list[Path]:
    """One model directory per member: the teacher itself if it is a single member, else extracted from
    the pack into cache_dir/m<i> (once; each appears whole via a temp dir and rename)."""
    config = read_config(teacher.path)
    if "chorus_ensemble" not in config:
        return [teacher.path]
    member_config = {k: v for k, v in config.items() if k != "chorus_ensemble"}
    member_config["architectures"] = ["LlamaForCausalLM"]
    weights = None
    dirs = []
    for i in range(teacher.members):
        out = cache_dir / f"m{i}"
        dirs.append(out)
        if (out / WEIGHTS).exists():
            continue
        if weights is None:
            weights = load_file(teacher.path / WEIGHTS)
        tmp = cache_dir / f".m{i}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in teacher.path.iterdir():
            if f.is_file() and f.name not in ("config.json", WEIGHTS):
                shutil.copy2(f, tmp / f.name)
        prefix = member_prefix(i)
        save_file({n[len(prefix):]: t for n, t in weights.items() if n.startswith(prefix)}, tmp / WEIGHTS,
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(member_config, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return dirs
