"""Acceptance rules on hand-built logits, typical acceptance -> greedy as T -> 0, and lossless
sampling against the exact distribution of a small Markov chain."""

from __future__ import annotations

import math

import pytest
import torch

from medusa_engine import acceptance
from medusa_engine.acceptance import (
    accept_greedy,
    accept_lossless,
    accept_typical,
    typical_threshold,
)
from medusa_engine.candidates import fill_tree, path_tokens
from medusa_engine.config import SamplingConfig
from medusa_engine.sampling import sampling_logp
from medusa_engine.tree import build_tree

V = 8


def logits_from_probs(*rows: list[float]) -> torch.Tensor:
    probs = torch.tensor(rows, dtype=torch.float64)
    return probs.clamp_min(1e-12).log().float()


def test_greedy_keeps_the_longest_matching_prefix():
    # Chain root -> a -> b; the base model's argmax at root is 3 and at node a is 5.
    tree = build_tree([(0,), (0, 0)], num_heads=2)
    logits_NV = torch.zeros(3, V)
    logits_NV[0, 3] = logits_NV[1, 5] = logits_NV[2, 7] = 1.0
    candidates = torch.tensor([[0, 3, 5]])
    assert accept_greedy(logits_NV, candidates, tree.paths_PL).tolist() == [0, 2, 7]
    candidates = torch.tensor([[0, 3, 6]])
    assert accept_greedy(logits_NV, candidates, tree.paths_PL).tolist() == [0, 1, 5]
    candidates = torch.tensor([[0, 4, 5]])  # a wrong first token stops even a matching second
    assert accept_greedy(logits_NV, candidates, tree.paths_PL).tolist() == [0, 0, 3]


def test_greedy_picks_the_matching_branch():
    tree = build_tree([(0,), (1,), (1, 0)], num_heads=2)  # nodes: root, (0,), (1,), (1, 0)
    logits_NV = torch.zeros(4, V)
    logits_NV[0, 6] = logits_NV[2, 2] = logits_NV[3, 1] = 1.0
    tokens_N = torch.tensor([0, 4, 6, 2])
    candidates = torch.cat([tokens_N, torch.tensor([-1])])[tree.paths_PL]
    best, accepted, nxt = accept_greedy(logits_NV, candidates, tree.paths_PL).tolist()
    assert tree.paths_PL[best, : accepted + 1].tolist() == [0, 2, 3] and nxt == 1


@pytest.mark.parametrize(
    "probs, candidate_p, accepted",
    [
        # uniform over 4 tokens: H = ln 4, threshold = min(0.09, 0.3 / 4 = 0.075)
        ([0.25, 0.25, 0.25, 0.25, 0, 0, 0, 0], 0.25, True),
        # peaked: H ~ 0.17, 0.3 exp(-H) ~ 0.25, so threshold = epsilon = 0.09
        ([0.97, 0.01, 0.01, 0.01, 0, 0, 0, 0], 0.97, True),
        ([0.97, 0.01, 0.01, 0.01, 0, 0, 0, 0], 0.01, False),
        # 0.08 is above 0.3 exp(-H) here (H ~ 1.96 -> 0.042) though below epsilon
        ([0.3, 0.08, 0.08, 0.08, 0.08, 0.08, 0.15, 0.15], 0.08, True),
    ],
)
def test_typical_threshold_rule(probs, candidate_p, accepted):
    sampling = SamplingConfig(temperature=1.0)
    tree = build_tree([(0,)], num_heads=1)
    logits_NV = logits_from_probs(probs, [1 / V] * V)
    p = torch.tensor(probs)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    threshold = min(0.09, 0.3 * math.exp(-entropy))
    assert typical_threshold(logits_NV, sampling)[0].item() == pytest.approx(threshold, rel=1e-4)
    token = int(torch.nonzero(p == candidate_p)[0])
    candidates = torch.tensor([[0, token]])
    decision = accept_typical(logits_NV, candidates, tree.paths_PL, sampling)
    assert decision[1].item() == int(accepted)
    assert (candidate_p > threshold) == accepted


