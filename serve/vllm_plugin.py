"""vLLM plugin (entry point `vllm.general_plugins` -> `chorus_ensemble`): every vLLM process knows the ensemble."""
from __future__ import annotations

from serve.pack import ARCHITECTURE


def register() -> None:
    from vllm import ModelRegistry

    from serve import vllm_cpu_fixes

    vllm_cpu_fixes.apply()  # speculative decoding on the CPU samples from the target's distribution (see there)

    # The lazy "module:Class" form: vLLM imports the model only in the process that builds it.
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "serve.ensemble_model:ChorusEnsembleForCausalLM")
