"""Int8 weights for a drafter's small matrix products on a CPU.

A recurrent drafter multiplies one or a few rows by the same matrices at every depth (the
transition's two layers and the draft-vocabulary LM head: 26 MB in bf16 for the bundled heads, four
times per step); Medusa heads multiply K rows by the whole vocabulary's LM head once per step (57 MB
for SmolLM2). On a CPU that work is bound by reading the weights (and bf16 products of so few
rows run far below the cores' peak: 17 GB/s with the weights in cache here). fbgemm's dynamic
int8 linear (`torch.ops.quantized`: int8 weights with one scale per output row, the activations
quantised to uint8 at each call) reads a quarter of the bytes and runs a native kernel: on the project's 2-core CPU the draft LM head takes
0.41 ms instead of 1.7 ms with a cold cache (16384 x 576, one row), and a `dynamic:8` + lookup
step of the bundled heads 48.1 ms instead of 53.3 ms, at τ 2.314 instead of 2.317 (SmolLM2 in bf16,
torch 2.13 CPU, 8 MT-Bench prompts twice, 128 tokens, both in one run); four random Medusa heads on
SmolLM2 draft in 1.2 ms instead of 4.4 ms (same run as their float twin).

The drafter only proposes; verification decides. So the rounding can cost acceptance but does
not change what the engine computes: greedy stays identical to plain greedy (tested in fp32; in
bf16 any change of the verified tree moves the verifier's own rounding, see the README's
*Numerics*), and the acceptance rules do not read the draft's probabilities. One thing differs
from a float product: the activations share one quantisation scale per call, so a row's result
depends slightly on the other rows of its batch.

PyTorch 2.13 marks the quantized-tensor constructors this needs as deprecated (pytorch#184982).
Nothing else in PyTorch reads int8 weights this fast here (tried: `torch._int_mm` with per-row
activation scales, 0.75 ms cold; `torch._weight_int8pack_mm` with bf16 activations, 0.74 ms), so
we keep it, silence that one warning, and `int8_supported` turns int8 drafting off by itself on a
build where the constructors are gone.
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
