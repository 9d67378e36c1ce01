"""Llama-style RMSNorms of a transformers model run as one Triton kernel each (on CUDA).

Model knowledge lives here, not in `attention/`: which norm classes compute Llama's definition
(`attention.rmsnorm.rms_norm_reference`). Each such module is replaced, through `nn.Module`'s
own `set_submodule`, by a `FusedRMSNorm` that shares its weight; nothing is patched on the
library's modules, and `fuse_rms_norms` returns the function that puts the originals back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from attention.rmsnorm import rms_norm_triton

# Norms computing weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype) (not Gemma's 1 + weight).
LLAMA_STYLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class FusedRMSNorm(nn.Module):
    """`rms_norm_triton` with the weight and epsilon of the norm it stands in for."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.weight = cast(nn.Parameter, original.weight)
        self.variance_epsilon = float(cast(float, original.variance_epsilon))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm_triton(hidden_states, self.weight, self.variance_epsilon)


def fuse_rms_norms(model: nn.Module) -> Callable[[], None]:
    """Swap the model's Llama-style RMSNorm modules for `FusedRMSNorm`; returns the undo."""
    swapped = [
        (name, module)
        for name, module in model.named_modules()
        if type(module).__name__ in LLAMA_STYLE_NORMS and hasattr(module, "variance_epsilon")
    ]
    for name, module in swapped:
        model.set_submodule(name, FusedRMSNorm(module))

    def undo() -> None:
        for name, module in swapped:
            model.set_submodule(name, module)

    return undo