def test_typical_prefers_the_likelier_of_equally_long_paths():
    tree = build_tree([(0,), (1,)], num_heads=1)
    logits_NV = logits_from_probs([0.1, 0.5, 0.4, 0, 0, 0, 0, 0], *[[1 / V] * V] * 2)
    candidates = torch.tensor([[0, 2], [0, 1]])  # both pass the threshold; token 1 is likelier
    best, accepted, _ = accept_typical(
        logits_NV, candidates, tree.paths_PL, SamplingConfig(temperature=1.0)
    ).tolist()
    assert (best, accepted) == (1, 1)


def test_typical_tends_to_greedy_as_temperature_goes_to_zero():
    gen = torch.Generator().manual_seed(0)
    tree = build_tree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)], num_heads=3)
    for trial in range(200):
        logits_NV = torch.randn(tree.num_nodes, 50, generator=gen) * 3
        heads_KV = torch.randn(3, 50, generator=gen)
        if trial % 2:  # make the heads agree with the base model's argmax somewhere
            heads_KV[0, logits_NV[0].argmax()] = 10.0
        root = logits_NV.new_tensor(0).long()
        candidates_PL = path_tokens(fill_tree(root, heads_KV, tree), tree)
        greedy = accept_greedy(logits_NV, candidates_PL, tree.paths_PL)
        cold = SamplingConfig(temperature=1e-4)
        typical = accept_typical(logits_NV, candidates_PL, tree.paths_PL, cold, gen)
        assert greedy[1:].tolist() == typical[1:].tolist()
        g_path = tree.paths_PL[greedy[0], : greedy[1] + 1]
        t_path = tree.paths_PL[typical[0], : typical[1] + 1]
        assert torch.equal(g_path, t_path)


# A Markov chain over 4 tokens stands in for the base model: p(next | node) = CHAIN[node's token].
CHAIN = torch.tensor(
    [[0.1, 0.4, 0.3, 0.2], [0.2, 0.1, 0.3, 0.4], [0.5, 0.2, 0.1, 0.2], [0.25, 0.25, 0.25, 0.25]]
)
# root 0 -> (0,): 1 -> (0,0): 3;  root -> (1,): 2;  root -> (2,): 1 again -> (2,0): 2. Node (2,)
# repeats its sibling's token, as a prompt-lookup branch can.
DUP_TREE = build_tree([(0,), (1,), (2,), (0, 0), (2, 0)], num_heads=2)
DUP_TOKENS_N = torch.tensor([0, 1, 2, 1, 3, 2])


LOSSLESS = SamplingConfig(temperature=1.0, acceptance="lossless")


def lossless_chunks(trials: int, sampling: SamplingConfig = LOSSLESS) -> list[tuple[int, ...]]:
    """The tokens one lossless step emits (kept candidates + next token), `trials` times."""
    gen = torch.Generator().manual_seed(0)
    logits_NV = CHAIN[DUP_TOKENS_N].log()
    candidates_PL = path_tokens(DUP_TOKENS_N, DUP_TREE)
    chunks = []
    for _ in range(trials):
        best, accepted, nxt = accept_lossless(
            logits_NV, candidates_PL, DUP_TREE.paths_PL, sampling, gen
        ).tolist()
        chunks.append((*candidates_PL[best, 1 : accepted + 1].tolist(), nxt))
    return chunks


def worst_deviation(chunks: list[tuple[int, ...]], sampling: SamplingConfig = LOSSLESS) -> float:
    """Largest |empirical - exact| over p(t1), p(t2 | t1 = 1, kept) and p(t3 | 1, 3, kept), p
    being the chain's rows after the sampling config's temperature / top-k / top-p."""
    target = sampling_logp(CHAIN.log(), sampling).exp()
    worst = 0.0
    for prefix in [(), (1,), (1, 3)]:
        rows = [
            c[len(prefix)] for c in chunks if c[: len(prefix)] == prefix and len(c) > len(prefix)
        ]
        assert len(rows) > 500, (prefix, len(rows))  # enough samples for the bound to mean much
        empirical = torch.bincount(torch.tensor(rows), minlength=4).float() / len(rows)
        exact = target[prefix[-1] if prefix else 0]
        worst = max(worst, (empirical - exact).abs().max().item())
    return worst


