"""Int8 weights for a drafter's small matrix products on a CPU.

Shape legend: B rows, I input features, O output features.

A drafter multiplies one or a few rows by the same large matrices every step (a recurrent
drafter's transition and draft LM head at every depth, Medusa heads' vocabulary projection once).
With so few rows a CPU is bound by reading the weights, so fbgemm's dynamic int8 linear
(`torch.ops.quantized`: int8 weights with one scale per output row, the activations quantised to
uint8 at each call), which reads a quarter of the bytes in a native kernel, drafts faster at
nearly the same τ. The figures: eval/results/cpu-mtbench-2026-11-26-00c88f6/README.md,
*Int8 drafting*.

The drafter only proposes; verification decides. So the rounding can cost acceptance but does
not change what the engine computes: greedy stays identical to plain greedy (tested in fp32; in
bf16 any change of the verified tree moves the verifier's own rounding, see the README's
*Numerics*), and the acceptance rules do not read the draft's probabilities. One thing differs
from a float product: the activations share one quantisation scale per call, so a row's result
depends slightly on the other rows of its batch.

PyTorch 2.13 marks the quantized-tensor constructors this needs as deprecated (pytorch#184982).
Nothing else in PyTorch reads int8 weights as fast on a CPU (the alternatives are in the same
README), so we keep it, silence that one warning, and `int8_supported` turns int8 drafting off by
itself on a build where the constructors are gone.
"""

from __future__ import annotations

import warnings

import torch


class Int8Linear(torch.nn.Module):
    """y_BO = x_BI @ W_OI.T + b_O with W stored as int8 (per-row scales); float32 out, on a CPU."""

    def __init__(self, weight_OI: torch.Tensor, bias_O: torch.Tensor | None = None) -> None:
        super().__init__()
        weight = weight_OI.detach().float().cpu()
        scale_O = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        with warnings.catch_warnings():  # see the module docstring: deprecated, and we know it
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
            q_OI = torch.quantize_per_channel(
                weight, scale_O, torch.zeros_like(scale_O, dtype=torch.int64), 0, torch.qint8
            )
        bias = None if bias_O is None else bias_O.detach().float().cpu()
        self._packed = torch.ops.quantized.linear_prepack(q_OI, bias)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x_BI: torch.Tensor) -> torch.Tensor:
        lead = x_BI.shape[:-1]
        x = x_BI.reshape(-1, self.in_features).float().contiguous()
        return torch.ops.quantized.linear_dynamic(x, self._packed).reshape(*lead, -1)


def int8_supported(device: torch.device) -> bool:
    """Whether `Int8Linear` runs here: a CPU whose quantized engine packs int8 linears."""
    if device.type != "cpu":
        return False
    try:
        Int8Linear(torch.ones(2, 2))(torch.ones(1, 2))
    except (RuntimeError, AttributeError):  # no quantized engine in this build / on this CPU
        return False
    return True
