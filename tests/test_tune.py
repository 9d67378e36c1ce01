"""Tree tuning: joint acceptance values, best-first optimality, and the cached `--tree auto`."""

from __future__ import annotations

import pytest
import torch

from medusa_engine import tune
from medusa_engine.generate import MedusaGenerator
from medusa_engine.tree import build_tree
from medusa_engine.trees import TREE_PRESETS
from tests.helpers import random_heads


def test_node_values_are_joint_rank_prefix_frequencies():
    rank_TK = torch.tensor([[0, 0], [0, 1], [1, 0], [0, 0], [3, 3]])  # top_k = 3: 3 = absent
    value = tune.node_values(rank_TK, top_k=3)
    assert value((0,)) == pytest.approx(3 / 5)
    assert value((0, 0)) == pytest.approx(2 / 5)
    assert value((1, 0)) == pytest.approx(1 / 5)
    assert value((2,)) == 0.0 and value((3,)) == 0.0  # never seen / beyond the observed top-k


def test_best_first_prefixes_are_the_best_trees_of_each_size():
    gen = torch.Generator().manual_seed(0)
    # Heads that are right more often at shallow depth and low rank, with noise.
    probs = torch.softmax(torch.randn(3, 4, generator=gen) - torch.arange(4.0), dim=-1)
    rank_TK = torch.stack(
        [torch.multinomial(p, 400, replacement=True, generator=gen) for p in probs], 1
    )
    value = tune.node_values(rank_TK, top_k=4)
    ranked = tune.best_first(value, num_heads=3, top_k=4, max_nodes=30)
    values = [v for _, v in ranked]
    assert values == sorted(values, reverse=True)
    for n in range(1, len(ranked) + 1):
        paths = [p for p, _ in ranked[:n]]
        build_tree(paths, num_heads=3, top_k=4)  # every prefix is a valid tree
    # No other tree of the same size has a larger expected tau: check against all presets' sizes.
    latency = {1: 10.0, 8: 11.0, 16: 12.0, 32: 15.0}
    for name, preset in TREE_PRESETS.items():
        paths = [p for p in preset if len(p) <= 3 and max(p) < 4]
        if not paths or len(paths) >= len(ranked):
            continue
        best_tau = 1 + sum(values[: len(paths)])
        assert tune.score_tree(paths, value, latency)[0] <= best_tau + 1e-12, name


def test_a_disturbed_size_is_timed_again_before_the_curve_is_made_monotone():
    true_ms = {1: 10.0, 4: 14.0, 8: 18.0, 12: 22.0}
    calls: list[tuple[int, int]] = []

    def fastest_ms(size: int, runs: int) -> float:
        calls.append((size, runs))
        disturbed = size == 4 and len(calls) <= 4  # the first timing of 4 nodes met other load
        return true_ms[size] + (7.0 if disturbed else 0.0)

    curve = tune.latency_curve(list(true_ms), fastest_ms, repeats=5)
    assert curve == true_ms  # not {4: 21, 8: 21, ...}: the slope after 4 nodes is kept
    assert calls[4:] == [(4, 10)]
    steady = tune.latency_curve([1, 4, 8], lambda size, runs: {1: 5.0, 4: 9.0, 8: 8.0}[size], 5)
    assert steady == {1: 5.0, 4: 9.0, 8: 9.0}  # still slower after timing again: clamped


def test_re_timing_follows_a_cascade_of_disturbed_sizes():
    """Re-timing 12 nodes exposes 8 as disturbed, and that exposes 4 (as in a real tuning run)."""
    true_ms = {1: 10.0, 4: 14.0, 8: 18.0, 12: 22.0, 16: 26.0}
    first = {1: 10.0, 4: 19.0, 8: 23.0, 12: 29.0, 16: 26.0}
    seen: set[int] = set()

    def fastest_ms(size: int, runs: int) -> float:
        again = size in seen
        seen.add(size)
        return true_ms[size] if again else first[size]

    assert tune.latency_curve(list(true_ms), fastest_ms, repeats=5) == true_ms


