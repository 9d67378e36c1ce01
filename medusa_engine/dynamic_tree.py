"""Dynamic draft trees (as in EAGLE-2): the tree's shape follows the drafter's confidence each step.

Shape legend: N = tree nodes including the root, B = nodes expanded at one depth (the beam),
R = children scored per expanded node (top-k), M = draft vocabulary, C = candidates, L = depth + 1.

A static tree spends its nodes on the same rank paths every step. A dynamic tree of N nodes
spends them where the heads are sure this step: depth by depth, the `beam` most likely nodes so
far (score = sum of the drafter's log-probabilities along the path) are expanded into their
`top_k` children; then the N - 1 most likely candidates over all depths become the tree. A child
never scores above its parent, so the chosen nodes always include their ancestors.

Everything runs on the device with fixed shapes (no host sync): `paths_PL` has one row per node
(the root-to-node path; the acceptance rule picks the longest accepted prefix among them, which is
the same as among leaves).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from medusa_engine.tree import InvalidTreeError, TreeBuffers

# expand(rows_B, tokens_B) -> logp_BM: log-probabilities of the children of B frontier nodes, whose
# parents are rows `rows_B` of the previous call's frontier (row 0 for the first call, the root)
# and whose own tokens are `tokens_B`.
Expand = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DEPTH_PENALTY = 1e-3  # breaks a child's tie with its parent (a log-probability of 0) for the parent


@dataclass(frozen=True)
class DynamicTree:
    """`nodes` (root included) chosen per step; `beam` nodes expanded per depth into `top_k`
    children (0: nodes / 4, within 2..top_k), `depth` levels deep (0 until `for_heads` sets it to
    the drafter's trained depths; recurrent heads may go deeper, `MAX_UNROLL`)."""

    nodes: int
    top_k: int = 10
    beam: int = 0
    depth: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 2 or self.top_k < 1 or self.beam < 0 or self.depth < 0:
            raise InvalidTreeError(f"a dynamic tree needs nodes >= 2 and top_k >= 1; got {self}")

    @property
    def num_nodes(self) -> int:
        return self.nodes

    @property
    def max_depth(self) -> int:
        return self.depth

    def for_heads(self, num_heads: int, max_depth: int = 0) -> DynamicTree:
        """This spec for a drafter of `num_heads` trained depths that drafts up to `max_depth`
        (default `num_heads`) deep: `depth` levels, or `num_heads` when unset."""
        max_depth = max(max_depth, num_heads)
        depth = self.depth or num_heads
        if depth < 1:
            raise InvalidTreeError("a dynamic tree needs heads")
        if depth > max_depth:
            raise InvalidTreeError(
                f"a dynamic tree {depth} deep: these heads draft at most {max_depth} deep"
            )
        beam = self.beam or min(max(2, self.nodes // 4), self.top_k)
        level = grown = self.top_k  # candidates at depth 1, and over all depths
        for _ in range(depth - 1):
            level = min(beam, level) * self.top_k
            grown += level
        if self.nodes - 1 > grown:
            raise InvalidTreeError(
                f"a dynamic tree of {self.nodes} nodes needs more candidates than {depth} "
                f"depths grow with top_k={self.top_k}, beam={beam} ({grown}): raise them or "
                "lower the nodes"
            )
        return DynamicTree(self.nodes, self.top_k, beam, depth)


def parse_dynamic(spec: str) -> DynamicTree | None:
    """`dynamic:N[:TOPK[:BEAM[:DEPTH]]]` -> DynamicTree (BEAM or DEPTH 0 keeps the default);
    None for other names."""
    if not spec.startswith("dynamic:"):
        return None
    parts = spec.split(":")[1:]
    if not 1 <= len(parts) <= 4 or not all(p.isdigit() for p in parts):
        raise InvalidTreeError(
            f"dynamic tree {spec!r}: use dynamic:NODES[:TOPK[:BEAM[:DEPTH]]] (BEAM, DEPTH 0: default)"
        )
    return DynamicTree(*(int(p) for p in parts))


def grow(
    spec: DynamicTree,
    root_1: torch.Tensor,
    expand: Expand,
    vocab_M: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TreeBuffers]:
    """(tokens_N, tree) for this step: `spec.depth` calls of `expand`, then the best N - 1 nodes.

    `vocab_M` maps the drafter's vocabulary to the model's token ids (None: the same).
    """
    device, k, num_heads, beam = root_1.device, spec.top_k, spec.depth, spec.beam
    if num_heads < 1 or beam < 1:
        raise ValueError("resolve the spec for the drafter first: spec.for_heads(num_heads)")
    score_C, token_C, parent_C, depth_C = [], [], [], []
    front_score_B = torch.zeros(1, device=device)
    front_id_B = torch.zeros(1, dtype=torch.int64, device=device)  # global ids; the root is 0
    rows_B, tokens_B = front_id_B, root_1.reshape(1)
    offset = 1
    for depth in range(1, num_heads + 1):
        top = expand(rows_B, tokens_B).float().topk(k, dim=-1)
        score_BR = front_score_B[:, None] + top.values - DEPTH_PENALTY
        ids_BR = top.indices if vocab_M is None else vocab_M[top.indices]
        score_C.append(score_BR.flatten())
        token_C.append(ids_BR.flatten())
        parent_C.append(front_id_B[:, None].expand(-1, k).flatten())
        depth_C.append(torch.full((score_BR.numel(),), depth, device=device))
        if depth < num_heads:
            best = score_C[-1].topk(min(beam, score_C[-1].numel())).indices
            front_score_B, tokens_B = score_C[-1][best], token_C[-1][best]
            front_id_B, rows_B = offset + best, best // k
        offset += score_BR.numel()
    score, token = torch.cat(score_C), torch.cat(token_C)
    parent, level = torch.cat(parent_C), torch.cat(depth_C)
    chosen = score.topk(spec.nodes - 1).indices
    chosen = chosen[level[chosen].sort(stable=True).indices]  # by depth, then by score
    new_id = torch.zeros(offset, dtype=torch.int64, device=device)
    new_id[chosen + 1] = torch.arange(1, spec.nodes, device=device)
    parent_N = torch.cat([parent.new_full((1,), -1), new_id[parent[chosen]]])
    depth_N = torch.cat([level.new_zeros(1), level[chosen]])
    tokens_N = torch.cat([root_1.reshape(1), token[chosen]])
    return tokens_N, tree_from_parents(parent_N, depth_N, num_heads, k)


def tree_from_parents(
    parent_N: torch.Tensor, depth_N: torch.Tensor, max_depth: int, top_k: int
) -> TreeBuffers:
    """TreeBuffers of nodes ordered by depth (parent_N[0] = -1), one path row per node."""
    n, device = parent_N.shape[0], parent_N.device
    up = parent_N.clamp(min=0)  # the root is its own parent for the walk
    node_N = torch.arange(n, device=device)
    mask_NN = torch.eye(n, dtype=torch.bool, device=device)
    cur = node_N
    for _ in range(max_depth):
        cur = up[cur]
        mask_NN[node_N, cur] = True
    # paths_NL[i, depth_N[j]] = j for each ancestor j of i (column L is a dump for the others)
    column_NN = torch.where(mask_NN, depth_N[None, :], max_depth + 1)
    paths = torch.full((n, max_depth + 2), -1, dtype=torch.int64, device=device)
    paths.scatter_(1, column_NN, node_N[None, :].expand(n, n).contiguous())
    topk_index_N = torch.zeros(n, dtype=torch.int64, device=device)  # unused: no rank pool
    return TreeBuffers(
        mask_NN, depth_N, topk_index_N, parent_N, paths[:, : max_depth + 1], top_k, max_depth
    )
