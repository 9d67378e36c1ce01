"""Split-KV (flash-decoding) attention with a tree mask over a KV cache, in Triton.

Shape legend: B batch, H query heads, G key/value heads, Q queries (new tokens), K keys,
S key slots in the buffer (row b's valid prefix is kv_len_B[b] <= S), D head dim,
W = ceil(Q / 64) int64 words of mask bits per query. Inside the kernels a tile's rows are the
queries of the H // G heads that share a kv head, packed (H // G) * Q rows deep, so each K/V tile
is loaded once for all of them: `_Q` there is a tile's query rows, `_K` its keys. BLOCK_M /
BLOCK_N (and `Tiles.block_m` / `block_n`) keep FlashAttention's names for those two tile sizes.
The kv splits have no letter: the buffers of partial results are `out_p` / `lse_p`.

Layout: `_split_kv_kernel` (one program per (query-row block, kv split, batch * kv head)) runs the
online softmax of FlashAttention over its chunk of the cache (`_attend`: first the key blocks every
row of the program sees in full, without masks, then the blocks that need masking) and writes a
partial (out, lse) in float32; `_combine_kernel` merges the partials of each query row by
log-sum-exp, as in flash-decoding (Dao et al., 2023). `_launch` holds the asserts;
`attention_triton` is the public function. The specification is `attention.reference`; tests
compare against it.

Masking, with bottom-right alignment inside the valid prefix (tree_start = kv_len - Q):
keys [0, tree_start) are visible to every query, keys [tree_start, kv_len) carry the causal or tree
structure, keys at or past kv_len are invisible (never read: loads are masked). The tree mask comes
as bits (`masks.tree_bitmask_QW`); they are only looked at in key blocks that reach the tree.

The kv length is read from device memory (`kv_len_B`) and every program derives its own chunk from
it, so the grid depends only on the buffer size S: a growing cache neither recompiles nor needs a
host sync, and the launch can be captured in a CUDA graph.

The kernels' long argument lists (and the calls that mirror them) stay grouped by role under
`# fmt: skip`: one argument per line would hide, for one, that the two `_attend` calls differ only
in their block range and MASKED.

This module imports triton at import time; `attention.api` imports it only when the `triton`
backend is asked for, so the package works without triton. On a CPU, kernels run under the
interpreter (`TRITON_INTERPRET=1`, set before triton is imported).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MASK_NONE, MASK_CAUSAL, MASK_TREE = 0, 1, 2


@dataclass(frozen=True)
class Tiles:
    """Launch parameters of the split-KV kernel; None = the default chosen in `_launch`."""

    num_splits: int | None = None  # kv splits per (query block, batch, kv head)
    block_m: int | None = None  # query rows per program
    block_n: int = 64  # keys per loop iteration
    num_warps: int | None = None
    num_stages: int | None = None  # software-pipelining depth of the kv loop


@triton.jit
def _attend(
    q_QD, k_base, v_base, bits_ptr, m_Q, l_Q, acc_QD, blk_lo, blk_hi, scale_log2,
    stride_ks, stride_vs, stride_bits_q, kv_len, tree_start, qi_Q, row_ok_Q, offs_D, d_ok_D,
    MASK_MODE: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_DTYPE: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks [blk_lo, blk_hi); returns the updated (m, l, acc).
    MASKED=False: every key of these blocks is valid and visible to every row (no masks)."""
    for blk in range(blk_lo, blk_hi):
        offs_K = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_K[:, None] * stride_ks + offs_D[None, :]
        v_ptrs = v_base + offs_K[:, None] * stride_vs + offs_D[None, :]
        if MASKED:
            k_ok_K = offs_K < kv_len
            kv_mask = k_ok_K[:, None] & d_ok_D[None, :]
            k_KD = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k_KD = tl.load(k_ptrs)
        else:
            k_KD = tl.load(k_ptrs, mask=d_ok_D[None, :], other=0.0)
        if UPCAST_DOT:
            k_KD = k_KD.to(tl.float32)
        s_QK = tl.dot(q_QD, tl.trans(k_KD), input_precision=DOT_PRECISION) * scale_log2
        if MASKED:
            visible_QK = row_ok_Q[:, None] & k_ok_K[None, :]
            if MASK_MODE == 1:
                visible_QK = visible_QK & (offs_K[None, :] <= (tree_start + qi_Q)[:, None])
            if MASK_MODE == 2:  # noqa: SIM102 (constexpr branch first, runtime test inside)
                if blk * BLOCK_N + BLOCK_N > tree_start:
                    rel_QK = offs_K[None, :] - tree_start + tl.zeros_like(qi_Q)[:, None]
                    in_tree_QK = rel_QK >= 0
                    word_ptrs = bits_ptr + qi_Q[:, None] * stride_bits_q + (rel_QK >> 6)
                    words_QK = tl.load(word_ptrs, mask=in_tree_QK & visible_QK, other=0)
                    bit_QK = ((words_QK >> (rel_QK & 63).to(tl.int64)) & 1) != 0
                    visible_QK = visible_QK & (~in_tree_QK | bit_QK)
            s_QK = tl.where(visible_QK, s_QK, float("-inf"))
        m_new_Q = tl.maximum(m_Q, tl.max(s_QK, axis=1))
        # A row that has seen no visible key yet keeps m = -inf; shift by 0 to avoid inf - inf.
        m_safe_Q = tl.where(m_new_Q == float("-inf"), 0.0, m_new_Q)
        alpha_Q = tl.exp2(m_Q - m_safe_Q)
        p_QK = tl.exp2(s_QK - m_safe_Q[:, None])
        l_Q = l_Q * alpha_Q + tl.sum(p_QK, axis=1)
        if MASKED:
            v_KD = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            v_KD = tl.load(v_ptrs)
        else:
            v_KD = tl.load(v_ptrs, mask=d_ok_D[None, :], other=0.0)
        p_lo_QK = p_QK.to(KV_DTYPE)  # rounded like the MMA operand on a GPU
        if UPCAST_DOT:
            v_KD = v_KD.to(tl.float32)
            p_lo_QK = p_lo_QK.to(tl.float32)
        acc_QD = acc_QD * alpha_Q[:, None] + tl.dot(p_lo_QK, v_KD, input_precision=DOT_PRECISION)
        m_Q = m_new_Q
    return m_Q, l_Q, acc_QD


