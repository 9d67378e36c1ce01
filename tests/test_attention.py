"""Attention backends against the float64 reference, and the pure mask builders.

Shape legend: B batch, H query heads, G kv heads, Q queries, K keys, S buffer slots, D head dim.

Tolerance (flash-attention's rule): the fast path's max error against the float64 reference is at
most twice the error of plain PyTorch math at the same dtype, plus a small absolute term.
`assert_matches_reference` and `random_tree_mask` are shared with the other attention tests.
"""

from __future__ import annotations

import math
import subprocess
import sys
import zlib

import pytest
import torch

from attention.api import attention
from attention.flex import flex_block_mask
from attention.masks import (
    ancestor_mask,
    causal_block,
    full_mask_QK,
    padded_mask_BQS,
    resolve_block_QQ,
    tree_bitmask_QW,
)
from attention.reference import attention_reference

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def random_tree_mask(n: int, generator: torch.Generator) -> torch.Tensor:
    """Ancestor-or-self mask of a random tree: node i's parent is uniform in [0, i)."""
    parents = [-1] + [int(torch.randint(0, i, (), generator=generator)) for i in range(1, n)]
    return ancestor_mask(torch.tensor(parents))


def seed_of(*parts: object) -> int:
    """A seed fixed across processes (`hash` of a str is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def structure(kind: str, q_len: int, generator: torch.Generator) -> dict:
    """Keyword arguments of `attention` for a mask kind: none, causal or tree."""
    if kind == "causal":
        return {"causal": True}
    if kind == "tree":
        return {"tree_mask_QQ": random_tree_mask(q_len, generator)}
    return {}


def block_of(q_len: int, kwargs: dict) -> torch.Tensor | None:
    """The bool [Q, Q] block that `attention` keyword arguments stand for."""
    causal = kwargs.get("causal", False)
    return resolve_block_QQ(q_len, causal=causal, block_QQ=kwargs.get("tree_mask_QQ"))


def random_qkv(b, h, g, q_len, kv_len, d, dtype, generator):
    def make(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    return make(b, h, q_len, d), make(b, g, kv_len, d), make(b, g, kv_len, d)


def assert_matches_reference(
    out: torch.Tensor,
    lse: torch.Tensor | None,
    q_BHQD: torch.Tensor,
    k_BGKD: torch.Tensor,
    v_BGKD: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    what: str,
) -> None:
    """flash-attention's rule for out (and lse): err(fast) <= 2 err(plain, same dtype) + atol."""
    # Inputs cast to float64, so that the reference output is not rounded back to q's dtype.
    ref_out, ref_lse = attention_reference(
        q_BHQD.double(), k_BGKD.double(), v_BGKD.double(), mask, scale
    )
    plain_out, plain_lse = attention_reference(q_BHQD, k_BGKD, v_BGKD, mask, scale, q_BHQD.dtype)
    atol = ATOL[q_BHQD.dtype]
    pairs = [("out", out, plain_out, ref_out)]
    if lse is not None:
        pairs.append(("lse", lse, plain_lse, ref_lse))
    for name, fast, plain, ref in pairs:
        assert fast.shape == ref.shape, f"{what} {name}: shape {fast.shape} != {ref.shape}"
        err = (fast.double() - ref.double()).abs()
        plain_err = (plain.double() - ref.double()).abs().max().item()
        bound = 2 * plain_err + atol
        assert err.max().item() <= bound, (
            f"{what} {name}: max err {err.max().item():.3g} mean {err.mean().item():.3g} > "
            f"2 x plain {plain_err:.3g} + {atol:g}"
        )


# ---- masks ----------------------------------------------------------------------------------


def test_ancestor_mask_of_a_chain_is_causal_and_of_a_star_is_root_plus_self():
    assert torch.equal(ancestor_mask(torch.tensor([-1, 0, 1, 2])), causal_block(4))
    star = ancestor_mask(torch.tensor([-1, 0, 0, 0]))
    assert torch.equal(star, torch.eye(4, dtype=torch.bool) | (torch.arange(4) == 0))


def test_ancestor_mask_rejects_a_parent_after_its_child():
    with pytest.raises(ValueError, match="parent must come before"):
        ancestor_mask(torch.tensor([-1, 2, 0]))


