"""Fast attention backends at real shapes on a GPU (skipped without CUDA).

Shape legend: B batch, H query heads (32), G kv heads (8), Q tree queries (64), S cache slots,
D head dim (128). Tolerance: flash-attention's rule, see `tests.test_attention`.
"""

from __future__ import annotations

import math

import pytest
import torch

from attention.api import attention
from attention.masks import full_mask_QK
from tests.test_attention import assert_matches_reference, random_tree_mask

pytestmark = pytest.mark.gpu

H, G, D = 32, 8, 128


def qkv(q_len: int, kv_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def make(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda").to(torch.bfloat16)

    return make(1, H, q_len, D), make(1, G, kv_len, D), make(1, G, kv_len, D)


@pytest.mark.parametrize("backend", ["triton", "flex", "sdpa"])
@pytest.mark.parametrize("q_len", [1, 64, 128])
def test_tree_verification_over_a_4k_cache(backend, q_len):
    q, k, v = qkv(q_len, 4096, seed=q_len)
    tree = random_tree_mask(q_len, torch.Generator().manual_seed(q_len))
    out, lse = attention(q, k, v, backend=backend, tree_mask_QQ=tree.cuda(), return_lse=True)
    mask = full_mask_QK(q_len, 4096, block_QQ=tree.cuda())
    lse_checked = None if backend == "sdpa" else lse  # sdpa's lse is same-dtype math
    assert_matches_reference(out, lse_checked, q, k, v, mask, 1 / math.sqrt(D), backend)


@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_causal_prefill_2k(backend):
    q, k, v = qkv(2048, 2048, seed=1)
    out, lse = attention(q, k, v, backend=backend, causal=True, return_lse=True)
    mask = full_mask_QK(2048, 2048, causal=True, device="cuda")
    assert_matches_reference(out, lse, q, k, v, mask, 1 / math.sqrt(D), f"{backend} prefill")


@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_static_cache_buffer_with_device_length(backend):
    q, k, v = qkv(64, 8192, seed=2)
    tree = random_tree_mask(64, torch.Generator().manual_seed(2)).cuda()
    for n in (300, 4096, 8000):
        kv_len = torch.tensor(n, device="cuda")
        out = attention(q, k, v, backend=backend, tree_mask_QQ=tree, kv_len=kv_len)
        mask = full_mask_QK(64, n, block_QQ=tree)
        assert isinstance(out, torch.Tensor)
        assert_matches_reference(
            out, None, q, k[:, :, :n], v[:, :, :n], mask, 1 / math.sqrt(D), f"{backend} kv {n}"
        )


def test_triton_kernel_replays_in_a_cuda_graph_as_the_length_changes():
    from attention.masks import tree_bitmask_QW
    from attention.triton_kernel import attention_triton

    q, k, v = qkv(64, 4096, seed=3)
    tree = random_tree_mask(64, torch.Generator().manual_seed(3)).cuda()
    bits = tree_bitmask_QW(tree)
    kv_len = torch.tensor([1000], dtype=torch.int32, device="cuda")

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return attention_triton(q, k, v, scale=D**-0.5, kv_len_B=kv_len, tree_bits_QW=bits)

    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = run()
    for n in (1000, 3000, 4096):
        kv_len.fill_(n)
        graph.replay()
        mask = full_mask_QK(64, n, block_QQ=tree)
        assert_matches_reference(
            out, None, q, k[:, :, :n], v[:, :, :n], mask, D**-0.5, f"graph replay kv {n}"
        )
