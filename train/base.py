"""A base model the user brings, for continued pre-training (`--init-from DIR`).

Any local Hugging Face Llama-architecture directory with safetensors weights (one `model.safetensors`, or shards
listed by `model.safetensors.index.json`) is a base; a Chorus member is one. Before a step is taken the base is
checked against the run: its tokenizer must be the dataset's (the dataset is made with `train data --tokenizer
BASE`), its vocabulary must hold every token id of the data, its context must cover the run's, and a `--preset`,
if one is given, must be its shape. Each failure names the file and the mismatch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

from plumbing.artifacts import ArtifactError, read_json, sha256_file
from train.model import PRESETS, Shape, ShapeError, check_shape, shape_of

WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"


class BaseModelError(ArtifactError):
    """A base model directory that cannot be continued from, or does not fit the run."""


@dataclass(frozen=True)
class BaseModel:
    path: Path
    config: LlamaConfig
    shape: Shape
    weight_files: tuple[Path, ...]
    weights_sha256: str  # of model.safetensors, or of the shard index when sharded

    @property
    def tokenizer_file(self) -> Path:
        return self.path / "tokenizer.json"

    def provenance(self) -> dict:
        return {"path": str(self.path), "weights_sha256": self.weights_sha256}


def read_base(path: str | Path) -> BaseModel:
    """The base at `path`, checked to be a Llama model Chorus can continue and serve."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise BaseModelError(f"--init-from {path}: not a directory")
    config_file = path / "config.json"
    raw = read_json(config_file, "model config")
    archs = raw.get("architectures") or []
    if raw.get("model_type") != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise BaseModelError(f"--init-from {config_file}: not a Llama model (model_type {raw.get('model_type')!r}, "
                             f"architectures {archs}); continued pre-training needs a LlamaForCausalLM")
    config = LlamaConfig.from_dict(raw)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = shape_of(config)
    if head_dim != shape.head_dim:
        raise BaseModelError(f"--init-from {config_file}: head_dim {head_dim} is not hidden / heads "
                             f"({shape.head_dim}); Chorus members use the standard Llama head layout")
    try:
        check_shape(shape)
    except ShapeError as e:
        raise BaseModelError(f"--init-from {config_file}: {e}") from None
    if (path / WEIGHTS).is_file():
        files = (path / WEIGHTS,)
        digest = sha256_file(path / WEIGHTS)
        recorded = (read_json(path / "chorus_run.json", "run record").get("weights_sha256")
                    if (path / "chorus_run.json").is_file() else None)
        if recorded and recorded != digest:
            raise BaseModelError(f"--init-from {path / WEIGHTS}: corrupt (its sha256 differs from the one recorded in "
                                 f"{path / 'chorus_run.json'})")
    elif (path / WEIGHTS_INDEX).is_file():
        index = read_json(path / WEIGHTS_INDEX, "weights index")
        files = tuple(sorted({path / f for f in index.get("weight_map", {}).values()}))
        missing = [str(f) for f in files if not f.is_file()]
        if not files or missing:
            raise BaseModelError(f"--init-from {path / WEIGHTS_INDEX}: lists missing weight files {missing}")
        digest = sha256_file(path / WEIGHTS_INDEX)
    else:
        raise BaseModelError(f"--init-from {path}: no {WEIGHTS} or {WEIGHTS_INDEX} (safetensors weights are needed; "
                             "pickled .bin weights are not loaded)")
    return BaseModel(path, config, shape, files, digest)


def check_base_fits(base: BaseModel, manifest: dict, data_dir: str | Path, context: int, preset: str | None) -> None:
    """Refuse, by name, a base that does not match the dataset or the requested run."""
    if preset:
        wanted = PRESETS.get(preset)
        if wanted is None:
            raise BaseModelError(f"unknown preset {preset!r}; with --init-from the shape is the base's, so omit --preset")
        diff = [f"{k} {getattr(wanted, k)} vs base {getattr(base.shape, k)}" for k in
                ("hidden", "mlp", "heads", "kv_heads", "layers") if getattr(wanted, k) != getattr(base.shape, k)]
        if diff:
            raise BaseModelError(f"--preset {preset} disagrees with the base {base.path / 'config.json'}: "
                                 f"{', '.join(diff)}; omit --preset to take the base's shape")
    data_tokenizer = Path(data_dir) / "tokenizer" / "tokenizer.json"
    if not base.tokenizer_file.is_file():
        raise BaseModelError(f"--init-from {base.path}: no tokenizer.json, so the dataset's tokenizer cannot be "
                             "checked against it; copy the base's tokenizer files into it")
    if sha256_file(base.tokenizer_file) != manifest["tokenizer_sha256"]:
        raise BaseModelError(f"the dataset's tokenizer {data_tokenizer} is not the base's {base.tokenizer_file} "
                             f"(sha256 differs): make the dataset with `python -m train data --tokenizer {base.path}`")
    if manifest["vocab_size"] > base.config.vocab_size:
        raise BaseModelError(f"the dataset's vocabulary ({manifest['vocab_size']} tokens, {data_tokenizer}) exceeds the "
                             f"base's embedding table ({base.config.vocab_size}, {base.path / 'config.json'})")
    if context > base.config.max_position_embeddings:
        raise BaseModelError(f"--context {context} is longer than the base's context "
                             f"({base.config.max_position_embeddings}, {base.path / 'config.json'})")


def base_state_dict(base: BaseModel) -> dict[str, torch.Tensor]:
    """The base's weights (fp32, CPU); a damaged file is named."""
    state = {}
    for f in base.weight_files:
        try:
            state.update(load_file(f))
        except Exception as e:  # safetensors raises several kinds for a truncated or garbled file
            raise BaseModelError(f"--init-from {f}: corrupt weights file ({e})") from e
    return {k: v.float() for k, v in state.items()}


def member_config(base: BaseModel) -> LlamaConfig:
    """The member's config: the base's, in fp32 (the trainer's precision on CPU; bf16 autocast on GPU)."""
    config = LlamaConfig.from_dict(json.loads(base.config.to_json_string()))
    config.torch_dtype = "float32"
    return config