@pytest.mark.parametrize("q_len", [1, 7, 63, 64, 65, 128])
def test_tree_bitmask_round_trips(q_len):
    mask_QQ = random_tree_mask(q_len, torch.Generator().manual_seed(q_len))
    bits_QW = tree_bitmask_QW(mask_QQ)
    assert bits_QW.shape == (q_len, (q_len + 63) // 64) and bits_QW.dtype == torch.int64
    cols = torch.arange(q_len)
    unpacked = (bits_QW[:, cols // 64] >> (cols % 64)) & 1
    assert torch.equal(unpacked.bool(), mask_QQ)


@pytest.mark.parametrize("kind", ["none", "causal", "tree"])
def test_padded_mask_equals_full_mask_on_the_valid_prefix(kind):
    gen = torch.Generator().manual_seed(1)
    q_len, max_len = 5, 23
    block = block_of(q_len, structure(kind, q_len, gen))
    kv_len_B = torch.tensor([5, 11, 23])
    mask_BQS = padded_mask_BQS(q_len, max_len, kv_len_B, block_QQ=block)
    for b, n in enumerate(kv_len_B.tolist()):
        full = full_mask_QK(q_len, n, block_QQ=block)
        full = torch.ones(q_len, n, dtype=torch.bool) if full is None else full
        assert torch.equal(mask_BQS[b, :, :n], full)
        assert not mask_BQS[b, :, n:].any()


def test_block_mask_checks():
    with pytest.raises(ValueError, match="diagonal"):
        resolve_block_QQ(3, block_QQ=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        resolve_block_QQ(3, block_QQ=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="not both"):
        resolve_block_QQ(3, causal=True, block_QQ=causal_block(3))


# ---- flex block mask --------------------------------------------------------------------------


def block_classes(block_mask, n_qb: int, n_kb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) bool [B, query blocks, key blocks] from a BlockMask's index lists."""
    out = []
    for num, idx in (
        (block_mask.kv_num_blocks, block_mask.kv_indices),
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
    ):
        cls = torch.zeros(num.shape[0], n_qb, n_kb, dtype=torch.bool)
        for b in range(num.shape[0]):
            for m in range(n_qb):
                cls[b, m, idx[b, 0, m, : num[b, 0, m]].long()] = True
        out.append(cls)
    return out[0], out[1]


@pytest.mark.parametrize("kind", ["none", "causal", "tree"])
@pytest.mark.parametrize("q_len", [1, 7, 20])
def test_flex_block_mask_covers_every_visible_pair_and_full_blocks_are_fully_visible(kind, q_len):
    # Eager flex_attention ignores the block mask, so its correctness is checked here directly.
    gen = torch.Generator().manual_seed(q_len)
    bs, max_len = 8, 45
    kwargs = structure(kind, q_len, gen)
    kv_len_B = torch.tensor([q_len, 24, 45, 17])
    block = block_of(q_len, kwargs)
    bm = flex_block_mask(
        q_len,
        max_len,
        kv_len_B,
        causal=kind == "causal",
        block_QQ=block if kind == "tree" else None,
        block_size=bs,
    )
    mask_BQS = padded_mask_BQS(q_len, max_len, kv_len_B, block_QQ=block)
    n_qb, n_kb = -(-q_len // bs), -(-max_len // bs)
    padded = torch.zeros(4, n_qb * bs, n_kb * bs, dtype=torch.bool)
    padded[:, :q_len, :max_len] = mask_BQS
    blocks = padded.view(4, n_qb, bs, n_kb, bs)
    any_visible = blocks.any(4).any(2)
    partial, full = block_classes(bm, n_qb, n_kb)
    assert not (partial & full).any(), "a block is both partial and full"
    assert not (any_visible & ~(partial | full)).any(), "a visible pair lies in a skipped block"
    # Full blocks skip the mask_mod: all of their (query, key) pairs must be visible; the padded
    # query rows of the last query block are exempt.
    rows_ok = torch.zeros(n_qb * bs, dtype=torch.bool)
    rows_ok[:q_len] = True
    real = padded | ~rows_ok.view(1, -1, 1)
    assert not (full & ~real.view(4, n_qb, bs, n_kb, bs).all(4).all(2)).any()


# ---- backends -------------------------------------------------------------------------------

SHAPES = [  # B, H, G, Q, K, D
    (2, 4, 2, 7, 37, 16),  # GQA, odd lengths
    (1, 4, 4, 1, 130, 8),  # one query (plain decoding), K past a 128 block
    (1, 8, 2, 64, 200, 16),  # a 64-node tree, 4 query heads per kv head
    (1, 2, 1, 33, 33, 16),  # prefill: no cached prefix, Q == K
]


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["none", "causal", "tree"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}G{}Q{}K{}D{}".format(*s))
def test_backend_matches_reference(backend, dtype, kind, shape):
    b, h, g, q_len, kv_len, d = shape
    gen = torch.Generator().manual_seed(seed_of(kind, shape))
    q, k, v = random_qkv(b, h, g, q_len, kv_len, d, dtype, gen)
    kwargs = structure(kind, q_len, gen)
    out, lse = attention(q, k, v, backend=backend, return_lse=True, **kwargs)
    mask = full_mask_QK(q_len, kv_len, block_QQ=block_of(q_len, kwargs))
    # SDPA exposes no lse; the api computes it from same-dtype math, so only flex's is checked.
    assert_matches_reference(
        out,
        lse if backend == "flex" else None,
        q,
        k,
        v,
        mask,
        1 / math.sqrt(d),
        f"{backend} {kind}",
    )
    assert out.dtype == dtype and lse.dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex"])
@pytest.mark.parametrize("kind", ["none", "causal", "tree"])
def test_padded_buffer_with_kv_len_equals_the_valid_prefix(backend, kind):
    """Static shapes: a buffer of S slots, valid to kv_len[b], garbage (finite, large) after."""
    gen = torch.Generator().manual_seed(7)
    b, h, g, q_len, max_len, d = 2, 4, 2, 5, 40, 16
    q, k, v = random_qkv(b, h, g, q_len, max_len, d, torch.float32, gen)
    kv_len = torch.tensor([29, 12])
    for i, n in enumerate(kv_len.tolist()):
        k[i, :, n:] = 1e4  # would dominate the softmax if it were attended
        v[i, :, n:] = 1e4
    kwargs = structure(kind, q_len, gen)
    out, lse = attention(q, k, v, backend=backend, return_lse=True, kv_len=kv_len, **kwargs)
    for i, n in enumerate(kv_len.tolist()):
        sl = slice(i, i + 1)
        want_out, want_lse = attention(
            q[sl], k[sl, :, :n], v[sl, :, :n], backend="reference", return_lse=True, **kwargs
        )
        torch.testing.assert_close(out[sl], want_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[sl], want_lse, atol=1e-5, rtol=1e-5)


def test_api_rejects_unknown_backend_and_bad_kv_len():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, q, q, backend="nope")
    with pytest.raises(ValueError, match="exceeds"):
        attention(q, q, q, backend="sdpa", kv_len=torch.tensor(4))
    with pytest.raises(ValueError, match="int tensor"):
        attention(q, q, q, backend="sdpa", kv_len=torch.tensor(3.0))


def test_package_imports_without_importing_triton():
    code = (
        "import sys; import attention.api, attention.kv_cache, attention.masks; "
        "assert 'triton' not in sys.modules, 'attention imported triton'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["causal", "tree"])
def test_compiled_flex_matches_reference_and_does_not_recompile_as_the_cache_grows(kind):
    # Compiled flex (unlike eager) skips blocks by the block mask, so this checks the block mask
    # end to end. ~15 s of compile on a CPU; there it cannot return lse (torch 2.13).
    from torch._dynamo.utils import counters

    from attention.flex import attention_flex

    gen = torch.Generator().manual_seed(11)
    q_len, max_len = 7, 300
    q, k, v = random_qkv(1, 4, 2, q_len, max_len, 16, torch.float32, gen)
    kwargs = structure(kind, q_len, gen)
    graphs = []
    for n in (40, 150, 290):
        out, _ = attention_flex(
            q,
            k,
            v,
            scale=0.25,
            kv_len_B=torch.tensor([n], dtype=torch.int32),
            causal=kind == "causal",
            tree_mask_QQ=kwargs.get("tree_mask_QQ"),
            compiled=True,
            return_lse=False,
        )
        graphs.append(counters["stats"]["unique_graphs"])
        mask = full_mask_QK(q_len, n, block_QQ=block_of(q_len, kwargs))
        assert_matches_reference(out, None, q, k[:, :, :n], v[:, :, :n], mask, 0.25, f"kv {n}")
    assert graphs[0] == graphs[-1], f"recompiled as the cache grew: graph counts {graphs}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_bench_exits_with_a_clear_message_without_cuda(capsys):
    from eval import bench_attention

    assert bench_attention.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
