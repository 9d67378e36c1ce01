"""The static (CUDA-graph-capturable) verification step: device-side bookkeeping, same tokens.

On a CPU the step runs eagerly (the code a graph would replay); the `gpu` tests capture it.
"""

from __future__ import annotations

import math

import pytest
import torch

from attention.api import attention, attention_static, prepare_static
from attention.kv_cache import StaticKVCache
from medusa_engine.engine import build_engine
from medusa_engine.heads_io import load_heads
from medusa_engine.hf_adapter import HFModel
from medusa_engine.model import DecodeState
from medusa_engine.models import ASSETS
from medusa_engine.static_step import StaticStep
from medusa_engine.tree import tree_from_name
from tests.conftest import PROMPTS
from tests.test_attention import random_tree_mask

HEADS = ASSETS / "heads" / "stories260k"


@pytest.fixture(scope="module")
def model_sdpa() -> HFModel:
    return HFModel.load("stories260k", dtype="fp32", attention="sdpa")


@pytest.mark.parametrize("tree", ["cpu_16", "mc_sim_7b_63", "plain"])
def test_static_steps_equal_plain_greedy_and_the_eager_steps(model_sdpa, tree):
    heads = load_heads(HEADS)
    for prompt in PROMPTS[:3]:
        ids = model_sdpa.tokenizer(prompt)["input_ids"]
        plain = build_engine(model_sdpa, None, "plain").generate(ids, 64)
        eager = build_engine(model_sdpa, heads, tree).generate(ids, 64)
        static = build_engine(model_sdpa, heads, tree, static=True).generate(ids, 64)
        assert static.token_ids == plain.token_ids
        # Same acceptance step by step: the device-side compaction kept the right cache rows.
        assert static.accepted_lengths == eager.accepted_lengths
    if tree != "plain":
        assert static.mean_accepted > 1.3  # trained heads: the tree is really used


def test_static_generator_reuses_a_session_across_requests(model_sdpa):
    heads = load_heads(HEADS)
    engine = build_engine(model_sdpa, heads, "cpu_16", static=True)
    session = model_sdpa.new_session(512)
    ids = model_sdpa.tokenizer(PROMPTS[0])["input_ids"]
    first = engine.generate(ids, 40, session=session).token_ids
    follow = ids + first + model_sdpa.tokenizer(" The end.")["input_ids"]
    second = engine.generate(follow, 40, session=session).token_ids
    fresh = build_engine(model_sdpa, None, "plain").generate(follow, 40).token_ids
    assert second == fresh
    assert len(session) == len(follow) + len(second) - 1


def test_static_step_commits_what_it_emits(model_sdpa):
    heads = load_heads(HEADS)
    engine = build_engine(model_sdpa, heads, "cpu_16")
    session = model_sdpa.new_session(256)
    ids = model_sdpa.tokenizer(PROMPTS[1])["input_ids"]
    state = engine.prefill(ids, session)
    step = StaticStep(model_sdpa, engine.drafter, engine.tree, session)
    after, emitted = step.run(state)
    assert 1 <= len(emitted) <= engine.tree.max_depth + 1
    assert session.static.length == len(ids) + len(emitted) == len(session)
    assert session.token_ids == [*ids, state.root, *emitted[:-1]]
    assert after.root == emitted[-1]
    assert int(step.length_t) == len(ids) + len(emitted)
    assert int(step.root_t) == emitted[-1]


def test_static_mode_rejects_what_it_cannot_capture(stories260k, model_sdpa):
    heads = load_heads(HEADS)
    with pytest.raises(ValueError, match="static cache"):  # attention="hf": no static cache
        build_engine(stories260k, heads, "cpu_16", static=True).generate([1, 2, 3], 4)
    with pytest.raises(ValueError, match="lookup"):
        build_engine(model_sdpa, heads, "cpu_16", static=True, lookup=3)
    session = model_sdpa.new_session(64)
    with pytest.raises(ValueError, match="drafter"):
        StaticStep(model_sdpa, None, tree_from_name("cpu_16", 4), session)
    step = StaticStep(model_sdpa, None, tree_from_name("plain", 0), session)
    state = DecodeState(torch.zeros(model_sdpa.hidden_size), 1)
    full = session.static.max_length
    session.commit(0, [1] * full)  # every slot taken
    with pytest.raises(ValueError, match="slots"):
        step.run(state)
    session.truncate(0)
    model_sdpa.reserve(session, 4 * full)  # the cache grows
    with pytest.raises(ValueError, match="reallocated"):
        step.run(state)


def test_cache_write_and_move_equal_append_and_compact():
    gen = torch.Generator().manual_seed(0)
    a = StaticKVCache.allocate(num_layers=2, batch=1, kv_heads=2, head_dim=4, max_length=32)
    b = StaticKVCache.allocate(num_layers=2, batch=1, kv_heads=2, head_dim=4, max_length=32)
    for q_len in (5, 7):
        start = a.length
        for layer in range(2):
            k, v = torch.randn(2, 1, 2, q_len, 4, generator=gen)
            a.append(layer, k, v)
            kb, vb = b.write(layer, torch.arange(start, start + q_len), k, v)
            assert kb.shape[2] == 32 and vb.shape[2] == 32  # whole buffers
        keep = torch.tensor([0, 2, 3])
        a.compact(start, keep)
        b.move(start + keep, start + torch.arange(3))
        b.set_length(start + 3)
        assert b.length == a.length
        for layer in range(2):
            torch.testing.assert_close(b.valid(layer), a.valid(layer), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex"])
@pytest.mark.parametrize("tree", [True, False])
def test_prepared_static_mask_equals_the_checked_entry(backend, tree):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 9, 16, generator=gen)
    k, v = torch.randn(2, 1, 2, 40, 16, generator=gen)
    block = random_tree_mask(9, gen) if tree else None
    kv_len = torch.tensor([31], dtype=torch.int32)
    mask = prepare_static(backend, 9, 40, kv_len, tree_mask_QQ=block)
    out = attention_static(q, k, v, mask)
    expected = attention(q, k, v, backend="reference", tree_mask_QQ=block, kv_len=kv_len)
    assert isinstance(expected, torch.Tensor)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prepared"):
        attention_static(q[:, :, :8], k, v, mask)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_graph_captured_steps_equal_plain_greedy_on_cuda(backend):
    model = HFModel.load("stories260k", dtype="fp32", device="cuda", attention=backend)
    heads = load_heads(HEADS)
    engine = build_engine(model, heads, "mc_sim_7b_63", static=True)
    plain = build_engine(model, None, "plain")
    for prompt in PROMPTS[:4]:
        ids = model.tokenizer(prompt)["input_ids"]
        expected = plain.generate(ids, 96).token_ids
        result = engine.generate(ids, 96)
        assert engine._static_step is not None and engine._static_step._graph is not None
        assert result.token_ids == expected, prompt
        assert result.mean_accepted > 1.3
    assert math.isfinite(result.tokens_per_s)
