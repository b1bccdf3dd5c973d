"""ChorusEnsembleForCausalLM: K Llama members executed as ONE wide model by vLLM (one scheduler, one KV cache).

Every weight of the K members is stacked on a leading member axis at load time (the pack on disk keeps its
`m{i}.` prefixes; serve.pack owns that format). Activations are [K, tokens, width], so every projection
(q/k/v, o, gate/up, down) is ONE batched matmul `torch.bmm([K, T, in], [K, in, out])`, and the RMSNorms are
batched per member.

Attention runs once per layer over K x heads. Member k's query heads are heads k*H .. k*H + H-1 and its KV
heads are k*KV .. k*KV + KV-1 of one vLLM `Attention` layer with K*H query and K*KV KV heads. vLLM maps query
head h to KV head h // (K*H / K*KV) = h // g with g = H / KV, and for h = k*H + i that is k*KV + i // g: a
member's queries only ever read its own KV heads (GQA grouping stays member-local), and heads are independent
otherwise, so the layer computes each member's attention exactly. A token costs K x a member's KV bytes.
Rotary embeddings run once per layer over all K x heads (the members share the rope settings: pack checks it).

`forward` returns each token's K final hidden states side by side, [T, K * hidden]. `compute_logits` combines:
  logits: mean_k h_k W_k = [h_1 .. h_K] @ [W_1; ..; W_K] / K, one matmul, then log_softmax;
  probs:  one batched [K, T, V] matmul, log_softmax per member, logsumexp over members - log K.
Both equal serve.reference.combine_member_logits (the oracle the tests hold this model to).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.rotary_embedding import get_rope

from serve.pack import check_combine, split_member_name
from train.model import STACKED_PARAMS_MAPPING, fused_rows


def member_parameter(*shape: int) -> nn.Parameter:
    """An inference-only parameter of K members' stacked weights, filled by load_weights."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Each member's RMSNorm at once: x [K, T, D], weight [K, D]."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight[:, None, :]


class FusedDecoderLayer(nn.Module):
    """One Llama decoder layer of all K members. Linear weights are stored [K, in, out] (the transpose of
    Hugging Face's [out, in]) so that x @ W is a plain batched matmul."""

    def __init__(self, config, k: int, cache_config, quant_config, prefix: str):
        super().__init__()
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // heads
        self.k, self.eps = k, config.rms_norm_eps
        self.q_size, self.kv_size = heads * self.head_dim, kv_heads * self.head_dim
        self.input_layernorm = member_parameter(k, hidden)
        self.qkv_proj = member_parameter(k, hidden, self.q_size + 2 * self.kv_size)  # columns: q | k | v
        self.o_proj = member_parameter(k, self.q_size, hidden)
        self.post_attention_layernorm = member_parameter(k, hidden)
        self.gate_up_proj = member_parameter(k, hidden, 2 * config.intermediate_size)  # columns: gate | up
        self.down_proj = member_parameter(k, config.intermediate_size, hidden)
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings,
                                   rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True)
        # Member k owns query heads [k*heads, (k+1)*heads) and KV heads [k*kv_heads, (k+1)*kv_heads).
        self.attn = Attention(k * heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=k * kv_heads,
                              cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.self_attn.attn")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [K, T, hidden] residual stream -> the same after this layer."""
        tokens = x.shape[1]
        qkv = torch.bmm(rms_norm(x, self.input_layernorm, self.eps), self.qkv_proj)
        # [K, T, width] -> [T, K * width]: each token's heads, member 0's block first.
        q, k, v = (t.transpose(0, 1).reshape(tokens, -1)
                   for t in qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1))
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v).view(tokens, self.k, self.q_size).transpose(0, 1)
        x = x + torch.bmm(out, self.o_proj)
        gate, up = torch.bmm(rms_norm(x, self.post_attention_layernorm, self.eps), self.gate_up_proj).chunk(2, dim=-1)
        return x + torch.bmm(F.silu(gate) * up, self.down_proj)


