"""One entry point for attention, with an explicit backend.

Shape legend: B batch, H query heads, G key/value heads (H % G == 0), Q queries, K keys (K >= Q),
S key slots of a preallocated buffer, D head dim, W = ceil(Q / 64) int64 words of mask bits.

`attention(q, k, v, backend=..., causal=..., tree_mask_QQ=...)` computes attention of Q new
tokens over K keys whose last Q are those new tokens (bottom-right alignment, see `masks`).
Backends:

* `reference`: float64 math, the specification (`reference.py`);
* `sdpa`: PyTorch's `scaled_dot_product_attention` with a boolean mask;
* `flex`: FlexAttention with a block mask computed from the structure (`flex.py`);
* `triton`: a split-KV (flash-decoding) kernel with the tree mask as bits (`triton_kernel.py`,
  imported on first use so that the package works without triton).

Static shapes: with `kv_len` (int tensor [] or [B], may live on the device), k and v are a
preallocated buffer of S >= K slots of which the first kv_len are valid; the new tokens are the
last Q valid keys and slots past kv_len are never attended (they must hold finite values).

Per call this entry validates the block (one host sync) and derives the backend's mask form. A
decode loop prepares them once per forward instead: `prepare_static` (no host sync, nothing
checked on the device) gives a `StaticMask` that every layer passes to `attention_static`, so a
step with a device-side cache length can be captured in a CUDA graph.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from attention.masks import full_mask_QK, padded_mask_BQS, resolve_block_QQ, tree_bitmask_QW
from attention.reference import attention_reference
from attention.sdpa import attention_sdpa

Backend = Literal["reference", "sdpa", "flex", "triton"]
BACKENDS: tuple[str, ...] = ("reference", "sdpa", "flex", "triton")


def _require_known(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        )


def check_backend(backend: str, device: torch.device) -> None:
    """Raise ValueError (one line, for users) if `backend` cannot run on `device` here."""
    _require_known(backend)
    if backend != "triton":
        return
    if importlib.util.find_spec("triton") is None:
        raise ValueError("the triton backend needs the triton package (pip install triton)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"the triton backend needs a CUDA device, not {device.type} (TRITON_INTERPRET=1 runs "
            "it under triton's interpreter on a CPU: for tests, very slow); on a CPU use sdpa"
        )


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
        raise ValueError(
            f"fewer keys ({kv_len}) than queries ({q_len}): new tokens are the last keys"
        )
    if not (q_BHQD.dtype == k_BGKD.dtype == v_BGKD.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q_BHQD.dtype}, {k_BGKD.dtype}, {v_BGKD.dtype}")


def _kv_len_B(kv_len: torch.Tensor, batch: int, max_len: int, device: torch.device) -> torch.Tensor:
    if kv_len.dtype.is_floating_point or kv_len.ndim > 1 or kv_len.numel() not in (1, batch):
        raise ValueError(
            f"kv_len must be an int tensor [] or [{batch}], got {kv_len.dtype} {kv_len.shape}"
        )
    if kv_len.device.type == "cpu" and bool((kv_len > max_len).any()):
        raise ValueError(f"kv_len {kv_len.tolist()} exceeds the {max_len} key slots of k and v")
    return kv_len.to(device=device, dtype=torch.int32).reshape(-1).expand(batch).contiguous()


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
    kv_len: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of Q new tokens over K keys; returns out_BHQD (and lse_BHQ in float32).

    `tree_mask_QQ` (bool, [i, j] = new token j is i or an ancestor of i) masks only the last Q x Q
    block; the cached prefix is visible to all queries. `causal=True` is the lower-triangular
    block. `scale` defaults to 1/sqrt(D). `kv_len` (int tensor [] or [B]) marks k and v as a
    buffer whose first kv_len keys are valid (see the module docstring); the lse of `sdpa`
    comes from same-dtype math, as SDPA does not expose it.
    """
    _check_shapes(q_BHQD, k_BGKD, v_BGKD)
    _require_known(backend)
    scale = 1.0 / math.sqrt(q_BHQD.shape[-1]) if scale is None else scale
    b, _, q_len, _ = q_BHQD.shape
    n_slots = k_BGKD.shape[2]
    block_QQ = resolve_block_QQ(q_len, causal=causal, block_QQ=tree_mask_QQ, device=q_BHQD.device)
    kv_len_B = None if kv_len is None else _kv_len_B(kv_len, b, n_slots, q_BHQD.device)
    if backend == "flex":
        from attention.flex import attention_flex

        out, lse_or_none = attention_flex(
            q_BHQD,
            k_BGKD,
            v_BGKD,
            scale=scale,
            kv_len_B=kv_len_B,
            causal=causal,
            tree_mask_QQ=None if causal else block_QQ,
            return_lse=return_lse,
        )
        if return_lse:
            assert lse_or_none is not None
            return out, lse_or_none
        return out
    if backend == "triton":
        from attention.triton_kernel import attention_triton

        bits_QW = None if causal or block_QQ is None else tree_bitmask_QW(block_QQ)
        out, lse = attention_triton(
            q_BHQD,
            k_BGKD,
            v_BGKD,
            scale=scale,
            kv_len_B=kv_len_B,
            causal=causal,
            tree_bits_QW=bits_QW,
        )
        return (out, lse) if return_lse else out
    mask: torch.Tensor | None
    if kv_len_B is None:
        mask = full_mask_QK(q_len, n_slots, block_QQ=block_QQ, device=q_BHQD.device)
    else:
        mask = padded_mask_BQS(q_len, n_slots, kv_len_B, block_QQ=block_QQ)[:, None]  # [B,1,Q,S]
    if backend == "reference":
        out, lse = attention_reference(q_BHQD, k_BGKD, v_BGKD, mask, scale)
        return (out, lse) if return_lse else out
    out = attention_sdpa(q_BHQD, k_BGKD, v_BGKD, mask, scale)
    if return_lse:
        # SDPA does not expose its log-sum-exp; tests get it from the same-dtype math.
        _, lse = attention_reference(q_BHQD, k_BGKD, v_BGKD, mask, scale, q_BHQD.dtype)
        return out, lse
    return out


