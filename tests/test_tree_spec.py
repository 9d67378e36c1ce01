"""`parse_tree`: every --tree form resolves once, for a drafter, or fails in one line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from medusa_engine.dynamic_tree import DynamicTree
from medusa_engine.tree import InvalidTreeError, TreeBuffers, build_tree, tree_from_name
from medusa_engine.tree_spec import parse_tree

HEADS = SimpleNamespace(
    num_heads=4, max_depth=8, draft_vocab_size=512
)  # what parse_tree reads of a drafter


def same(a: TreeBuffers, b: TreeBuffers) -> bool:
    return torch.equal(a.paths_PL, b.paths_PL) and torch.equal(a.mask_NN, b.mask_NN)


def test_presets_paths_json_and_files_give_the_same_buffers(tmp_path):
    want = build_tree([(0,), (1,), (0, 0)], 4)
    file = tmp_path / "t.json"
    file.write_text(json.dumps([[0], [1], [0, 0]]))
    record = tmp_path / "tuned.json"  # a `tune-tree --out` record whose static tree won
    record.write_text(json.dumps({"paths": [[0], [1], [0, 0]], "dynamic_nodes": 0}))
    for spec in ([[0], [1], [0, 0]], "[[0], [1], [0, 0]]", str(file), str(record), want):
        got = parse_tree(spec, HEADS)
        assert isinstance(got, TreeBuffers) and same(got, want), spec
    assert same(parse_tree("cpu_16", HEADS), tree_from_name("cpu_16", 4))
    assert parse_tree("plain", None).num_nodes == 1


def test_dynamic_specs_are_resolved_for_the_drafter(tmp_path):
    got = parse_tree("dynamic:16", HEADS)
    assert got == DynamicTree(16).for_heads(4, 8) and got.depth == 4
    record = tmp_path / "tuned.json"
    record.write_text(json.dumps({"paths": [[0]], "dynamic_nodes": 12}))
    assert parse_tree(str(record), HEADS) == DynamicTree(12).for_heads(4, 8)
    assert parse_tree("dynamic:16:10:4:8", HEADS).depth == 8


@pytest.mark.parametrize(
    ("spec", "drafter", "message"),
    [
        ("nope", HEADS, "unknown tree 'nope'"),
        ("[[0], [0, 0", HEADS, "not valid JSON"),
        ("[[true]]", HEADS, "not an integer"),
        ('{"paths": 3}', HEADS, "list of paths"),
        ("[[0], [5, 0]]", HEADS, "no parent"),
        ("[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]]", HEADS, "only 4 heads"),
        ("dynamic:16", None, "needs heads"),
        ("dynamic:16:10:4:9", HEADS, "at most 8 deep"),
        ("dynamic:x", HEADS, "use dynamic:NODES"),
        ("missing.json", HEADS, "tree file not found"),
        ("auto", HEADS, "resolved when the engine is loaded"),
        ("[[0]]", None, "only 0 heads"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, drafter, message):
    with pytest.raises(InvalidTreeError, match=message) as info:
        parse_tree(spec, drafter)
    assert "\n" not in str(info.value)
