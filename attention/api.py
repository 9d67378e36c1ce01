"""One entry point for attention, with an explicit backend.

Shape legend: B batch, H query heads, G key/value heads (H % G == 0), Q queries, K keys (K >= Q),
D head dim.

`attention(q, k, v, backend=..., causal=..., tree_mask_QQ=...)` computes attention of Q new
tokens over K keys whose last Q are those new tokens (bottom-right alignment, see `masks`).
Backends:

* `reference`: float64 math, the specification (`reference.py`);
* `sdpa`: PyTorch's `scaled_dot_product_attention` with a boolean mask.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from attention.masks import full_mask_QK
from attention.reference import attention_reference
from attention.sdpa import attention_sdpa

Backend = Literal["reference", "sdpa"]
BACKENDS: tuple[str, ...] = ("reference", "sdpa")


def _check_shapes(q_BHQD: torch.Tensor, k_BGKD: torch.Tensor, v_BGKD: torch.Tensor) -> None:
    if q_BHQD.ndim != 4 or k_BGKD.ndim != 4 or v_BGKD.ndim != 4:
        raise ValueError(
            "expected q [B, H, Q, D], k and v [B, G, K, D]; got "
            f"{tuple(q_BHQD.shape)}, {tuple(k_BGKD.shape)}, {tuple(v_BGKD.shape)}"
        )
    b, h, q_len, d = q_BHQD.shape
    bk, g, kv_len, dk = k_BGKD.shape
    if k_BGKD.shape != v_BGKD.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k_BGKD.shape)} vs {tuple(v_BGKD.shape)}")
    if bk != b or dk != d:
        raise ValueError(f"q {tuple(q_BHQD.shape)} and k {tuple(k_BGKD.shape)} disagree on B or D")
    if h % g != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({g})")
    if kv_len < q_len:
        raise ValueError(f"fewer keys ({kv_len}) than queries ({q_len}): new tokens are the last keys")
    if not (q_BHQD.dtype == k_BGKD.dtype == v_BGKD.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q_BHQD.dtype}, {k_BGKD.dtype}, {v_BGKD.dtype}")


def attention(
    q_BHQD: torch.Tensor,
    k_BGKD: torch.Tensor,
    v_BGKD: torch.Tensor,
    *,
    backend: str = "sdpa",
    causal: bool = False,
    tree_mask_QQ: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of Q new tokens over K keys; returns out_BHQD (and lse_BHQ in float32).

    `tree_mask_QQ` (bool, [i, j] = new token j is i or an ancestor of i) masks only the last Q x Q
    block; the cached prefix is visible to all queries. `causal=True` is the lower-triangular
    block. `scale` defaults to 1/sqrt(D).
    """
    _check_shapes(q_BHQD, k_BGKD, v_BGKD)
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    scale = 1.0 / math.sqrt(q_BHQD.shape[-1]) if scale is None else scale
    mask_QK = full_mask_QK(
        q_BHQD.shape[2], k_BGKD.shape[2], causal=causal, block_QQ=tree_mask_QQ,
        device=q_BHQD.device,
    )
    if backend == "reference":
        out, lse = attention_reference(q_BHQD, k_BGKD, v_BGKD, mask_QK, scale)
        return (out, lse) if return_lse else out
    out = attention_sdpa(q_BHQD, k_BGKD, v_BGKD, mask_QK, scale)
    if return_lse:
        # SDPA does not expose its log-sum-exp; tests get it from the same-dtype math.
        _, lse = attention_reference(q_BHQD, k_BGKD, v_BGKD, mask_QK, scale, q_BHQD.dtype)
        return out, lse
    return out
