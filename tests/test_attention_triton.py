"""The split-KV Triton kernel against the float64 reference, at tiny shapes.

Shape legend: B batch, H query heads, G kv heads, Q queries, K keys, S buffer slots, D head dim.

Without CUDA the kernels run under Triton's interpreter, in a fresh pytest process
(`tests/triton_interpreter.py` says why).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.triton_interpreter import DEVICE, RUN_HERE, rerun_under_interpreter

if not RUN_HERE:

    def test_triton_kernel_under_the_interpreter():
        rerun_under_interpreter(__file__)

else:
    pytest.importorskip("triton")
    from attention.api import attention
    from attention.masks import full_mask_QK, tree_bitmask_QW
    from attention.triton_kernel import Tiles, attention_triton
    from tests.test_attention import (
        assert_matches_reference,
        block_of,
        random_qkv,
        random_tree_mask,
        seed_of,
        structure,
    )

    SHAPES = [  # B, H, G, Q, K, D
        (2, 4, 2, 7, 37, 16),  # GQA, odd lengths
        (1, 2, 1, 1, 70, 8),  # one query, head dim below the MMA minimum (padded to 16)
        (1, 2, 2, 70, 150, 16),  # Q > 64: two words of mask bits per query
        (1, 2, 1, 33, 33, 16),  # prefill: no cached prefix, Q == K
    ]

    @pytest.mark.parametrize("kind", ["none", "causal", "tree"])
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}G{}Q{}K{}D{}".format(*s))
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    def test_triton_matches_reference(kind, shape, dtype):
        b, h, g, q_len, kv_len, d = shape
        gen = torch.Generator().manual_seed(seed_of(kind, shape))
        q, k, v = random_qkv(b, h, g, q_len, kv_len, d, dtype, gen)
        kwargs = structure(kind, q_len, gen)
        on_device = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        out, lse = attention(
            q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), backend="triton", return_lse=True, **on_device
        )
        mask = full_mask_QK(q_len, kv_len, block_QQ=block_of(q_len, kwargs))
        assert out.dtype == dtype and lse.dtype == torch.float32
        assert_matches_reference(
            out.cpu(), lse.cpu(), q, k, v, mask, 1 / math.sqrt(d), f"triton {kind} {dtype}"
        )

    @pytest.mark.parametrize("num_splits", [1, 2, 5, 9])
    @pytest.mark.parametrize("kind", ["causal", "tree"])
    def test_split_counts_and_empty_splits_combine_exactly(num_splits, kind):
        # K=37 in blocks of 16 is 3 blocks: 5 and 9 splits leave splits with no key at all, and
        # the tree (Q=7) straddles a block boundary, so some splits see part of a row's keys.
        gen = torch.Generator().manual_seed(num_splits)
        q, k, v = random_qkv(1, 4, 2, 7, 37, 16, torch.float32, gen)
        block = block_of(7, structure(kind, 7, gen))
        out, lse = attention_triton(
            q.to(DEVICE),
            k.to(DEVICE),
            v.to(DEVICE),
            scale=0.25,
            causal=kind == "causal",
            tree_bits_QW=None if kind == "causal" else tree_bitmask_QW(block).to(DEVICE),
            tiles=Tiles(num_splits=num_splits, block_n=16, block_m=16),
        )
        mask = full_mask_QK(7, 37, block_QQ=block)
        assert_matches_reference(out.cpu(), lse.cpu(), q, k, v, mask, 0.25, f"{num_splits} splits")

    @pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["MHA", "GQA"])
    def test_causal_row_blocks_skip_masks_only_where_every_row_sees_the_block(heads):
        # Q = K = 50 in 16 x 16 tiles: later row blocks run their first key blocks unmasked
        # (keys at or before the block's first query), the rest masked; with GQA a row block
        # mixes heads, so its first query index is not pid_m * 16.
        gen = torch.Generator().manual_seed(50)
        q, k, v = random_qkv(1, *heads, 50, 50, 16, torch.float32, gen)
        for splits in (1, 3):
            out, lse = attention_triton(
                q.to(DEVICE),
                k.to(DEVICE),
                v.to(DEVICE),
                scale=0.25,
                causal=True,
                tiles=Tiles(num_splits=splits, block_m=16, block_n=16),
            )
            mask = full_mask_QK(50, 50, block_QQ=torch.ones(50, 50, dtype=torch.bool).tril())
            assert_matches_reference(out.cpu(), lse.cpu(), q, k, v, mask, 0.25, f"{splits} splits")

    @pytest.mark.parametrize("d", [64, 128])
    def test_real_head_dims(d):
        gen = torch.Generator().manual_seed(d)
        q, k, v = random_qkv(1, 2, 1, 5, 40, d, torch.bfloat16, gen)
        tree = random_tree_mask(5, gen)
        out, lse = attention(
            q.to(DEVICE),
            k.to(DEVICE),
            v.to(DEVICE),
            backend="triton",
            return_lse=True,
            tree_mask_QQ=tree.to(DEVICE),
        )
        mask = full_mask_QK(5, 40, block_QQ=tree)
        assert_matches_reference(out.cpu(), lse.cpu(), q, k, v, mask, d**-0.5, f"D={d}")

    def test_padded_cache_reads_only_the_valid_prefix_of_each_row():
        gen = torch.Generator().manual_seed(3)
        q, k, v = random_qkv(2, 4, 2, 6, 64, 16, torch.float32, gen)
        kv_len = torch.tensor([41, 9])
        for i, n in enumerate(kv_len.tolist()):
            k[i, :, n:] = 1e4  # would dominate the softmax if it were read
            v[i, :, n:] = 1e4
        tree = random_tree_mask(6, gen)
        out, lse = attention(
            q.to(DEVICE),
            k.to(DEVICE),
            v.to(DEVICE),
            backend="triton",
            return_lse=True,
            tree_mask_QQ=tree.to(DEVICE),
            kv_len=kv_len.to(DEVICE),
        )
        for i, n in enumerate(kv_len.tolist()):
            sl = slice(i, i + 1)
            mask = full_mask_QK(6, n, block_QQ=tree)
            assert_matches_reference(
                out[sl].cpu(),
                lse[sl].cpu(),
                q[sl],
                k[sl, :, :n],
                v[sl, :, :n],
                mask,
                0.25,
                f"row {i}, kv_len {n}",
            )

    def test_tree_and_causal_together_are_rejected():
        q = torch.randn(1, 1, 2, 16, device=DEVICE)
        bits = tree_bitmask_QW(torch.ones(2, 2, dtype=torch.bool)).to(DEVICE)
        with pytest.raises(ValueError, match="not both"):
            attention_triton(q, q, q, scale=1.0, causal=True, tree_bits_QW=bits)
