"""vLLM plugin (entry point `vllm.general_plugins` -> `chorus_ensemble`): every vLLM process knows the ensemble."""
from __future__ import annotations

import os

from serve.pack import ARCHITECTURE

# Benchmark-only switch: bench.perf.serve_throughput sets it to "1" in its own environment before vLLM loads (the
# engine processes it starts inherit it) to measure, beside the fused engine, the members-in-a-row engine the
# fused one replaced, under its own architecture name. Nothing else sets it: the product has one engine.
SEQUENTIAL_ENV = "CHORUS_BENCH_SEQUENTIAL_ENSEMBLE"
SEQUENTIAL_ARCHITECTURE = "ChorusSequentialEnsembleForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    from serve import vllm_cpu_fixes

    vllm_cpu_fixes.apply()  # speculative decoding on the CPU samples from the target's distribution (see there)

    # The lazy "module:Class" form: vLLM imports the model only in the process that builds it.
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "serve.ensemble_model:ChorusEnsembleForCausalLM")
    if os.environ.get(SEQUENTIAL_ENV) == "1" and SEQUENTIAL_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(SEQUENTIAL_ARCHITECTURE, "serve.ensemble_model:SequentialEnsembleForCausalLM")
