"""vLLM plugin (entry point `vllm.general_plugins` -> `chorus_ensemble`): every vLLM process knows the ensemble."""
from __future__ import annotations

from serve.pack import ARCHITECTURE


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # The lazy "module:Class" form: vLLM imports the model only in the process that builds it.
        ModelRegistry.register_model(ARCHITECTURE, "serve.ensemble_model:ChorusEnsembleForCausalLM")
