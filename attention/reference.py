"""The specification of attention: plain float64 math, no tricks.

Shape legend: B batch, H query heads, G key/value heads (H % G == 0), Q queries, K keys, D head dim.
"""

from __future__ import annotations

import torch


def attention_reference(
    q_BHQD: torch.Tensor,
    k_BGKD: torch.Tensor,
    v_BGKD: torch.Tensor,
    mask_QK: torch.Tensor | None,
    scale: float,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v in `compute_dtype`.

    Returns (out_BHQD in q's dtype, lse_BHQ in float32). A query row with no visible key would be
    undefined; `masks.full_mask_QK` never builds one.
    """
    group = q_BHQD.shape[1] // k_BGKD.shape[1]
    q = q_BHQD.to(compute_dtype)
    k = k_BGKD.to(compute_dtype).repeat_interleave(group, dim=1)
    v = v_BGKD.to(compute_dtype).repeat_interleave(group, dim=1)
    scores_BHQK = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if mask_QK is not None:
        scores_BHQK = scores_BHQK.masked_fill(~mask_QK, float("-inf"))
    lse_BHQ = torch.logsumexp(scores_BHQK, dim=-1)
    probs_BHQK = torch.exp(scores_BHQK - lse_BHQ[..., None])
    out_BHQD = torch.einsum("bhqk,bhkd->bhqd", probs_BHQK, v)
    return out_BHQD.to(q_BHQD.dtype), lse_BHQ.float()
