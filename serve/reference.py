"""The ensemble's log-probabilities in plain PyTorch/transformers: the oracle the vLLM engine is tested against.

The K members run as one batched call: their parameters are stacked (`torch.func.stack_module_state`) and
one Hugging Face Llama is vmapped over the member axis, so a K-member forward is one set of batched matmuls.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from serve.pack import check_combine, check_weights, ensemble_info, member_config_dict, member_state_dicts, read_config


def combine_member_logits(logits: torch.Tensor, combine: str) -> torch.Tensor:
    """Member logits [K, ..., V] -> the ensemble's normalized next-token log-probabilities [..., V].

    "logits": log_softmax(mean_k logits_k), the paper's ensemble (a normalized product of experts).
    "probs":  log(mean_k softmax(logits_k)) = logsumexp_k log_softmax(logits_k) - log K (a mixture).
    """
    if check_combine(combine) == "logits":
        return torch.log_softmax(logits.mean(0), dim=-1)
    return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])


def member_config(config: dict) -> LlamaConfig:
    """The Llama config of one member, from a member's or an ensemble's config.json."""
    config = {k: v for k, v in member_config_dict(config).items() if k != "architectures"}
    return LlamaConfig(**config)


class ReferenceEnsemble:
    def __init__(self, members: list[LlamaForCausalLM], combine: str = "logits"):
        self.k, self.combine, self.config = len(members), check_combine(combine), members[0].config
        self.params, self.buffers = torch.func.stack_module_state([m.eval() for m in members])
        # The vmapped base: a shape-only copy on the meta device; its weights come from self.params.
        self.base = copy.deepcopy(members[0]).to("meta")

    @classmethod
    def from_members(cls, member_dirs: list[str | Path], combine: str = "logits") -> "ReferenceEnsemble":
        for d in member_dirs:
            check_weights(d)  # a truncated, damaged or corrupt weights file is named, not a bare deserializer error
        members = [LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32) for d in member_dirs]
        return cls(members, combine)

    @classmethod
    def from_dir(cls, path: str | Path, combine: str | None = None) -> "ReferenceEnsemble":
        """A packed ensemble directory, or a plain member directory (K=1)."""
        path = Path(path)
        info = ensemble_info(path)
        if "chorus_ensemble" not in read_config(path):
            return cls.from_members([path], combine or info["combine"])
        config = member_config(read_config(path))
        members = []
        for state in member_state_dicts(path):  # checks the weights file first: damage is named
            model = LlamaForCausalLM(config)
            model.load_state_dict(state)
            members.append(model.float())
        return cls(members, combine or info["combine"])

    def _member_logits(self, params: dict, buffers: dict, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.base, (params, buffers), (input_ids,)).logits

    @torch.no_grad()
    def member_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Every member's logits: LongTensor[B, T] -> FloatTensor[K, B, T, V]."""
        return torch.vmap(self._member_logits, in_dims=(0, 0, None))(self.params, self.buffers, input_ids).float()

    @torch.no_grad()
    def log_probs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Normalized next-token log-probabilities at every position: LongTensor[B, T] -> FloatTensor[B, T, V]."""
        return combine_member_logits(self.member_logits(input_ids), self.combine)
