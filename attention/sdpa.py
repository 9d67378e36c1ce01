"""`torch.nn.functional.scaled_dot_product_attention` with a boolean mask.

Shape legend: B batch, H query heads, G key/value heads, Q queries, K keys, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_sdpa(
    q_BHQD: torch.Tensor,
    k_BGKD: torch.Tensor,
    v_BGKD: torch.Tensor,
    mask_QK: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """out_BHQD; grouped-query attention through SDPA's `enable_gqa`."""
    gqa = q_BHQD.shape[1] != k_BGKD.shape[1]
    return F.scaled_dot_product_attention(
        q_BHQD, k_BGKD, v_BGKD, attn_mask=mask_QK, scale=scale, enable_gqa=gqa
    )