@triton.jit
def _split_kv_kernel(
    q_ptr, k_ptr, v_ptr, kv_len_ptr, bits_ptr, out_p_ptr, lse_p_ptr,
    stride_qb, stride_qh, stride_qq,
    stride_kb, stride_kg, stride_ks,
    stride_vb, stride_vg, stride_vs,
    stride_bits_q,
    n_kv_heads, heads_per_group, q_len, head_dim, num_splits, scale_log2,
    MASK_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = pid_bg // n_kv_heads
    g = pid_bg % n_kv_heads

    rows_Q = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok_Q = rows_Q < heads_per_group * q_len
    head_Q = g * heads_per_group + rows_Q // q_len
    qi_Q = rows_Q % q_len
    offs_D = tl.arange(0, BLOCK_D)
    d_ok_D = offs_D < head_dim

    q_ptrs = q_ptr + b * stride_qb + head_Q[:, None] * stride_qh + qi_Q[:, None] * stride_qq
    q_QD = tl.load(q_ptrs + offs_D[None, :], mask=row_ok_Q[:, None] & d_ok_D[None, :], other=0.0)
    if UPCAST_DOT:
        q_QD = q_QD.to(tl.float32)

    kv_len = tl.load(kv_len_ptr + b)
    tree_start = kv_len - q_len
    kv_end = kv_len
    if MASK_MODE == 1:
        # Causal: no query of this block sees past its last query's position.
        kv_end = tl.minimum(kv_len, tree_start + tl.max(tl.where(row_ok_Q, qi_Q, 0), axis=0) + 1)
    n_blocks = tl.cdiv(kv_end, BLOCK_N)
    per_split = tl.cdiv(n_blocks, num_splits)
    blk_lo = pid_p * per_split
    blk_hi = tl.minimum(blk_lo + per_split, n_blocks)

    m_Q = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 domain
    l_Q = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m)
    acc_QD = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = k_ptr + b * stride_kb + g * stride_kg
    v_base = v_ptr + b * stride_vb + g * stride_vg
    # Blocks wholly before the tree / causal block hold valid keys that every row sees: they run
    # without masks (plain loads the compiler can pipeline); only the rest pay for masking.
    n_open = kv_len // BLOCK_N
    if MASK_MODE == 1:  # key j is visible to every row of the block iff j <= tree_start + min qi
        n_open = (tree_start + tl.min(tl.where(row_ok_Q, qi_Q, q_len), axis=0) + 1) // BLOCK_N
    if MASK_MODE == 2:
        n_open = tree_start // BLOCK_N
    open_hi = tl.minimum(blk_hi, n_open)
    m_Q, l_Q, acc_QD = _attend(
        q_QD, k_base, v_base, bits_ptr, m_Q, l_Q, acc_QD, blk_lo, open_hi, scale_log2,
        stride_ks, stride_vs, stride_bits_q, kv_len, tree_start, qi_Q, row_ok_Q, offs_D, d_ok_D,
        MASK_MODE, False, DOT_PRECISION, UPCAST_DOT, EVEN_D, BLOCK_N, v_ptr.dtype.element_ty,
    )  # fmt: skip
    masked_lo = tl.maximum(blk_lo, open_hi)
    m_Q, l_Q, acc_QD = _attend(
        q_QD, k_base, v_base, bits_ptr, m_Q, l_Q, acc_QD, masked_lo, blk_hi, scale_log2,
        stride_ks, stride_vs, stride_bits_q, kv_len, tree_start, qi_Q, row_ok_Q, offs_D, d_ok_D,
        MASK_MODE, True, DOT_PRECISION, UPCAST_DOT, EVEN_D, BLOCK_N, v_ptr.dtype.element_ty,
    )  # fmt: skip

    seen_Q = l_Q > 0.0
    out_QD = acc_QD / tl.where(seen_Q, l_Q, 1.0)[:, None]
    # Natural-log lse: (m + log2 l) is in log2 units.
    lse_Q = tl.where(
        seen_Q, (m_Q + tl.log2(tl.where(seen_Q, l_Q, 1.0))) * 0.6931471805599453, float("-inf")
    )
    # out_p is contiguous [B, H, Q, splits, D], lse_p [B, H, Q, splits].
    row_flat_Q = (b * n_kv_heads * heads_per_group + head_Q) * q_len + qi_Q
    o_ptrs = out_p_ptr + (row_flat_Q[:, None] * num_splits + pid_p) * head_dim + offs_D[None, :]
    tl.store(o_ptrs, out_QD, mask=row_ok_Q[:, None] & d_ok_D[None, :])
    tl.store(lse_p_ptr + row_flat_Q * num_splits + pid_p, lse_Q, mask=row_ok_Q)


