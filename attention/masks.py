"""Pure mask builders.

Shape legend: Q = new (query) tokens, K = keys in the cache including the new ones (K >= Q),
N = tree nodes (N == Q when a tree is verified).

Alignment is bottom-right: query row i is the token at absolute position K - Q + i, so the new
tokens are the last Q keys. The cached prefix (the first K - Q keys) is visible to every query;
only the last Q x Q block carries the causal or tree structure.
"""

from __future__ import annotations

import torch


def causal_block(q_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """bool [Q, Q] lower-triangular block: query i sees new key j iff j <= i."""
    return torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril_()


def full_mask_QK(
    q_len: int,
    kv_len: int,
    *,
    causal: bool = False,
    block_QQ: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """bool [Q, K] mask (True = attend), or None when every query sees every key.

    `block_QQ` is the structure of the last Q x Q block (a tree's ancestor mask, say); `causal`
    is shorthand for a lower-triangular block. Giving both is an error.
    """
    if kv_len < q_len:
        raise ValueError(f"kv_len ({kv_len}) must be >= q_len ({q_len}): new tokens are the last keys")
    if causal and block_QQ is not None:
        raise ValueError("give either causal=True or a block mask, not both")
    if causal:
        block_QQ = causal_block(q_len, device)
    if block_QQ is None:
        return None
    if block_QQ.shape != (q_len, q_len) or block_QQ.dtype != torch.bool:
        raise ValueError(
            f"block mask must be bool [{q_len}, {q_len}], got {block_QQ.dtype} {tuple(block_QQ.shape)}"
        )
    if not bool(block_QQ.diagonal().all()):
        raise ValueError("block mask must let every query attend to itself (diagonal all True)")
    mask_QK = torch.ones(q_len, kv_len, dtype=torch.bool, device=block_QQ.device)
    mask_QK[:, kv_len - q_len :] = block_QQ
    return mask_QK


def additive_mask(mask_QK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask -> additive float mask (0 where attended, dtype's min elsewhere)."""
    out = torch.zeros(mask_QK.shape, dtype=dtype, device=mask_QK.device)
    return out.masked_fill_(~mask_QK, torch.finfo(dtype).min)
