"""The Triton kernel of `attention.rmsnorm.rms_norm_triton` (imports triton at import time).

Shape legend: B rows (tokens), E features.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr, stride_x, stride_out, n_cols, eps, BLOCK_E: tl.constexpr
):
    row = tl.program_id(0)
    offs_E = tl.arange(0, BLOCK_E)
    ok_E = offs_E < n_cols
    x_E = tl.load(x_ptr + row * stride_x + offs_E, mask=ok_E, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x_E * x_E, axis=0) / n_cols + eps)
    normed_E = (x_E * rstd).to(x_ptr.dtype.element_ty)  # rounded to the input dtype, as HF does
    w_E = tl.load(w_ptr + offs_E, mask=ok_E, other=0.0)
    out_E = w_E.to(tl.float32) * normed_E.to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs_E, out_E.to(out_ptr.dtype.element_ty), mask=ok_E)


def rms_norm_kernel(
    x_BE: torch.Tensor, w_E: torch.Tensor, out_BE: torch.Tensor, eps: float
) -> None:
    n_rows, n_cols = x_BE.shape
    block = triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(n_rows,)](
        x_BE,
        w_E,
        out_BE,
        x_BE.stride(0),
        out_BE.stride(0),
        n_cols,
        eps,
        BLOCK_E=block,
        num_warps=8 if block >= 4096 else 4,
    )