@dataclass(frozen=True)
class StaticMask:
    """One forward's mask in the form its backend wants, over a buffer of `n_slots` key slots.

    Built by `prepare_static`; shared by every layer of the forward. `kv_len_B` (int32 [B], on
    the device) is the valid length after this forward's Q keys were written.
    """

    backend: str
    q_len: int
    n_slots: int
    kv_len_B: torch.Tensor
    mask_B1QS: torch.Tensor | None = None  # reference, sdpa
    bits_QW: torch.Tensor | None = None  # triton (None: no structure)
    block_mask: Any = None  # flex (a BlockMask)


def prepare_static(
    backend: str,
    q_len: int,
    n_slots: int,
    kv_len_B: torch.Tensor,
    *,
    tree_mask_QQ: torch.Tensor | None = None,
    tree_bits_QW: torch.Tensor | None = None,
) -> StaticMask:
    """The mask of Q new tokens over a preallocated buffer whose first kv_len_B keys are valid.

    `tree_mask_QQ` structures the last Q x Q block (None: every query sees every valid key, as in
    one-token decoding); a [B, Q, Q] mask gives each row its own (reference and sdpa only).
    `tree_bits_QW` may carry its packed bits, prepared once per tree, for `triton`. Tensor
    arithmetic only: no host sync and no value checks (the tree was checked when it was built),
    so a forward that calls this can be captured in a CUDA graph.
    """
    _require_known(backend)
    if kv_len_B.dtype != torch.int32 or kv_len_B.ndim != 1:
        raise ValueError(f"kv_len_B must be int32 [B], got {kv_len_B.dtype} {kv_len_B.shape}")
    per_row = tree_mask_QQ is not None and tree_mask_QQ.ndim == 3
    expected = (kv_len_B.shape[0], q_len, q_len) if per_row else (q_len, q_len)
    if tree_mask_QQ is not None and tree_mask_QQ.shape != expected:
        raise ValueError(f"tree mask must be {list(expected)}, got {list(tree_mask_QQ.shape)}")
    if per_row and backend in ("triton", "flex"):
        raise ValueError(f"per-row tree masks need the sdpa or reference backend, not {backend}")
    if backend == "triton":
        if tree_bits_QW is None and tree_mask_QQ is not None:
            tree_bits_QW = tree_bitmask_QW(tree_mask_QQ)
        return StaticMask(backend, q_len, n_slots, kv_len_B, bits_QW=tree_bits_QW)
    if backend == "flex":
        from attention.flex import flex_block_mask

        block = flex_block_mask(q_len, n_slots, kv_len_B, block_QQ=tree_mask_QQ)
        return StaticMask(backend, q_len, n_slots, kv_len_B, block_mask=block)
    mask = padded_mask_BQS(q_len, n_slots, kv_len_B, block_QQ=tree_mask_QQ)[:, None]
    return StaticMask(backend, q_len, n_slots, kv_len_B, mask_B1QS=mask)


def attention_static(
    q_BHQD: torch.Tensor,
    k_BGSD: torch.Tensor,
    v_BGSD: torch.Tensor,
    mask: StaticMask,
    scale: float | None = None,
) -> torch.Tensor:
    """out_BHQD of Q new tokens over whole key buffers [B, G, S, D], masked by `prepare_static`."""
    if q_BHQD.shape[2] != mask.q_len or k_BGSD.shape[2] != mask.n_slots:
        raise ValueError(
            f"mask prepared for Q={mask.q_len} over S={mask.n_slots} slots, got q "
            f"{tuple(q_BHQD.shape)} and k {tuple(k_BGSD.shape)}"
        )
    scale = 1.0 / math.sqrt(q_BHQD.shape[-1]) if scale is None else scale
    if mask.backend == "triton":
        from attention.triton_kernel import attention_triton

        return attention_triton(
            q_BHQD,
            k_BGSD,
            v_BGSD,
            scale=scale,
            kv_len_B=mask.kv_len_B,
            tree_bits_QW=mask.bits_QW,
        )[0]
    if mask.backend == "flex":
        from attention.flex import attention_flex

        return attention_flex(
            q_BHQD,
            k_BGSD,
            v_BGSD,
            scale=scale,
            kv_len_B=mask.kv_len_B,
            block_mask=mask.block_mask,
            return_lse=False,
        )[0]
    if mask.backend == "reference":
        return attention_reference(q_BHQD, k_BGSD, v_BGSD, mask.mask_B1QS, scale)[0]
    return attention_sdpa(q_BHQD, k_BGSD, v_BGSD, mask.mask_B1QS, scale)