@triton.jit
def _combine_kernel(
    out_p_ptr,
    lse_p_ptr,
    out_ptr,
    lse_ptr,
    num_splits,
    head_dim,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # flat (b, h, q) index; all four buffers are contiguous
    split = tl.arange(0, BLOCK_SPLITS)
    offs_D = tl.arange(0, BLOCK_D)
    split_ok = split < num_splits
    lse_split = tl.load(lse_p_ptr + row * num_splits + split, mask=split_ok, other=float("-inf"))
    m = tl.max(lse_split, axis=0)
    w_split = tl.exp(lse_split - m)  # every row sees its own key, so m is finite
    denom = tl.sum(w_split, axis=0)
    mask = split_ok[:, None] & (offs_D < head_dim)[None, :]
    o_ptrs = out_p_ptr + (row * num_splits + split[:, None]) * head_dim + offs_D[None, :]
    o_split = tl.load(o_ptrs, mask=mask, other=0.0)  # [splits, D]
    out_D = tl.sum(w_split[:, None] * o_split, axis=0) / denom
    tl.store(
        out_ptr + row * head_dim + offs_D,
        out_D.to(out_ptr.dtype.element_ty),
        mask=offs_D < head_dim,
    )
    tl.store(lse_ptr + row, m + tl.log(denom))


def default_num_splits(n_programs: int, n_kv_blocks: int, device: torch.device) -> int:
    """As many kv splits as fill the GPU's multiprocessors once (one wave); 1 for a busy grid.

    One wave read the cache faster than two on an H100 and an H200, and no other launch variant
    beat these defaults: the READMEs of eval/results/h100-2026-11-26-9b3b7ad/ and
    h200-2026-11-26-f4bcf67/.
    """
    n_sm = (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 4
    )
    return max(1, min(n_kv_blocks, n_sm // n_programs))


def _launch(
    q_BHQD: torch.Tensor,
    k_BGSD: torch.Tensor,
    v_BGSD: torch.Tensor,
    kv_len_B: torch.Tensor,
    bits_QW: torch.Tensor | None,
    mask_mode: int,
    scale: float,
    tiles: Tiles,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, q_len, d = q_BHQD.shape
    _, g, s_max, _ = k_BGSD.shape
    assert q_BHQD.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", (
        "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)"
    )
    assert q_BHQD.dtype in (torch.float16, torch.bfloat16, torch.float32), q_BHQD.dtype
    assert k_BGSD.shape == v_BGSD.shape == (b, g, s_max, d), (k_BGSD.shape, v_BGSD.shape)
    assert h % g == 0, f"H={h} must be a multiple of G={g}"
    assert q_BHQD.stride(-1) == k_BGSD.stride(-1) == v_BGSD.stride(-1) == 1, (
        "head dim must be contiguous"
    )
    assert d <= 256, f"head dim {d} > 256 is not supported"
    assert kv_len_B.shape == (b,) and kv_len_B.dtype == torch.int32, (
        kv_len_B.shape,
        kv_len_B.dtype,
    )
    assert mask_mode in (MASK_NONE, MASK_CAUSAL, MASK_TREE), mask_mode
    if mask_mode == MASK_TREE:
        assert bits_QW is not None and bits_QW.dtype == torch.int64, "tree mode needs int64 bits"
        assert bits_QW.shape == (q_len, (q_len + 63) // 64) and bits_QW.is_contiguous(), (
            bits_QW.shape
        )
    bits = bits_QW if bits_QW is not None else kv_len_B  # any pointer; never read without a tree
    rows = (h // g) * q_len
    block_m = tiles.block_m or max(
        16, min(128 if rows >= 1024 else 64, triton.next_power_of_2(rows))
    )
    block_n = tiles.block_n
    block_d = max(16, triton.next_power_of_2(d))
    n_m = triton.cdiv(rows, block_m)
    num_splits = tiles.num_splits or default_num_splits(
        n_m * b * g, triton.cdiv(s_max, block_n), q_BHQD.device
    )
    dev = q_BHQD.device
    out_p = torch.empty(b, h, q_len, num_splits, d, device=dev, dtype=torch.float32)
    lse_p = torch.empty(b, h, q_len, num_splits, device=dev, dtype=torch.float32)
    out_BHQD = torch.empty(b, h, q_len, d, device=dev, dtype=q_BHQD.dtype)
    lse_BHQ = torch.empty(b, h, q_len, device=dev, dtype=torch.float32)
    # The interpreter multiplies the raw bits of bfloat16 dot operands (triton-lang/triton#11584,
    # "not supported yet"), so under it bf16 tiles are widened to float32 after loading.
    upcast = os.environ.get("TRITON_INTERPRET") == "1" and q_BHQD.dtype == torch.bfloat16
    precision = "ieee" if q_BHQD.dtype == torch.float32 or upcast else "tf32"
    launch_opts = {"num_warps": tiles.num_warps or (8 if block_m >= 128 else 4)}
    if tiles.num_stages:
        launch_opts["num_stages"] = tiles.num_stages
    _split_kv_kernel[(n_m, num_splits, b * g)](
        q_BHQD, k_BGSD, v_BGSD, kv_len_B, bits, out_p, lse_p,
        q_BHQD.stride(0), q_BHQD.stride(1), q_BHQD.stride(2),
        k_BGSD.stride(0), k_BGSD.stride(1), k_BGSD.stride(2),
        v_BGSD.stride(0), v_BGSD.stride(1), v_BGSD.stride(2),
        bits.stride(0),
        g, h // g, q_len, d, num_splits, scale * math.log2(math.e),
        MASK_MODE=mask_mode, DOT_PRECISION=precision, UPCAST_DOT=upcast,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=block_d == d, **launch_opts,
    )  # fmt: skip
    _combine_kernel[(b * h * q_len,)](
        out_p,
        lse_p,
        out_BHQD,
        lse_BHQ,
        num_splits,
        d,
        BLOCK_SPLITS=max(2, triton.next_power_of_2(num_splits)),
        BLOCK_D=block_d,
    )
    return out_BHQD, lse_BHQ


def attention_triton(
    q_BHQD: torch.Tensor,
    k_BGSD: torch.Tensor,
    v_BGSD: torch.Tensor,
    *,
    scale: float,
    kv_len_B: torch.Tensor | None = None,
    causal: bool = False,
    tree_bits_QW: torch.Tensor | None = None,
    tiles: Tiles = Tiles(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV attention of Q new tokens over a key buffer; returns (out_BHQD, lse_BHQ float32).

    `k_BGSD`/`v_BGSD` may be a preallocated cache: row b's valid keys are the first kv_len_B[b]
    (int32 [B], on q's device; default S for every row), of which the last Q are the new tokens.
    `tree_bits_QW` (from `masks.tree_bitmask_QW`) masks the last Q x Q block; `causal=True` is the
    lower-triangular block; neither means every query sees every valid key. Nothing is mutated.
    `tiles` sets the launch parameters (kv splits default to one wave of the GPU,
    `default_num_splits`); every choice computes the same result up to float rounding.
    """
    if causal and tree_bits_QW is not None:
        raise ValueError("give either causal=True or tree bits, not both")
    if kv_len_B is None:
        kv_len_B = torch.full(
            (q_BHQD.shape[0],), k_BGSD.shape[2], dtype=torch.int32, device=q_BHQD.device
        )
    mode = MASK_TREE if tree_bits_QW is not None else MASK_CAUSAL if causal else MASK_NONE
    return _launch(
        q_BHQD, k_BGSD, v_BGSD, kv_len_B.to(torch.int32), tree_bits_QW, mode, scale, tiles
    )
