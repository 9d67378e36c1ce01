"""build_tree: structure of the buffers and clear errors for invalid specs."""

from __future__ import annotations

import pytest
import torch

from medusa_engine.tree import InvalidTreeError, build_tree, tree_from_name
from medusa_engine.trees import TREE_PRESETS


@pytest.mark.parametrize("name", sorted(TREE_PRESETS))
def test_presets_build_consistent_buffers(name):
    tree = tree_from_name(name, num_heads=5)
    n = tree.num_nodes
    assert n == len([p for p in TREE_PRESETS[name] if len(p) <= 5]) + 1
    assert tree.mask_NN.diagonal().all() and tree.mask_NN[:, 0].all()  # self and root visible
    assert not tree.mask_NN.triu(1).any()  # parents precede children
    for i in range(1, n):
        parent = int(tree.parent_N[i])
        assert tree.depth_N[i] == tree.depth_N[parent] + 1
        # A node sees exactly its parent's ancestors plus itself.
        expected = tree.mask_NN[parent].clone()
        expected[i] = True
        assert torch.equal(tree.mask_NN[i], expected)
    leaves = {int(row[row >= 0][-1]) for row in tree.paths_PL}
    children = {int(p) for p in tree.parent_N[1:]}
    assert leaves == (set(range(n)) - children)
    for row in tree.paths_PL:
        nodes = row[row >= 0]
        assert nodes[0] == 0 and torch.all(nodes[1:] > nodes[:-1])


def test_medusa_63_node_tree():
    tree = tree_from_name("mc_sim_7b_63", 4)
    assert tree.num_nodes == 64 and tree.top_k == 10 and tree.max_depth == 4
    assert tree.depth_N.bincount().tolist() == [1, 10, 28, 23, 2]  # as published: 63 + root


def test_topk_index_points_at_head_and_rank():
    tree = build_tree([(0,), (2,), (0, 1)], num_heads=2, top_k=3)
    # Nodes ordered by (depth, path): root, (0,), (2,), (0, 1).
    assert tree.topk_index_N.tolist() == [0, 1, 3, 1 + 3 + 1]
    assert tree.paths_PL.tolist() == [[0, 2, -1], [0, 1, 3]]


def test_plain_tree_is_the_root_alone():
    tree = build_tree([], num_heads=0)
    assert tree.num_nodes == 1 and tree.paths_PL.tolist() == [[0]]


@pytest.mark.parametrize(
    "paths, heads, top_k, message",
    [
        ([(0,), (0, 1, 0)], 4, None, "no parent"),
        ([(0,), (0,)], 4, None, "twice"),
        ([(0,), (5,)], 4, 3, "rank 5 >= top_k=3"),
        ([(0,), (0, 0), (0, 0, 0)], 2, None, "only 2 heads"),
        ([()], 4, None, "empty"),
        ([(0, -1)], 4, None, "not an int"),
    ],
)
def test_invalid_trees_raise_clear_errors(paths, heads, top_k, message):
    with pytest.raises(InvalidTreeError, match=message):
        build_tree(paths, heads, top_k)


def test_unknown_preset():
    with pytest.raises(InvalidTreeError, match="unknown tree"):
        tree_from_name("nope", 4)
