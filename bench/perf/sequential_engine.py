"""BENCHMARK ONLY: the ensemble engine that serve/ensemble_model.py's fused one replaced, kept so that
bench.perf.serve_throughput can measure the two side by side. Member i is vLLM's `LlamaForCausalLM` under `m{i}`;
the members run one after another and each computes its logits from its own head.

vLLM builds a model in engine processes it starts itself, so the architecture must be registered in each of them:
`register` is a vLLM general plugin (pyproject: entry point `vllm.general_plugins` -> `chorus_sequential_baseline`),
which vLLM loads in every process, and it registers the architecture only where the benchmark set SEQUENTIAL_ENV
(the engine processes inherit it). Everywhere else it does nothing: the product has one engine.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from serve.reference import combine_member_logits

SEQUENTIAL_ENV = "CHORUS_BENCH_SEQUENTIAL_ENSEMBLE"
SEQUENTIAL_ARCHITECTURE = "ChorusSequentialEnsembleForCausalLM"


class SequentialEnsembleForCausalLM(nn.Module):
    def __init__(self, *, vllm_config, prefix: str = ""):
        # vLLM's model code is imported here, not at the top: every vLLM process loads this module (the plugin),
        # and only the benchmark's engines build the model.
        from vllm.model_executor.models.llama import LlamaForCausalLM

        super().__init__()
        config = vllm_config.model_config.hf_config
        self.k, self.combine = int(config.chorus_ensemble["members"]), config.chorus_ensemble["combine"]
        self.hidden_size = config.hidden_size
        for i in range(self.k):
            name = f"m{i}"
            member = LlamaForCausalLM(vllm_config=vllm_config, prefix=f"{prefix}.{name}" if prefix else name)
            setattr(self, name, member)
        self.members = [getattr(self, f"m{i}") for i in range(self.k)]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("an ensemble has one embedding table per member; prompt embeddings are not supported")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat([m(input_ids, positions) for m in self.members], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        per_member = hidden_states.split(self.hidden_size, dim=-1)
        logits = torch.stack([m.compute_logits(h) for m, h in zip(self.members, per_member)])
        return combine_member_logits(logits.float(), self.combine).to(hidden_states.dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        from vllm.model_executor.models.utils import AutoWeightsLoader

        return AutoWeightsLoader(self).load_weights(weights)


def register() -> None:
    """The vLLM plugin: register the sequential engine under its own architecture name, in the benchmark only."""
    if os.environ.get(SEQUENTIAL_ENV) != "1":
        return
    from vllm import ModelRegistry

    # The lazy "module:Class" form: vLLM imports the model only in the process that builds it.
    if SEQUENTIAL_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(SEQUENTIAL_ARCHITECTURE,
                                     "bench.perf.sequential_engine:SequentialEnsembleForCausalLM")
