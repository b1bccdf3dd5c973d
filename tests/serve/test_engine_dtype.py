"""The vLLM engine's dtype follows the device the engine starts on (issue 16): fp32 on the CPU, bf16 on CUDA."""
from __future__ import annotations

import torch

from serve.app import EnsembleConfig
from serve.engine import engine_dtype


def _dtype_arg(config: EnsembleConfig) -> str:
    argv = config.vllm_cli_args()
    return argv[argv.index("--dtype") + 1]


def test_cpu_engines_run_fp32_and_cuda_engines_bf16(monkeypatch, tmp_path):
    config = EnsembleConfig(model_dir=str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine_dtype() == "float32" == _dtype_arg(config)
    # control: the same call on a machine with a GPU changes the answer (it is not a constant)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_dtype() == "bfloat16" == _dtype_arg(config)