class ChorusEnsembleForCausalLM(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        ensemble = config.chorus_ensemble
        self.k, self.combine = int(ensemble["members"]), check_combine(ensemble["combine"])
        self.hidden_size, self.vocab_size, self.eps = config.hidden_size, config.vocab_size, config.rms_norm_eps
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        base = f"{prefix}." if prefix else ""
        self.embed_tokens = member_parameter(self.k, config.vocab_size, config.hidden_size)
        # Layer names hold one integer, the layer index (what vLLM's CPU runner requires of attention layers).
        self.layers = nn.ModuleList(
            FusedDecoderLayer(config, self.k, vllm_config.cache_config, vllm_config.quant_config, f"{base}layers.{j}")
            for j in range(config.num_hidden_layers))
        self.norm = member_parameter(self.k, config.hidden_size)
        self.lm_head = member_parameter(self.k, config.hidden_size, config.vocab_size)  # [K, H, V]: W_k = lm_head[k]
        self.fused_rows = fused_rows(config)  # Hugging Face q/k/v, gate/up -> (fused parameter, its columns here)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Each member has its own embedding table: there is no single input embedding to return.
        raise NotImplementedError("an ensemble has one embedding table per member; prompt embeddings are not supported")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states of every member side by side: [T, K * hidden] (member k at k*hidden ...)."""
        x = self.embed_tokens[:, input_ids]  # [K, T, hidden]
        for layer in self.layers:
            x = layer(positions, x)
        return rms_norm(x, self.norm, self.eps).transpose(0, 1).reshape(x.shape[1], -1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The ensemble's next-token log-probabilities, returned as logits (softmax of them is the ensemble);
        fp32 whatever the engine's dtype (a bf16 engine on GPU would otherwise round the scores to 3 digits)."""
        if self.combine == "logits":
            # [h_1 .. h_K] @ [W_1; ..; W_K] = sum_k h_k W_k: the members' summed logits in one matmul.
            summed = hidden_states @ self.lm_head.view(self.k * self.hidden_size, self.vocab_size)
            return torch.log_softmax(summed.float() / self.k, dim=-1)
        per_member = hidden_states.reshape(-1, self.k, self.hidden_size).transpose(0, 1)  # [K, T, H]
        logits = torch.bmm(per_member, self.lm_head).float()  # [K, T, V]
        return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - math.log(self.k)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Map each packed tensor (serve.pack's "m{i}.<Hugging Face name>") onto member i's slice of the stacked
        parameters; Linear weights are transposed to [in, out]. Returns the parameters filled for every member."""
        params = dict(self.named_parameters())
        filled: dict[str, set[tuple[int, int | None]]] = {}  # parameter -> (member, first column) pieces written

        def put(param: str, member: int, tensor: torch.Tensor, columns: slice = slice(None)) -> None:
            params[param].data[member][..., columns].copy_(tensor)
            filled.setdefault(param, set()).add((member, columns.start))

        for name, tensor in weights:
            member, hf_name = split_member_name(name, self.k)
            parts = hf_name.split(".")
            if hf_name == "model.embed_tokens.weight":
                put("embed_tokens", member, tensor)
                if self.tied:
                    put("lm_head", member, tensor.t())
            elif hf_name == "model.norm.weight":
                put("norm", member, tensor)
            elif hf_name == "lm_head.weight":
                put("lm_head", member, tensor.t())
            elif parts[:2] == ["model", "layers"] and parts[-1] == "weight":
                where, kind = f"layers.{parts[2]}", parts[-2]
                if ".".join(parts[3:-1]) in self.fused_rows:  # q | k | v, gate | up: train.model's fused layout
                    fused, rows = self.fused_rows[".".join(parts[3:-1])]
                    put(f"{where}.{fused}", member, tensor.t(), rows)
                elif kind in ("input_layernorm", "post_attention_layernorm"):
                    put(f"{where}.{kind}", member, tensor)
                elif kind in ("o_proj", "down_proj"):
                    put(f"{where}.{kind}", member, tensor.t())
                else:
                    raise ValueError(f"unexpected tensor {name!r} in an ensemble's weights")
            elif not hf_name.endswith("rotary_emb.inv_freq"):
                raise ValueError(f"unexpected tensor {name!r} in an ensemble's weights")
        # vLLM refuses to serve a model whose parameters were not all loaded: report only complete ones
        # (q | k | v and gate | up are 3 and 2 pieces per member).
        pieces = Counter(fused for fused, _, _ in STACKED_PARAMS_MAPPING)
        return {p for p, done in filled.items() if len(done) == self.k * pieces.get(p.rsplit(".", 1)[-1], 1)}
