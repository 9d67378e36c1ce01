"""Dynamic draft trees: the per-step tree is well formed, holds the most likely candidates, and
keeps greedy output identical to plain greedy decoding."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from medusa_engine.drafters import make_drafter
from medusa_engine.dynamic_tree import DynamicTree, grow, parse_dynamic, tree_from_parents
from medusa_engine.engine import build_engine
from medusa_engine.tree import InvalidTreeError, tree_from_name
from medusa_engine.tree_spec import parse_tree
from tests.helpers import OracleDrafter, random_heads
from tests.test_recurrent_heads import random_recurrent


def ancestors(tree, i: int) -> list[int]:
    chain = [i]
    while int(tree.parent_N[chain[-1]]) >= 0:
        chain.append(int(tree.parent_N[chain[-1]]))
    return chain[::-1]


def test_tree_from_parents_rebuilds_a_static_tree():
    static = tree_from_name("cpu_16", 4)
    tree = tree_from_parents(static.parent_N, static.depth_N, static.max_depth, static.top_k)
    assert torch.equal(tree.mask_NN, static.mask_NN)
    for i in range(tree.num_nodes):  # one row per node: its root-to-node path, padded
        row = [j for j in tree.paths_PL[i].tolist() if j >= 0]
        assert row == ancestors(static, i)
        assert tree.paths_PL[i, len(row) :].eq(-1).all()
    leaf_rows = {tuple(r) for r in static.paths_PL.tolist()}
    assert leaf_rows <= {tuple(r) for r in tree.paths_PL.tolist()}


def test_grow_keeps_the_most_likely_paths():
    """Beam and top-k as wide as the vocabulary: the tree must be the N - 1 best paths overall."""
    vocab, depth, nodes = 5, 3, 20
    table_VV = torch.log_softmax(
        torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(3)), -1
    )
    spec = DynamicTree(nodes, top_k=vocab, beam=vocab * vocab).for_heads(depth)
    root = torch.tensor(2)
    tokens, tree = grow(spec, root, lambda rows, toks: table_VV[toks])

    def score(path: tuple[int, ...]) -> float:
        prev, total = int(root), 0.0
        for t in path:
            total += float(table_VV[prev, t]) - 1e-3
            prev = t
        return total

    every = [p for d in range(1, depth + 1) for p in itertools.product(range(vocab), repeat=d)]
    best = sorted(every, key=score, reverse=True)[: nodes - 1]
    got = {tuple(tokens[j].item() for j in ancestors(tree, i)[1:]) for i in range(1, nodes)}
    assert got == set(best)
    assert tree.num_nodes == nodes and int(tokens[0]) == int(root)
    assert (tree.depth_N[1:] >= tree.depth_N[:-1]).all()  # parents before children
    assert all(int(tree.parent_N[i]) < i for i in range(1, nodes))


def test_dynamic_specs_are_checked():
    assert parse_dynamic("cpu_16") is None
    assert parse_dynamic("dynamic:24:8:4") == DynamicTree(24, 8, 4)
    assert parse_dynamic("dynamic:64:16:0:6") == DynamicTree(64, 16, 0, 6)
    assert DynamicTree(64, 16, 0, 6).for_heads(4, max_depth=8) == DynamicTree(64, 16, 16, 6)
    with pytest.raises(InvalidTreeError, match="at most 4 deep"):
        DynamicTree(64, 16, 0, 6).for_heads(4)  # Medusa heads: one per depth
    assert DynamicTree(24).for_heads(4) == DynamicTree(24, 10, 6, 4)  # beam nodes / 4
    assert DynamicTree(64).for_heads(3).beam == 10  # at most top_k
    for bad in ("dynamic:", "dynamic:x", "dynamic:1", "dynamic:8:0", "dynamic:8:2:2:2:2"):
        with pytest.raises(InvalidTreeError):
            parse_dynamic(bad)
    with pytest.raises(InvalidTreeError, match="candidates"):
        DynamicTree(100, top_k=3, beam=2).for_heads(4)  # 3 + 3 * 2 * 3 = 21 candidates
    with pytest.raises(InvalidTreeError, match="heads"):
        DynamicTree(8).for_heads(0)


@pytest.mark.parametrize("kind", ["recurrent", "medusa"])
@pytest.mark.parametrize("lookup", [0, 8])
def test_dynamic_tree_keeps_greedy_output(stories260k, prompt_ids, kind, lookup):
    heads = (
        random_recurrent(stories260k, seed=2) if kind == "recurrent" else random_heads(stories260k)
    )
    plain = build_engine(stories260k, None, "plain")
    engine = build_engine(stories260k, heads, "dynamic:12:4:3", lookup=lookup)
    for ids in prompt_ids[:3]:
        assert engine.generate(ids, 48).token_ids == plain.generate(ids, 48).token_ids


def test_recurrent_heads_unroll_deeper_than_trained(stories260k, prompt_ids):
    heads = random_recurrent(stories260k, num_heads=2, seed=2)
    plain = build_engine(stories260k, None, "plain")
    engine = build_engine(stories260k, heads, "dynamic:12:4:3:4")  # 2 trained depths, 4 deep
    assert engine.tree.max_depth == 4
    for ids in prompt_ids[:2]:
        assert engine.generate(ids, 40).token_ids == plain.generate(ids, 40).token_ids
    with pytest.raises(InvalidTreeError, match="at most 4 deep"):
        parse_tree("dynamic:12:4:3:5", engine.drafter)
    with pytest.raises(InvalidTreeError, match="at most 2 deep"):
        build_engine(stories260k, random_heads(stories260k, num_heads=2), "dynamic:12:4:3:3")


@pytest.mark.parametrize("kind", ["recurrent", "medusa"])
def test_confidence_temperatures_shape_the_tree_per_depth(stories260k, kind):
    """A sharp depth 1 and a flat depth 2 put one node at depth 1; the reverse spreads depth 1."""
    heads = (
        random_recurrent(stories260k, num_heads=2, seed=2)
        if kind == "recurrent"
        else random_heads(stories260k, num_heads=2)
    )
    spec = DynamicTree(8, top_k=10, beam=2).for_heads(2)
    hidden, root = torch.randn(stories260k.hidden_size), torch.tensor(5)

    def depth_counts(temps: tuple[float, ...]) -> list[int]:
        heads.config = replace(heads.config, confidence_temperature=temps)
        drafter = make_drafter(heads, stories260k)
        _, tree = drafter.draft_dynamic(hidden, root, spec, [1, 5])
        return [int((tree.depth_N == d).sum()) for d in (1, 2)]

    assert depth_counts((0.01, 1000.0)) == [1, 6]
    assert depth_counts((1000.0, 0.01))[1] <= 2  # at most the beam's best child each


def test_dynamic_tree_follows_a_confident_drafter(stories260k, prompt_ids):
    ids = prompt_ids[0]
    ref = build_engine(stories260k, None, "plain").generate(ids, 64).token_ids
    drafter = OracleDrafter(ref, len(ids), 4, stories260k.vocab_size)
    result = build_engine(stories260k, drafter, "dynamic:8:4:2").generate(ids, 64)
    assert result.token_ids == ref
    assert set(result.accepted_lengths[:-1]) == {5}  # the sure path is always in the tree
    side = OracleDrafter(ref, len(ids), 4, stories260k.vocab_size, truth_rank=1)
    result = build_engine(stories260k, side, "dynamic:8:4:2").generate(ids, 64)
    assert result.token_ids == ref and result.mean_accepted > 3.0


def test_dynamic_tree_samples_and_refuses_static_steps(stories260k, prompt_ids):
    from medusa_engine.config import SamplingConfig

    heads = random_recurrent(stories260k, seed=2)
    engine = build_engine(stories260k, heads, "dynamic:10", SamplingConfig(temperature=0.8, seed=1))
    assert len(engine.generate(prompt_ids[0], 24).token_ids) == 24
    with pytest.raises(ValueError, match="static tree"):
        build_engine(stories260k, heads, "dynamic:10", static=True)
