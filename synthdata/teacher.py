"""The teacher: what a generation job samples from, and its identity (content hash of its weights).

A teacher directory is a packed ensemble (serve.pack) or a single member. In `ensemble` mode the whole
directory is one engine: vLLM runs the logit-averaged ensemble. In `mixture` mode every sequence comes
from one member, so each member becomes its own model directory (extracted once from the pack into the
job's output directory) and its own engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from serve.pack import WEIGHTS, PackError, check_weights, ensemble_info, extract_member, read_config, weights_sha256
from plumbing.console import ChorusError
from train.data import tokenizer_hash


class TeacherError(ChorusError):
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
    if "chorus_ensemble" not in read_config(teacher.path):
        return [teacher.path]
    dirs = [cache_dir / f"m{i}" for i in range(teacher.members)]
    for i, out in enumerate(dirs):
        if not (out / WEIGHTS).exists():
            extract_member(teacher.path, i, out)
    return dirs
