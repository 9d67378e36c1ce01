"""The decode loop is lossless under greedy: it equals `model.generate(do_sample=False)`."""

from __future__ import annotations

import pytest
import torch

from medusa_engine.engine import build_engine
from medusa_engine.tree import tree_from_name
from tests.helpers import OracleDrafter, random_heads

MAX_NEW = 128


@pytest.fixture(scope="module")
def references(stories260k, prompt_ids) -> list[list[int]]:
    refs = []
    for ids in prompt_ids:
        out = stories260k.model.generate(
            torch.tensor([ids]),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            pad_token_id=0,
        )
        refs.append(out[0, len(ids) :].tolist())
    assert sum(len(r) for r in refs) > 10 * MAX_NEW  # the references are long, not EOS at once
    return refs


def test_plain_decoding_matches_hf_generate(stories260k, prompt_ids, references):
    engine = build_engine(stories260k, None, "plain")
    for ids, ref in zip(prompt_ids, references):
        result = engine.generate(ids, MAX_NEW)
        assert result.token_ids == ref
        assert result.mean_accepted == 1.0


@pytest.mark.parametrize("tree", ["cpu_16", "mc_sim_7b_63"])
def test_random_heads_match_hf_generate(stories260k, prompt_ids, references, tree):
    engine = build_engine(stories260k, random_heads(stories260k), tree)
    for ids, ref in zip(prompt_ids, references):
        assert engine.generate(ids, MAX_NEW).token_ids == ref


@pytest.mark.parametrize("tree", ["cpu_16", "mc_sim_7b_63", "chain_4"])
def test_oracle_heads_accept_full_depth(stories260k, prompt_ids, references, tree):
    depth = tree_from_name(tree, 4).max_depth
    for ids, ref in zip(prompt_ids, references):
        drafter = OracleDrafter(ref, len(ids), 4, stories260k.vocab_size)
        result = build_engine(stories260k, drafter, tree).generate(ids, MAX_NEW)
        assert result.token_ids == ref
        # Every step but the last (cut by the token budget or EOS) keeps depth + 1 tokens.
        assert set(result.accepted_lengths[:-1]) == {depth + 1}, result.accepted_lengths


def test_oracle_on_a_side_branch_is_accepted(stories260k, prompt_ids, references):
    ids, ref = prompt_ids[0], references[0]
    drafter = OracleDrafter(ref, len(ids), 4, stories260k.vocab_size, truth_rank=1)
    result = build_engine(stories260k, drafter, "cpu_16").generate(ids, MAX_NEW)
    assert result.token_ids == ref
    assert result.mean_accepted > 2.0  # cpu_16 continues (1,) with (1,0) and (1,0,0)


def test_adversarial_heads_accept_nothing(stories260k, prompt_ids, references):
    for ids, ref in zip(prompt_ids, references):
        drafter = OracleDrafter(ref, len(ids), 4, stories260k.vocab_size, adversarial=True)
        result = build_engine(stories260k, drafter, "mc_sim_7b_63").generate(ids, MAX_NEW)
        assert result.token_ids == ref
        assert result.mean_accepted == 1.0


def test_stream_yields_the_same_tokens(stories260k, prompt_ids, references):
    engine = build_engine(stories260k, random_heads(stories260k, seed=3), "cpu_16")
    chunks = list(engine.stream(prompt_ids[1], MAX_NEW))
    assert [t for c in chunks for t in c] == references[1]
    assert len(chunks[0]) == 1  # the prefill's token comes first, on its own


def test_budget_eos_and_stop(stories260k, prompt_ids, references):
    engine = build_engine(stories260k, random_heads(stories260k), "cpu_16")
    ids, ref = prompt_ids[2], references[2]
    short = engine.generate(ids, 7)
    assert short.token_ids == ref[:7] and short.finish_reason == "length"
    eos = ref[10]
    cut = engine.generate(ids, MAX_NEW, eos_token_ids=[eos])
    assert cut.token_ids == ref[: ref.index(eos) + 1] and cut.finish_reason == "eos"
    stopped = engine.generate(ids, MAX_NEW, stop=lambda out: len(out) >= 5)
    assert stopped.token_ids[:5] == ref[:5] and stopped.finish_reason == "stop"
    assert len(stopped.token_ids) < MAX_NEW


def test_session_reuse_prefills_only_the_new_part(stories260k, prompt_ids):
    engine = build_engine(stories260k, random_heads(stories260k), "cpu_16")
    session = stories260k.new_session()
    first = engine.generate(prompt_ids[0], 20, session=session)
    assert session.token_ids == prompt_ids[0] + first.token_ids[:-1]
    follow = prompt_ids[0] + first.token_ids + prompt_ids[3][1:]
    again = engine.generate(follow, 30, session=session)
    fresh = engine.generate(follow, 30)
    assert again.token_ids == fresh.token_ids


def test_generation_stops_at_the_context_end(stories260k):
    engine = build_engine(stories260k, random_heads(stories260k), "cpu_16")
    prompt = [1] + [400] * (stories260k.max_context - 10)
    result = engine.generate(prompt, 100)
    assert result.finish_reason in ("context", "eos")
    assert len(prompt) + len(result.token_ids) <= stories260k.max_context + 1


