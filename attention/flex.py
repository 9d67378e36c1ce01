"""FlexAttention (`torch.nn.attention.flex_attention`) with a tree/causal block mask over a cache.

Shape legend: B batch, H query heads, G key/value heads, Q queries (new tokens), S key slots in
the buffer (row b's valid prefix is kv_len_B[b] <= S), D head dim. Query and key blocks (of
`block_size`) have no letter: `n_qb` / `n_kb` count them.

Static shapes: the key buffer may be a preallocated cache of S slots; the valid length is a device
tensor read by the mask_mod, and the block mask is computed from it by tensor arithmetic
(`flex_block_mask`), not by evaluating the mask_mod on every (query, key) pair. So a growing cache
changes no shape: a compiled flex_attention does not recompile and nothing syncs with the host.

Block classes, with tree_start = kv_len - Q (bottom-right alignment inside the valid prefix):
a key block is *full* (every query sees all its keys, the mask_mod is skipped) when it lies in the
prefix [0, tree_start) (for causal: below the block's first query), *partial* (the mask_mod
decides) when it reaches the tree block or the end of the valid keys, and skipped beyond.

On a CPU, eager flex_attention materialises the full score matrix and ignores the block mask
(torch 2.13); `torch.compile(flex_attention)` works on a CPU too but takes ~20 s to
compile, so `compiled=None` means compiled on CUDA and eager elsewhere.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import AuxOutput, AuxRequest, BlockMask, flex_attention

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def flex_mask_mod(
    q_len: int,
    kv_len_B: torch.Tensor,
    *,
    causal: bool = False,
    block_QQ: torch.Tensor | None = None,
) -> MaskMod:
    """mask_mod(b, h, q_idx, kv_idx) -> visible, for Q new tokens at the end of kv_len_B[b] keys.

    The closure captures `kv_len_B` and `block_QQ` as tensors, so their values may change between
    calls (in place) without a recompile.
    """
    if causal and block_QQ is not None:
        raise ValueError("give either causal=True or a block mask, not both")

    def mask_mod(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        kv_len = kv_len_B[b]
        valid = kv_idx < kv_len
        rel = kv_idx - (kv_len - q_len)  # key index inside the last Q x Q block
        if causal:
            return valid & (rel <= q_idx)
        if block_QQ is not None:
            # Both indices clamped: compiled kernels also evaluate the padding rows/columns of
            # partial blocks (pytorch/pytorch#137801), and must not read outside block_QQ.
            bit = block_QQ[q_idx.clamp(0, q_len - 1), rel.clamp(0, q_len - 1)]
            return valid & ((rel < 0) | bit)
        return valid

    return mask_mod


def flex_block_mask(
    q_len: int,
    max_len: int,
    kv_len_B: torch.Tensor,
    *,
    causal: bool = False,
    block_QQ: torch.Tensor | None = None,
    block_size: int = 128,
) -> BlockMask:
    """BlockMask for `flex_mask_mod`, computed from kv_len_B by arithmetic (no host sync).

    A conservative block classification: the tree block is treated as partial as a whole (the
    mask_mod handles it), which costs at most ceil(Q / block_size) + 1 partial key blocks.
    """
    device = kv_len_B.device
    n_qb = -(-q_len // block_size)
    n_kb = -(-max_len // block_size)
    kv_len_B1 = kv_len_B.long().view(-1, 1)
    tree_start_B1 = kv_len_B1 - q_len
    # Query block bounds [n_qb]; the keys each (row, query block) sees fully / at all, [B, n_qb].
    q_lo = torch.arange(n_qb, device=device) * block_size
    q_hi = (q_lo + block_size).clamp(max=q_len)
    if causal:
        full_keys = tree_start_B1 + q_lo + 1  # the block's first query sees keys <= its own
        visible_keys = tree_start_B1 + q_hi
    elif block_QQ is not None:
        full_keys = tree_start_B1.expand(-1, n_qb)
        visible_keys = kv_len_B1.expand(-1, n_qb)
    else:
        full_keys = visible_keys = kv_len_B1.expand(-1, n_qb)
    n_full = full_keys.clamp(min=0) // block_size
    n_seen = -(-visible_keys // block_size)
    key_blocks = torch.arange(n_kb, device=device, dtype=torch.int32)
    # [B, n_qb, n_kb]: the partial blocks follow the full ones; only n_seen - n_full are read.
    kv_indices = (n_full[..., None] + key_blocks).clamp(max=n_kb - 1).to(torch.int32)
    return BlockMask.from_kv_blocks(
        (n_seen - n_full).to(torch.int32)[:, None],
        kv_indices[:, None],
        n_full.to(torch.int32)[:, None],
        key_blocks.expand(kv_len_B.shape[0], 1, n_qb, n_kb).contiguous(),
        BLOCK_SIZE=block_size,
        mask_mod=flex_mask_mod(q_len, kv_len_B, causal=causal, block_QQ=block_QQ),
        seq_lengths=(q_len, max_len),
        compute_q_blocks=False,  # the transposed indices serve only the backward pass
    )


@functools.cache
def _compiled_flex() -> Callable[..., tuple[torch.Tensor, AuxOutput] | torch.Tensor]:
    # One compiled callable per process, built on first use (not at import); torch.compile
    # caches its graphs on it, one per shape. Static shapes only: after a second shape the
    # default `dynamic=None` recompiles with symbolic sizes, and on an H100 (torch 2.11) the flex
    # template then has no valid kernel choice for a symbolic query length (NoValidChoicesError).
    # Over a preallocated cache (kv_len given) the shapes of a decode loop do not change.
    return torch.compile(flex_attention, dynamic=False)  # type: ignore[return-value]


def attention_flex(
    q_BHQD: torch.Tensor,
    k_BGSD: torch.Tensor,
    v_BGSD: torch.Tensor,
    *,
    scale: float,
    kv_len_B: torch.Tensor | None = None,
    causal: bool = False,
    tree_mask_QQ: torch.Tensor | None = None,
    block_mask: BlockMask | None = None,
    compiled: bool | None = None,
    return_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FlexAttention of Q new tokens over a key buffer; returns (out_BHQD, lse_BHQ float32).

    lse is None when `return_lse=False` (compiled flex on a CPU cannot return it, torch 2.13).

    `kv_len_B` (int [B]; default S for every row) is the valid length of each row; slots past it
    must hold finite values and are never attended. `block_mask` may be passed in (built once
    per step by `flex_block_mask` and shared by all layers); otherwise it is built here.
    `compiled=None` compiles on CUDA only (see the module docstring). Nothing is mutated.
    """
    b, _, q_len, _ = q_BHQD.shape
    max_len = k_BGSD.shape[2]
    if kv_len_B is None:
        kv_len_B = torch.full((b,), max_len, dtype=torch.int32, device=q_BHQD.device)
    if block_mask is None:
        block_mask = flex_block_mask(q_len, max_len, kv_len_B, causal=causal, block_QQ=tree_mask_QQ)
    use_compiled = q_BHQD.device.type == "cuda" if compiled is None else compiled
    fn: Callable[..., tuple[torch.Tensor, AuxOutput] | torch.Tensor]
    fn = _compiled_flex() if use_compiled else flex_attention  # type: ignore[assignment]
    aux_request = AuxRequest(lse=True) if return_lse else None
    gqa = q_BHQD.shape[1] != k_BGSD.shape[1]
    # Under Q < 128 inductor picks its flex-decoding template, which packs a kv head's query
    # heads into one block; with GQA and a tree of Q = 64 (4 x 64 rows) it found no valid config
    # on an H100 (torch 2.11, NoValidChoicesError). The main template takes such shapes.
    options = {"BACKEND": "TRITON"} if gqa and q_len > 1 else None
    with warnings.catch_warnings():
        # The eager path warns that it is unfused; on a CPU and in tests that is the point.
        warnings.filterwarnings("ignore", message=".*without torch.compile.*")
        result = fn(
            q_BHQD,
            k_BGSD,
            v_BGSD,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=gqa,
            return_aux=aux_request,
            kernel_options=options,
        )
    if not return_lse:
        assert isinstance(result, torch.Tensor)
        return result, None
    assert isinstance(result, tuple) and result[1].lse is not None, "flex returned no lse"
    return result[0], result[1].lse
