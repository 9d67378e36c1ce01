"""Build the static buffers of a Medusa tree from its paths (pure, computed once per tree).

Shape legend: N = tree nodes including the root, P = root-to-leaf paths, L = max depth + 1.

Node 0 is the root: the token the base model itself chose at the last accepted position (not yet
in the KV cache). A node at depth d >= 1 holds head (d-1)'s candidate of the given top-k rank and
sits at position `cache_len + d`. Nodes are ordered by (depth, path), so parents precede children
and every root-to-node index sequence is increasing (compaction relies on this).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medusa_engine.trees import TREE_PRESETS


class InvalidTreeError(ValueError):
    """A tree spec that cannot be built; the message is one line for the CLI."""


@dataclass(frozen=True)
class TreeBuffers:
    """Static tensors of one tree (CPU; `to(device)` moves them)."""

    mask_NN: torch.Tensor  # bool; [i, j] = node j is i or an ancestor of i
    depth_N: torch.Tensor  # int64; position offset from the cache length
    topk_index_N: torch.Tensor  # int64; index into [root, head0 top-k..., head1 top-k..., ...]
    parent_N: torch.Tensor  # int64; parent node (-1 for the root)
    paths_PL: torch.Tensor  # int64; node indices root->leaf, padded with -1
    top_k: int  # candidates taken from each head
    num_heads: int  # heads the tree uses (= max depth)

    @property
    def num_nodes(self) -> int:
        return int(self.depth_N.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.paths_PL.shape[1]) - 1

    def to(self, device: torch.device | str) -> TreeBuffers:
        return TreeBuffers(
            mask_NN=self.mask_NN.to(device),
            depth_N=self.depth_N.to(device),
            topk_index_N=self.topk_index_N.to(device),
            parent_N=self.parent_N.to(device),
            paths_PL=self.paths_PL.to(device),
            top_k=self.top_k,
            num_heads=self.num_heads,
        )


def _validate(paths: Sequence[tuple[int, ...]], num_heads: int, top_k: int) -> None:
    seen: set[tuple[int, ...]] = set()
    for path in paths:
        if len(path) == 0:
            raise InvalidTreeError("a tree path is empty (the root is implicit)")
        if any((not isinstance(r, int)) or r < 0 for r in path):
            raise InvalidTreeError(f"tree path {list(path)} has a rank that is not an int >= 0")
        if path in seen:
            raise InvalidTreeError(f"tree path {list(path)} appears twice")
        seen.add(path)
    for path in paths:
        if len(path) > 1 and path[:-1] not in seen:
            raise InvalidTreeError(f"tree path {list(path)} has no parent {list(path[:-1])}")
        if len(path) > num_heads:
            raise InvalidTreeError(
                f"tree path {list(path)} is {len(path)} deep but only {num_heads} heads propose"
            )
        if max(path) >= top_k:
            raise InvalidTreeError(
                f"tree path {list(path)} asks for rank {max(path)} >= top_k={top_k}"
            )


def build_tree(
    paths: Sequence[Sequence[int]], num_heads: int, top_k: int | None = None
) -> TreeBuffers:
    """Tree buffers for `paths` (Medusa "choices"), proposed by `num_heads` heads.

    `top_k` defaults to the largest rank used + 1. Raises `InvalidTreeError` for an empty path,
    a duplicate, a missing parent, a rank >= top_k or a path deeper than `num_heads`.
    """
    norm = [tuple(p) for p in paths]
    if top_k is None:
        top_k = (
            max((max(p) for p in norm if p and all(isinstance(r, int) for r in p)), default=-1) + 1
        )
    top_k = max(top_k, 1)
    _validate(norm, num_heads, top_k)
    ordered = sorted(norm, key=lambda p: (len(p), p))
    index = {(): 0} | {p: i + 1 for i, p in enumerate(ordered)}
    n = len(ordered) + 1

    mask_NN = torch.zeros(n, n, dtype=torch.bool)
    depth_N = torch.zeros(n, dtype=torch.int64)
    topk_index_N = torch.zeros(n, dtype=torch.int64)
    parent_N = torch.full((n,), -1, dtype=torch.int64)
    mask_NN[0, 0] = True
    for p in ordered:
        i = index[p]
        depth_N[i] = len(p)
        topk_index_N[i] = 1 + (len(p) - 1) * top_k + p[-1]
        parent_N[i] = index[p[:-1]]
        for d in range(len(p) + 1):
            mask_NN[i, index[p[:d]]] = True

    prefixes = {p[:d] for p in ordered for d in range(len(p))}
    leaves = [p for p in ordered if p not in prefixes] or [()]
    depth = max(len(p) for p in leaves)
    paths_PL = torch.full((len(leaves), depth + 1), -1, dtype=torch.int64)
    for row, leaf in enumerate(leaves):
        for d in range(len(leaf) + 1):
            paths_PL[row, d] = index[leaf[:d]]
    return TreeBuffers(mask_NN, depth_N, topk_index_N, parent_N, paths_PL, top_k, depth)


def tree_from_name(name: str, num_heads: int) -> TreeBuffers:
    """A preset by name, trimmed to the paths `num_heads` heads can propose.

    Trimming (rather than an error) lets one preset serve heads of any count; `plain` and zero
    heads give the root-only tree (plain decoding).
    """
    if name not in TREE_PRESETS:
        raise InvalidTreeError(f"unknown tree {name!r}; presets: {', '.join(TREE_PRESETS)}")
    paths = [p for p in TREE_PRESETS[name] if len(p) <= num_heads]
    return build_tree(paths, num_heads)
