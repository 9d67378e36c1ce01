"""Tree specs -> the tree objects the engine verifies, resolved once for a drafter.

`parse_tree(value, drafter)` takes any of:
* a preset name (`trees.TREE_PRESETS`, `plain` included), trimmed to the drafter's depths;
* `dynamic:N[:TOPK[:BEAM[:DEPTH]]]` (`dynamic_tree.parse_dynamic`);
* a list of paths, or JSON inline (`'[[0], [1], [0, 0]]'`) or in a file: a list of paths or a
  `tune-tree --out` record (its static paths, or `dynamic_nodes` when a dynamic tree won);
* a `TreeBuffers` or `DynamicTree` (checked and resolved for the drafter).
`default` and `auto` depend on the heads' folder and on tuning: `engine.load_engine` resolves them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medusa_engine.drafters import Drafter
from medusa_engine.dynamic_tree import DynamicTree, parse_dynamic
from medusa_engine.tree import InvalidTreeError, TreeBuffers, build_tree, tree_from_name

Tree = TreeBuffers | DynamicTree
TreeSpec = str | Sequence[Sequence[int]] | Tree


def parse_tree(value: TreeSpec, drafter: Drafter | None) -> Tree:
    """The tree `value` names, for `drafter` (None: plain decoding only); `InvalidTreeError`
    (one line) for anything that is not a valid tree for it."""
    depths = drafter.num_heads if drafter is not None else 0
    if isinstance(value, str):
        value = _from_text(value)
    if isinstance(value, str):
        dynamic = parse_dynamic(value)
        return _resolve(dynamic if dynamic is not None else tree_from_name(value, depths), drafter)
    if isinstance(value, (TreeBuffers, DynamicTree)):
        return _resolve(value, drafter)
    return _resolve(build_tree(_paths(value, "the tree"), depths), drafter)


def _resolve(tree: Tree, drafter: Drafter | None) -> Tree:
    if drafter is not None and tree.num_nodes > 1 and tree.top_k > drafter.draft_vocab_size:
        raise InvalidTreeError(
            f"the tree asks for the top {tree.top_k} drafts of a node; the heads score "
            f"{drafter.draft_vocab_size} tokens"
        )
    if isinstance(tree, DynamicTree):
        if drafter is None:
            raise InvalidTreeError("a dynamic tree needs heads")
        return tree.for_heads(drafter.num_heads, drafter.max_depth)
    depths = drafter.num_heads if drafter is not None else 0
    if tree.num_nodes > 1 and tree.num_heads > depths:
        raise InvalidTreeError(f"the tree is {tree.num_heads} deep but the heads draft {depths}")
    return tree


def _from_text(value: str) -> str | list[tuple[int, ...]] | DynamicTree:
    """A preset or `dynamic:` name as it is; the tree of inline JSON or of a JSON file."""
    if value in ("auto", "default"):
        raise InvalidTreeError(f"--tree {value} is resolved when the engine is loaded")
    if value.lstrip().startswith(("[", "{")):
        return _from_json(value, "--tree")
    path = Path(value)
    if value.endswith(".json") or path.is_file():
        if not path.is_file():
            raise InvalidTreeError(f"tree file not found: {path}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise InvalidTreeError(f"cannot read tree file {path}: {err}") from None
        return _from_json(text, str(path))
    return value


def _from_json(text: str, where: str) -> list[tuple[int, ...]] | DynamicTree:
    """Paths from a JSON list, or a `tune-tree --out` record (`tune.TunedTree`)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidTreeError(f"{where} is not valid JSON: {err}") from None
    if isinstance(data, dict) and data.get("dynamic_nodes"):  # `tune-tree --out`: dynamic won
        nodes = data["dynamic_nodes"]
        if not isinstance(nodes, int) or isinstance(nodes, bool):
            raise InvalidTreeError(f"{where}: dynamic_nodes must be an integer")
        return DynamicTree(nodes)
    return _paths(data.get("paths") if isinstance(data, dict) else data, where)


def _paths(data: Any, where: str) -> list[tuple[int, ...]]:
    """`data` as a list of paths of int ranks (JSON booleans are not ranks)."""
    if not isinstance(data, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in data):
        raise InvalidTreeError(f"{where} must hold a list of paths (lists of ranks)")
    for path in data:
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in path):
            raise InvalidTreeError(f"{where}: path {list(path)} has a rank that is not an integer")
    return [tuple(p) for p in data]