def test_greedy_equivalence_on_a_second_family(tiny_qwen2):
    ids = [5, 17, 3, 44, 9]
    ref = tiny_qwen2.model.generate(
        torch.tensor([ids]),
        max_new_tokens=40,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, len(ids) :].tolist()
    engine = build_engine(tiny_qwen2, random_heads(tiny_qwen2), "mc_sim_7b_63")
    assert engine.generate(ids, 40, eos_token_ids=[]).token_ids == ref
    oracle = OracleDrafter(ref, len(ids), 4, tiny_qwen2.vocab_size)
    result = build_engine(tiny_qwen2, oracle, "chain_4").generate(ids, 40, eos_token_ids=[])
    assert result.token_ids == ref and result.mean_accepted > 4.0


@pytest.mark.parametrize(
    "backend, prompts, max_new",
    [("sdpa", 6, 64), ("reference", 3, 48), ("flex", 1, 12)],  # eager flex is slow on CPUs
)
def test_every_cpu_attention_backend_is_lossless(backend, prompts, max_new, prompt_ids, references):
    """Our attention (AttentionInterface) over the static cache gives the same greedy tokens."""
    from medusa_engine.hf_adapter import EngineCache, HFModel

    model = HFModel.load("stories260k", dtype="fp32", attention=backend)
    engine = build_engine(model, random_heads(model), "mc_sim_7b_63")
    for ids, ref in zip(prompt_ids[:prompts], references[:prompts]):
        session = model.new_session(capacity=8)  # too small on purpose: the cache must grow
        result = engine.generate(ids, max_new, session=session)
        assert result.token_ids == ref[:max_new]
        assert isinstance(session.cache, EngineCache)
        assert session.cache.static.length == len(session.token_ids)


TRITON_SCRIPT = """
import torch
from medusa_engine.engine import build_engine
from medusa_engine.hf_adapter import HFModel
from tests.helpers import random_heads
ids = [1, 403, 407, 261, 378]
plain = HFModel.load("stories260k", dtype="fp32")
ref = build_engine(plain, None, "plain").generate(ids, 8).token_ids
model = HFModel.load("stories260k", dtype="fp32", attention="triton")
got = build_engine(model, random_heads(model), "cpu_16").generate(ids, 8).token_ids
assert got == ref, (got, ref)
print("triton ok")
"""


@pytest.mark.slow
def test_triton_backend_is_lossless_under_the_interpreter():
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0 and "triton ok" in proc.stdout, proc.stderr[-2000:]


def test_lossless_sampling_keeps_the_models_distribution(stories260k, prompt_ids, references):
    """At T = 1 the engine's second token (the first one a verification step decides) follows
    p(t2 | prompt) = sum_t1 p(t1 | prompt) p(t2 | prompt, t1), computed exactly, while the
    oracle's drafts are kept on most steps."""
    from medusa_engine.config import SamplingConfig

    ids, ref, runs = prompt_ids[0], references[0], 1500
    with torch.inference_mode():
        p1_V = stories260k.model(torch.tensor([ids])).logits[0, -1].float().softmax(-1)
        batch = torch.tensor([[*ids, t] for t in range(stories260k.vocab_size)])
        p2_VV = stories260k.model(batch).logits[:, -1].float().softmax(-1)  # [t1, t2]
    exact_t2 = p1_V @ p2_VV
    sampling = SamplingConfig(temperature=1.0, acceptance="lossless", seed=0)
    drafter = OracleDrafter(ref, len(ids), 4, stories260k.vocab_size)
    engine = build_engine(stories260k, drafter, "cpu_16", sampling, lookup=0)
    pairs, kept = [], 0
    for _ in range(runs):
        result = engine.generate(ids, 2)
        pairs.append(result.token_ids[:2])
        kept += result.accepted_lengths[0] > 1  # t2 was a draft the step kept
    assert kept > runs // 3, kept
    t1_R, t2_R = torch.tensor(pairs).T
    t1_top = int(p1_V.argmax())
    for empirical, exact, n in [
        (torch.bincount(t2_R, minlength=stories260k.vocab_size) / runs, exact_t2, runs),
        (
            torch.bincount(t2_R[t1_R == t1_top], minlength=stories260k.vocab_size)
            / int((t1_R == t1_top).sum()),
            p2_VV[t1_top],
            int((t1_R == t1_top).sum()),
        ),
    ]:
        sigma = (exact * (1 - exact) / n).sqrt()
        assert n > 300 and ((empirical - exact).abs() <= 4.5 * sigma + 0.01).all(), (
            (empirical - exact).abs().max()
        )


@pytest.mark.parametrize("acceptance", ["lossless", "typical"])
def test_sampling_from_the_top_token_alone_is_greedy(
    stories260k, prompt_ids, references, acceptance
):
    """top_k = 1 leaves one token to sample: any temperature must give greedy's output."""
    from medusa_engine.config import SamplingConfig

    sampling = SamplingConfig(temperature=1.5, acceptance=acceptance, top_k=1, seed=0)
    engine = build_engine(stories260k, random_heads(stories260k), "cpu_16", sampling)
    for ids, ref in list(zip(prompt_ids, references))[:5]:
        assert engine.generate(ids, MAX_NEW).token_ids == ref
