"""Pure mask builders.

Shape legend: B batch, Q = new (query) tokens, K = keys in the cache including the new ones
(K >= Q), S = key slots of a preallocated buffer, N = tree nodes (N == Q when a tree is verified),
W = ceil(Q / 64) int64 words of mask bits.

Alignment is bottom-right: query row i is the token at absolute position K - Q + i, so the new
tokens are the last Q keys. The cached prefix (the first K - Q keys) is visible to every query;
only the last Q x Q block carries the causal or tree structure.
"""

from __future__ import annotations

import torch


def causal_block(q_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """bool [Q, Q] lower-triangular block: query i sees new key j iff j <= i."""
    return torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril_()


def resolve_block_QQ(
    q_len: int,
    *,
    causal: bool = False,
    block_QQ: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """The checked bool [Q, Q] structure of the last block, or None when there is none.

    `causal` is shorthand for a lower-triangular block; giving both is an error; a given block
    must be bool [Q, Q] with a True diagonal (every query sees itself).
    """
    if causal and block_QQ is not None:
        raise ValueError("give either causal=True or a block mask, not both")
    if causal:
        return causal_block(q_len, device)
    if block_QQ is None:
        return None
    if block_QQ.shape != (q_len, q_len) or block_QQ.dtype != torch.bool:
        raise ValueError(
            f"block mask must be bool [{q_len}, {q_len}], got {block_QQ.dtype} "
            f"{tuple(block_QQ.shape)}"
        )
    if not bool(block_QQ.diagonal().all()):
        raise ValueError("block mask must let every query attend to itself (diagonal all True)")
    return block_QQ


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
        raise ValueError(
            f"kv_len ({kv_len}) must be >= q_len ({q_len}): new tokens are the last keys"
        )
    block_QQ = resolve_block_QQ(q_len, causal=causal, block_QQ=block_QQ, device=device)
    if block_QQ is None:
        return None
    mask_QK = torch.ones(q_len, kv_len, dtype=torch.bool, device=block_QQ.device)
    mask_QK[:, kv_len - q_len :] = block_QQ
    return mask_QK


def additive_mask(mask_QK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask -> additive float mask (0 where attended, dtype's min elsewhere)."""
    out = torch.zeros(mask_QK.shape, dtype=dtype, device=mask_QK.device)
    return out.masked_fill_(~mask_QK, torch.finfo(dtype).min)


def ancestor_mask(parents_N: torch.Tensor) -> torch.Tensor:
    """bool [N, N] tree mask from parent indices: [i, j] = node j is i or an ancestor of i.

    `parents_N` (int64 [N]) gives each node's parent, with -1 for the root(s); a parent must come
    before its child (`parents_N[i] < i`), so one pass in index order suffices.
    """
    n = parents_N.shape[0]
    parents = parents_N.tolist()
    mask_NN = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= i:
            raise ValueError(f"node {i} has parent {p}: a parent must come before its child")
        if p >= 0:
            mask_NN[i] |= mask_NN[p]
    return mask_NN.to(parents_N.device)


def tree_bitmask_QW(block_QQ: torch.Tensor) -> torch.Tensor:
    """Pack a bool [Q, Q] block mask into int64 words [Q, W], W = ceil(Q / 64).

    Bit b of word w in row i is block_QQ[i, 64 * w + b]. Bit 63 is the sign bit of the int64;
    consumers test bits with `(word >> b) & 1`, which is correct under arithmetic shifts too.
    """
    q_len = block_QQ.shape[0]
    if block_QQ.shape != (q_len, q_len) or block_QQ.dtype != torch.bool:
        raise ValueError(
            f"expected a bool [Q, Q] block mask, got {block_QQ.dtype} {block_QQ.shape}"
        )
    n_words = (q_len + 63) // 64
    # The block as 0/1 int64, its columns padded to whole words: [Q, 64 W].
    padded = torch.zeros(q_len, n_words * 64, dtype=torch.int64, device=block_QQ.device)
    padded[:, :q_len] = block_QQ.long()
    bit_shifts = torch.arange(64, device=block_QQ.device, dtype=torch.int64)
    # Distinct bits never carry, so a sum is a bitwise or; 1 << 63 wraps to int64 min, as wanted.
    return (padded.view(q_len, n_words, 64) << bit_shifts).sum(-1)


def padded_mask_BQS(
    q_len: int,
    max_len: int,
    kv_len_B: torch.Tensor,
    *,
    causal: bool = False,
    block_QQ: torch.Tensor | None = None,
) -> torch.Tensor:
    """bool [B, Q, S] mask over a preallocated key buffer of S = max_len slots, valid to kv_len_B.

    Row b's valid keys are [0, kv_len_B[b]); its Q new tokens are the last Q valid keys
    (bottom-right alignment inside the valid prefix); slots at or past kv_len_B[b] are masked.
    `block_QQ` structures the new tokens of every row alike; a [B, Q, Q] block gives each row its
    own (a batch of different trees). Built from tensors only (no host sync), so kv_len_B may
    live on the device and change.
    """
    if causal and block_QQ is not None:
        raise ValueError("give either causal=True or a block mask, not both")
    device = kv_len_B.device
    if causal:
        block_QQ = causal_block(q_len, device)
    kv_len_B11 = kv_len_B.long().view(-1, 1, 1)
    key_S = torch.arange(max_len, device=device).view(1, 1, -1)
    mask_BQS = (key_S < kv_len_B11).expand(-1, q_len, -1)
    if block_QQ is not None:
        rel_BQS = (key_S - (kv_len_B11 - q_len)).expand(-1, q_len, -1)
        in_block_BQS = rel_BQS >= 0
        query_BQS = torch.arange(q_len, device=device).view(1, -1, 1).expand_as(rel_BQS)
        col_BQS = rel_BQS.clamp(0, q_len - 1)
        if block_QQ.ndim == 3:  # one block per row
            row_BQS = torch.arange(block_QQ.shape[0], device=device).view(-1, 1, 1)
            bits_BQS = block_QQ.to(device)[row_BQS.expand_as(rel_BQS), query_BQS, col_BQS]
        else:
            bits_BQS = block_QQ.to(device)[query_BQS, col_BQS]
        mask_BQS = mask_BQS & (~in_block_BQS | bits_BQS)
    return mask_BQS
