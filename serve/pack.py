"""Pack K member directories into one ensemble directory that vLLM, transformers and lm-eval can open.

Layout of an ensemble directory (a Hugging Face model directory):
    config.json        the members' Llama config, "architectures": ["ChorusEnsembleForCausalLM"] and
                       "chorus_ensemble": {"members": K, "combine": "logits"|"probs", "member_sha256": [...],
                       "weights_sha256": sha256 of model.safetensors (check_weights verifies it before loading)}
    model.safetensors  member i's weights under the prefix "m{i}." (m0, m1, ...: vLLM's CPU runner wants
                       exactly one integer per layer name, the layer index, so "members.0" would not do)
    tokenizer files    copied from the first member (all members must share the tokenizer)

This module is the one owner of that format: it packs (`pack_ensemble`), unpacks (`member_state_dicts`,
`split_member_name`, `extract_member`) and validates the combine rule
(`check_combine`). The engine, the PyTorch reference and synthdata's teacher read members through it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from safetensors import SafetensorError, safe_open
import torch
from safetensors.torch import load_file, save_file

from plumbing.artifacts import ArtifactError, fresh_tmp_dir, publish_dir, read_json
from plumbing.console import ChorusError
from plumbing.artifacts import sha256_file
from train.data import tokenizer_hash

log = logging.getLogger(__name__)

ARCHITECTURE = "ChorusEnsembleForCausalLM"
COMBINE_RULES = ("logits", "probs")
WEIGHTS = "model.safetensors"
# Config keys that record how a member was saved, not what it computes.
_PROVENANCE_KEYS = ("transformers_version", "_name_or_path", "architectures")
# Files of a member directory that are not carried into the ensemble as they are.
_MEMBER_ONLY_FILES = ("config.json", WEIGHTS, "chorus_run.json")


class PackError(ChorusError):
    """Members that cannot form one ensemble, or a directory that is not a model."""


def member_prefix(i: int) -> str:
    return f"m{i}."


def check_combine(combine: str) -> str:
    """The combine rule, if it is one Chorus knows; else a PackError naming the choices."""
    if combine not in COMBINE_RULES:
        raise PackError(f"unknown combine rule {combine!r}; choose one of {', '.join(COMBINE_RULES)}")
    return combine


def split_member_name(name: str, members: int) -> tuple[int, str]:
    """A packed tensor name "m{i}.rest" -> (i, "rest"); a name outside m0 .. m{members-1} is a PackError."""
    head, _, rest = name.partition(".")
    if not rest or head[:1] != "m" or not head[1:].isdigit() or int(head[1:]) >= members:
        raise PackError(f"tensor {name!r} is not a member tensor of a {members}-member pack (want m0. .. m{members - 1}.)")
    return int(head[1:]), rest


def member_config_dict(config: dict) -> dict:
    """One member's config.json from an ensemble's (or a member's own) config.json."""
    member = {k: v for k, v in config.items() if k != "chorus_ensemble"}
    member["architectures"] = ["LlamaForCausalLM"]
    return member


def weights_sha256(model_dir: str | Path) -> str:
    """Content hash of a model directory's weights (every *.safetensors file, by name and bytes)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise PackError(f"{model_dir} holds no *.safetensors weights")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise PackError(f"{model_dir} is not a model directory: {path} is missing")
    try:
        return read_json(path, "model config")
    except ArtifactError as e:  # corrupt: named, not a JSON traceback
        raise PackError(str(e)) from None


def ensemble_info(model_dir: str | Path) -> dict:
    """The "chorus_ensemble" block of a packed directory; a plain member reads as K=1, combine "logits"."""
    config = read_config(model_dir)
    return config.get("chorus_ensemble", {"members": 1, "combine": "logits", "member_sha256": []})


def ensemble_members(model_dir: str | Path) -> int:
    return int(ensemble_info(model_dir)["members"])


def weight_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the weights file's header. Reading the header is also the cheap integrity check
    callers run before loading: safetensors refuses a header that does not parse or tensors that do not
    cover the file exactly (a truncated file), and the error here names the file."""
    path = Path(model_dir) / WEIGHTS
    if not path.exists():
        raise PackError(f"{model_dir} has no {WEIGHTS}")
    try:
        with safe_open(path, framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except SafetensorError as e:
        raise PackError(f"weights file {path} is truncated or corrupt: {e}") from None


def recorded_sha256(model_dir: str | Path) -> tuple[str, str] | None:
    """(sha256 of model.safetensors, where it was recorded) as written when the directory was made, if it was:
    a pack records it in config.json, train/ in chorus_run.json."""
    model_dir = Path(model_dir)
    packed = read_config(model_dir).get("chorus_ensemble", {}).get("weights_sha256")
    if packed:
        return packed, str(model_dir / "config.json")
    run_record = model_dir / "chorus_run.json"
    if run_record.exists():
        recorded = json.loads(run_record.read_text()).get("weights_sha256")
        if recorded:
            return recorded, str(run_record)
    return None


def check_weights(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """The integrity check every loader runs first: the header parses and covers the file (weight_shapes), and the
    bytes hash to what was recorded when the directory was made, so a flipped bit inside a tensor is named too.
    Returns the weight shapes."""
    shapes = weight_shapes(model_dir)
    recorded = recorded_sha256(model_dir)
    if recorded:
        path = Path(model_dir) / WEIGHTS
        if sha256_file(path) != recorded[0]:
            raise PackError(f"weights file {path} is corrupt: its sha256 differs from the one recorded in {recorded[1]} "
                            "(damaged or modified after it was written); re-pack or retrain it")
    return shapes


def check_members(member_dirs: list[Path]) -> None:
    """Refuse members that differ in architecture, config, weight shapes or tokenizer, naming the difference."""
    first = member_dirs[0]
    config0 = read_config(first)
    if config0.get("model_type") != "llama" or "chorus_ensemble" in config0:
        raise PackError(f"{first} is not a Llama member (model_type {config0.get('model_type')!r}); "
                        "pack member directories, not ensembles")
    shapes0 = check_weights(first)
    tok0 = tokenizer_hash(first)
    for other in member_dirs[1:]:
        config = read_config(other)
        keys = sorted(k for k in set(config0) | set(config) if k not in _PROVENANCE_KEYS
                      and config0.get(k) != config.get(k))
        if keys:
            diffs = ", ".join(f"{k}: {config0.get(k)!r} vs {config.get(k)!r}" for k in keys)
            raise PackError(f"members {first} and {other} differ in architecture ({diffs})")
        if config.get("architectures") != config0.get("architectures"):
            raise PackError(f"members {first} and {other} differ in architecture "
                            f"({config0.get('architectures')} vs {config.get('architectures')})")
        shapes = check_weights(other)
        if shapes != shapes0:
            names = sorted(n for n in set(shapes) | set(shapes0) if shapes.get(n) != shapes0.get(n))
            raise PackError(f"members {first} and {other} differ in weight shapes: "
                            + ", ".join(f"{n} {shapes0.get(n)} vs {shapes.get(n)}" for n in names[:5]))
        if tokenizer_hash(other) != tok0:
            raise PackError(f"members {first} and {other} have different tokenizers (tokenizer.json sha256 differs)")


def pack_ensemble(member_dirs: list[str | Path], out_dir: str | Path, combine: str = "logits") -> Path:
    """Write the ensemble of `member_dirs` (in that order) to `out_dir`; return its path.

    An existing `out_dir` holding the same pack is reused; anything else there is refused.
    """
    check_combine(combine)
    member_dirs = [Path(d) for d in member_dirs]
    if not member_dirs:
        raise PackError("no members given: pack needs at least one member directory")
    for d in member_dirs:
        if not d.is_dir():
            raise PackError(f"member {d} is not a directory")
    check_members(member_dirs)
    member_sha = [weights_sha256(d) for d in member_dirs]
    block = {"members": len(member_dirs), "combine": combine, "member_sha256": member_sha}

    out_dir = Path(out_dir)
    if out_dir.exists():
        existing = read_config(out_dir).get("chorus_ensemble", {}) if (out_dir / "config.json").exists() else {}
        if {k: v for k, v in existing.items() if k != "weights_sha256"} == block:
            check_weights(out_dir)
            log.info("%s already holds this ensemble; reusing it", out_dir)
            return out_dir
        raise PackError(f"{out_dir} already exists and holds something else; delete it or choose another --out")

    tmp = fresh_tmp_dir(out_dir)
    for f in member_dirs[0].iterdir():
        if f.is_file() and f.name not in _MEMBER_ONLY_FILES:
            shutil.copy2(f, tmp / f.name)
    weights = {}
    for i, d in enumerate(member_dirs):
        weights.update({member_prefix(i) + name: t for name, t in load_file(d / WEIGHTS).items()})
    save_file(weights, tmp / WEIGHTS, metadata={"format": "pt"})
    config = read_config(member_dirs[0])
    config["architectures"] = [ARCHITECTURE]
    config["chorus_ensemble"] = {**block, "weights_sha256": sha256_file(tmp / WEIGHTS)}  # check_weights reads it
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    publish_dir(tmp, out_dir)  # the directory appears whole or not at all, durably
    log.info("packed %d members (%s combine) into %s", len(member_dirs), combine, out_dir)
    return out_dir


def member_state_dicts(model_dir: str | Path) -> list[dict[str, torch.Tensor]]:
    """Every member's Hugging Face state dict, in member order: a pack's K members, or a plain member as one.
    The weights file is checked first (check_weights), so damage is named, not a deserializer error."""
    model_dir = Path(model_dir)
    check_weights(model_dir)
    weights = load_file(model_dir / WEIGHTS)
    if "chorus_ensemble" not in read_config(model_dir):
        return [weights]
    k = ensemble_members(model_dir)
    members: list[dict[str, torch.Tensor]] = [{} for _ in range(k)]
    for name, tensor in weights.items():
        i, rest = split_member_name(name, k)
        members[i][rest] = tensor
    if any(set(m) != set(members[0]) for m in members):
        raise PackError(f"{model_dir / WEIGHTS}: the members do not hold the same tensors")
    return members


def extract_member(model_dir: str | Path, i: int, out_dir: str | Path) -> Path:
    """Write member i of a pack as a plain Llama model directory at out_dir (appears whole: temp dir + rename)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    members = member_state_dicts(model_dir)
    if not 0 <= i < len(members):
        raise PackError(f"{model_dir} has {len(members)} member(s); there is no member {i}")
    tmp = fresh_tmp_dir(out_dir)
    for f in model_dir.iterdir():
        if f.is_file() and f.name not in ("config.json", WEIGHTS):
            shutil.copy2(f, tmp / f.name)
    save_file(members[i], tmp / WEIGHTS, metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(member_config_dict(read_config(model_dir)), indent=2))
    publish_dir(tmp, out_dir)
    return out_dir
