"""The static KV cache: append, views, overflow, crop, and tree compaction.

Shape legend: B batch, G kv heads, H query heads, N tree nodes, n accepted nodes, S slots,
D head dim; LAYERS is the number of layers.
"""

from __future__ import annotations

import pytest
import torch

from attention.api import attention
from attention.kv_cache import CacheOverflowError, StaticKVCache
from tests.test_attention import random_tree_mask

LAYERS, B, G, D = 3, 2, 2, 8


def make_cache(slots: int = 15) -> StaticKVCache:
    return StaticKVCache.allocate(
        num_layers=LAYERS, batch=B, kv_heads=G, head_dim=D, max_length=slots
    )


def kv(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(B, G, n, D, generator=generator), torch.randn(
        B, G, n, D, generator=generator
    )


def fill(cache: StaticKVCache, per_layer: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for layer, (k, v) in enumerate(per_layer):
        cache.append(layer, k, v)


def test_allocate_sizes_the_buffers_and_starts_empty():
    cache = make_cache(slots=15)
    assert cache.max_length == 15
    assert cache.keys.shape == (LAYERS, B, G, 15, D) == cache.values.shape
    assert cache.length == 0 and cache.num_layers == LAYERS
    with pytest.raises(ValueError, match="every size must be >= 1"):
        make_cache(slots=0)


def test_append_returns_views_of_the_valid_prefix_with_new_tokens_last():
    gen = torch.Generator().manual_seed(0)
    cache = make_cache()
    first = [kv(5, gen) for _ in range(LAYERS)]
    second = [kv(3, gen) for _ in range(LAYERS)]
    fill(cache, first)
    for layer in range(LAYERS):
        k, v = cache.append(layer, *second[layer])
        assert torch.equal(k, torch.cat([first[layer][0], second[layer][0]], dim=2))
        assert torch.equal(v, torch.cat([first[layer][1], second[layer][1]], dim=2))
        assert k.data_ptr() == cache.keys[layer].data_ptr(), "append must return a view"
        # During a forward the layers already appended are ahead of the others.
        assert cache.layer_length(layer) == 8 and cache.length == 8
        assert layer == LAYERS - 1 or cache.layer_length(LAYERS - 1) == 5
    assert torch.equal(cache.valid(1)[0], cache.keys[1, :, :, :8])


def test_overflow_raises_a_clear_error_and_writes_nothing():
    gen = torch.Generator().manual_seed(1)
    cache = make_cache(slots=8)
    with pytest.raises(CacheOverflowError, match=r"overflow.*0 cached \+ 9 new tokens > 8"):
        cache.append(0, *kv(9, gen))
    assert cache.length == 0 and not cache.keys.any()
    fill(cache, [kv(6, gen) for _ in range(LAYERS)])
    with pytest.raises(CacheOverflowError, match="larger max_length"):
        cache.append(0, *kv(3, gen))
    assert cache.length == 6


def test_append_rejects_wrong_shapes():
    cache = make_cache()
    with pytest.raises(ValueError, match=r"\[B, G, T, D\]"):
        cache.append(0, torch.zeros(B, G + 1, 2, D), torch.zeros(B, G + 1, 2, D))


def test_crop_and_length_tensor():
    gen = torch.Generator().manual_seed(2)
    cache = make_cache()
    t = cache.length_tensor
    assert t.dtype == torch.int32 and t.shape == () and int(t) == 0
    fill(cache, [kv(7, gen) for _ in range(LAYERS)])
    assert int(cache.length_tensor) == 7 and cache.length_tensor.data_ptr() == t.data_ptr()
    cache.crop(4)
    assert cache.length == 4 and int(t) == 4 and cache.valid(2)[0].shape[2] == 4
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(5)


@pytest.mark.parametrize("keep", [[0], [0, 2, 5], [0, 1, 2, 3, 4, 5, 6], [0, 3, 6]])
def test_compaction_equals_appending_only_the_accepted_tokens(keep):
    gen = torch.Generator().manual_seed(len(keep))
    prompt = [kv(5, gen) for _ in range(LAYERS)]
    tree = [kv(7, gen) for _ in range(LAYERS)]
    keep_n = torch.tensor(keep)
    verified = make_cache(slots=18)
    fill(verified, prompt)
    fill(verified, tree)
    verified.compact(5, keep_n)
    sequential = make_cache(slots=18)
    fill(sequential, prompt)
    fill(sequential, [(k[:, :, keep_n], v[:, :, keep_n]) for k, v in tree])
    assert verified.length == sequential.length == 5 + len(keep)
    assert int(verified.length_tensor) == 5 + len(keep)
    for layer in range(LAYERS):
        for got, want in zip(verified.valid(layer), sequential.valid(layer), strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("keep", "match"),
    [([0, 0], "ascending"), ([2, 1], "ascending"), ([0, 7], "within the 7"), ([-1, 0], "within")],
)
def test_compact_rejects_invalid_keep_idx(keep, match):
    gen = torch.Generator().manual_seed(3)
    cache = make_cache(slots=18)
    fill(cache, [kv(5, gen) for _ in range(LAYERS)])
    fill(cache, [kv(7, gen) for _ in range(LAYERS)])
    with pytest.raises(ValueError, match=match):
        cache.compact(5, torch.tensor(keep))
    assert cache.length == 12


def test_compact_mid_forward_is_rejected():
    gen = torch.Generator().manual_seed(4)
    cache = make_cache()
    cache.append(0, *kv(3, gen))
    with pytest.raises(ValueError, match="between forwards"):
        cache.compact(0, torch.tensor([0]))


def test_tree_attention_then_compaction_equals_causal_attention_over_the_accepted_path():
    """One level up: what the tree computes for an accepted path is what sequential decoding
    of that path computes, and after compaction the cache is the one sequential decoding built."""
    gen = torch.Generator().manual_seed(5)
    h, prompt, n = 4, 6, 9
    tree_QQ = random_tree_mask(n, gen)
    leaf = n - 1
    path = tree_QQ[leaf].nonzero().flatten()  # ancestors of the last node and itself, ascending
    cache = StaticKVCache.allocate(
        num_layers=1, batch=1, kv_heads=G, head_dim=D, max_length=prompt + n
    )
    cache.append(
        0, torch.randn(1, G, prompt, D, generator=gen), torch.randn(1, G, prompt, D, generator=gen)
    )
    q_tree = torch.randn(1, h, n, D, generator=gen)
    k, v = cache.append(
        0, torch.randn(1, G, n, D, generator=gen), torch.randn(1, G, n, D, generator=gen)
    )
    out_tree = attention(q_tree, k, v, backend="reference", tree_mask_QQ=tree_QQ)
    cache.compact(prompt, path)
    k_seq, v_seq = cache.valid(0)
    out_seq = attention(q_tree[:, :, path], k_seq, v_seq, backend="reference", causal=True)
    torch.testing.assert_close(out_tree[:, :, path], out_seq, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex"])
def test_static_buffers_with_length_tensor_equal_the_valid_views(backend):
    gen = torch.Generator().manual_seed(6)
    cache = make_cache(slots=22)
    fill(cache, [kv(9, gen) for _ in range(LAYERS)])
    k_new, v_new = kv(5, gen)
    q = torch.randn(B, 2 * G, 5, D, generator=gen)
    tree = random_tree_mask(5, gen)
    k, v = cache.append(1, k_new, v_new)
    want = attention(q, k, v, backend=backend, tree_mask_QQ=tree)
    cache.append(0, k_new, v_new)  # layer 0 carries `length`, the value of length_tensor
    got = attention(
        q, *cache.buffers(1), backend=backend, tree_mask_QQ=tree, kv_len=cache.length_tensor
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
