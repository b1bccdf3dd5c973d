"""ChorusEnsembleForCausalLM: K Llama members as ONE vLLM model (one scheduler, one block table).

Member i is vLLM's own `LlamaForCausalLM` under the prefix `m{i}`, so its attention layers are
`m{i}.model.layers.{j}.self_attn.attn`: one integer per layer name (what vLLM's CPU runner requires),
and every member keeps its own KV cache under the shared block table. `forward` runs the members on
the same tokens and concatenates their final hidden states; `compute_logits` splits them again, takes
each member's logits from its own head, and combines them exactly (see `combine_member_logits`).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader

from serve.reference import combine_member_logits


class ChorusEnsembleForCausalLM(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        ensemble = config.chorus_ensemble
        self.k, self.combine = int(ensemble["members"]), ensemble["combine"]
        self.hidden_size = config.hidden_size
        for i in range(self.k):
            name = f"m{i}"
            setattr(self, name, LlamaForCausalLM(vllm_config=vllm_config, prefix=f"{prefix}.{name}" if prefix else name))
        self.members = [getattr(self, f"m{i}") for i in range(self.k)]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Each member has its own embedding table: there is no single input embedding to return.
        raise NotImplementedError("an ensemble has one embedding table per member; prompt embeddings are not supported")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states of every member side by side: [tokens, K * hidden]."""
        return torch.cat([m(input_ids, positions) for m in self.members], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The ensemble's next-token log-probabilities, returned as logits (softmax of them is the ensemble)."""
        per_member = hidden_states.split(self.hidden_size, dim=-1)
        logits = torch.stack([m.compute_logits(h) for m, h in zip(self.members, per_member)])
        return combine_member_logits(logits.float(), self.combine).to(hidden_states.dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # AutoWeightsLoader hands "m{i}.*" to member i, whose own loader maps q/k/v and gate/up onto fused layers.
        return AutoWeightsLoader(self).load_weights(weights)
