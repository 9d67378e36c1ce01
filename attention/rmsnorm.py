"""RMSNorm as one Triton kernel (GPU), beside its PyTorch reference.

Shape legend: B rows (tokens), E features.

`rms_norm_reference` is the Llama definition that transformers' `LlamaRMSNorm` (and the Mistral /
Qwen2 / Qwen3 norms) compute: in float32, x * rsqrt(mean(x^2) + eps), rounded to the input dtype,
then times the weight. Eagerly that is ~6 kernels per norm (copy, pow, mean, add+rsqrt, mul,
cast, mul), 65 norms per 7B step (the profile: eval/results/h100-2026-11-26-9b3b7ad/README.md).
`rms_norm_triton` does the same arithmetic in one launch, one program per row (up to float32
summation order).

Which model modules compute this definition is model knowledge: `medusa_engine/hf_adapter/norms.py`
swaps them for the kernel.
"""

from __future__ import annotations

import os

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype), as transformers' LlamaRMSNorm."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_reference` in one kernel; x [..., E] with a contiguous last dim."""
    from attention._rmsnorm_kernel import rms_norm_kernel

    assert x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", (
        "rms_norm_triton needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)"
    )
    x_BE = x.reshape(-1, x.shape[-1])
    if x_BE.stride(-1) != 1:
        x_BE = x_BE.contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out_BE = torch.empty(x_BE.shape, dtype=out_dtype, device=x.device)
    rms_norm_kernel(x_BE, weight, out_BE, eps)
    return out_BE.reshape(x.shape)