def test_interpolation_is_linear_between_measured_sizes():
    latency = {1: 10.0, 5: 14.0, 9: 30.0}
    assert tune.interpolate(latency, 3) == pytest.approx(12.0)
    assert tune.interpolate(latency, 7) == pytest.approx(22.0)
    assert tune.interpolate(latency, 18) == pytest.approx(60.0)


@pytest.fixture(scope="module")
def engine(stories260k):
    return MedusaGenerator(stories260k, random_heads(stories260k), "plain")


def test_tuned_tree_beats_every_preset_on_the_same_measurements(engine):
    prompts = tune.calibration_prompts(engine.model.tokenizer, limit=None)[:6]
    tuned, value = tune.tune(engine, prompts=prompts, new_tokens=24, sizes=(1, 4, 16, 64))
    tree = build_tree([tuple(p) for p in tuned.paths], num_heads=4)
    assert tree.num_nodes == len(tuned.paths) + 1
    assert list(tuned.latency_ms) == [1, 4, 16, 64]
    assert all(
        a <= b for a, b in zip(tuned.latency_ms.values(), list(tuned.latency_ms.values())[1:])
    )
    ratio = tuned.predicted_tau / tuned.step_ms
    for name, preset in TREE_PRESETS.items():
        tau, ms = tune.score_tree([p for p in preset if len(p) <= 4], value, tuned.latency_ms)
        assert ratio >= tau / ms - 1e-12, (name, ratio, tau / ms)
    # Dynamic trees competed on their own measurements; the winner is what `tree` hands over.
    assert list(tuned.dynamic_tau) == list(tuned.dynamic_latency_ms) == [4, 16, 64]
    assert all(1.0 <= tau <= 5.0 for tau in tuned.dynamic_tau.values())
    static_tau, static_ms = tune.score_tree(tuned.paths, value, tuned.latency_ms)
    dyn_best = max(tau / tuned.dynamic_latency_ms[n] for n, tau in tuned.dynamic_tau.items())
    assert ratio == pytest.approx(max(static_tau / static_ms, dyn_best))
    if tuned.dynamic_nodes:
        assert tuned.tree == f"dynamic:{tuned.dynamic_nodes}"
    else:
        assert tuned.tree == tuned.paths


def test_dynamic_tau_counts_the_true_path(stories260k, prompt_ids):
    """An oracle drafter's dynamic tree always holds the true continuation: τ = K + 1."""
    from tests.helpers import OracleDrafter

    ids = prompt_ids[0]
    plain = MedusaGenerator(stories260k, None, "plain")
    ref = plain.generate(ids, 24).token_ids
    oracle = OracleDrafter(ref, len(ids), 3, stories260k.vocab_size)
    engine = MedusaGenerator(stories260k, oracle, "plain")
    positions = list(tune.calibration_positions(engine, [ids], 24))
    assert tune.dynamic_taus(engine, positions, [4, 8]) == {4: 4.0, 8: 4.0}
    adversary = OracleDrafter(ref, len(ids), 3, stories260k.vocab_size, adversarial=True)
    engine = MedusaGenerator(stories260k, adversary, "plain")
    assert tune.dynamic_taus(engine, positions, [4, 8]) == {4: 1.0, 8: 1.0}


def test_auto_tree_is_cached(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_ENGINE_CACHE", str(tmp_path))
    calls = []

    def fake_tune(eng, progress=None, **kw):
        calls.append(1)
        fixed = tune.TunedTree([[0], [0, 0]], 1.5, 2.0, {1: 1.0, 4: 2.0}, 10)
        return fixed, lambda path: 0.0

    monkeypatch.setattr(tune, "tune", fake_tune)
    messages: list[str] = []
    first = tune.auto_tree(engine, None, messages.append)
    second = tune.auto_tree(engine, None, messages.append)
    assert calls == [1] and first.paths == second.paths == [[0], [0, 0]]
    assert first.tree == [[0], [0, 0]]  # a cache written before dynamic trees still loads
    assert len(messages) == 1 and "tuning the tree" in messages[0]
    assert len(list((tmp_path / "trees").glob("*.json"))) == 1