@pytest.mark.parametrize(
    "sampling",
    [
        LOSSLESS,
        SamplingConfig(temperature=0.7, acceptance="lossless", top_k=3),
        SamplingConfig(temperature=1.0, acceptance="lossless", top_p=0.6),
    ],
    ids=["T1", "T0.7-topk3", "T1-topp0.6"],
)
def test_lossless_sampling_has_the_base_models_distribution(sampling):
    # Each conditional has >= 2,000 samples here: sigma <= 0.011; the bound is ~3 sigma.
    assert worst_deviation(lossless_chunks(12_000, sampling), sampling) < 0.035


def test_sampling_filters_match_hf_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits_NV = torch.randn(6, 100, generator=torch.Generator().manual_seed(0)) * 3
    for t, k, p in [(0.7, 20, 0.9), (1.0, 0, 0.5), (1.3, 5, 1.0), (0.5, 0, 1.0)]:
        hf = TemperatureLogitsWarper(t)(None, logits_NV.clone())
        hf = TopKLogitsWarper(k)(None, hf) if k else hf
        hf = TopPLogitsWarper(p)(None, hf) if p < 1 else hf
        ours = sampling_logp(logits_NV, SamplingConfig(temperature=t, top_k=k, top_p=p))
        assert torch.equal(ours.isfinite(), hf.isfinite()), (t, k, p)
        assert torch.allclose(ours.exp(), hf.softmax(-1), atol=1e-6), (t, k, p)
        assert ours.isfinite().sum(-1).min() >= 1


def test_typical_acceptance_with_filtered_tokens_stays_finite():
    tree = build_tree([(0,), (1,), (0, 0)], num_heads=2)
    sampling = SamplingConfig(temperature=1.0, acceptance="typical", top_k=2)
    gen = torch.Generator().manual_seed(0)
    logits_NV = torch.randn(tree.num_nodes, 30, generator=gen)
    allowed_N = logits_NV.topk(2, dim=-1).indices
    for _ in range(50):
        candidates_PL = path_tokens(torch.randint(0, 30, (tree.num_nodes,), generator=gen), tree)
        best, accepted, nxt = accept_typical(
            logits_NV, candidates_PL, tree.paths_PL, sampling, gen
        ).tolist()
        last = int(tree.paths_PL[best, accepted])
        assert nxt in allowed_N[last].tolist()


def test_lossless_sampling_needs_the_first_of_equal_siblings(monkeypatch):
    # Taking the longest match among siblings with the same token biases what follows them:
    # after t1 = 1, p(t2 = 2) becomes 0.3 + 0.3 * 0.3 = 0.39 instead of 0.3 (node (2,0) adds its
    # chance whenever (0,)'s own sample is neither 2 nor 3), a deviation of 0.09.
    everyone = lambda token_N, parent_N: torch.ones_like(token_N, dtype=torch.bool)  # noqa: E731
    monkeypatch.setattr(acceptance, "first_of_siblings", everyone)
    assert worst_deviation(lossless_chunks(12_000)) > 0.06


def test_lossless_keeps_the_chain_its_samples_walk():
    chunks = lossless_chunks(2_000)
    kept = {c[:-1] for c in chunks}
    assert kept == {(), (1,), (2,), (1, 3)}  # (2,) of node (2,) never: its twin (0,) comes first


def test_lossless_tends_to_greedy_as_temperature_goes_to_zero():
    gen = torch.Generator().manual_seed(1)
    tree = build_tree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)], num_heads=3)
    cold = SamplingConfig(temperature=1e-4, acceptance="lossless")
    for trial in range(200):
        logits_NV = torch.randn(tree.num_nodes, 50, generator=gen) * 3
        heads_KV = torch.randn(3, 50, generator=gen)
        if trial % 2:
            heads_KV[0, logits_NV[0].argmax()] = 10.0
        candidates_PL = path_tokens(fill_tree(logits_NV.new_tensor(0).long(), heads_KV, tree), tree)
        greedy = accept_greedy(logits_NV, candidates_PL, tree.paths_PL)
        lossless = accept_lossless(logits_NV, candidates_PL, tree.paths_PL, cold, gen)
        assert greedy[1:].tolist() == lossless[1:].tolist()


def test_unknown_acceptance_rule_is_refused():
    with pytest.raises(ValueError, match="lossless"):
        SamplingConfig(temperature=1.0, acceptance="speculative")
