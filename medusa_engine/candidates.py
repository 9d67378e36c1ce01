"""Fill a tree from draft-head logits, list its paths' tokens (pure).

Shape legend (ARCHITECTURE.md): J draft heads, V vocabulary, R top-k ranks, N tree nodes incl.
the root, P root-to-leaf paths, L path length (max depth + 1).
"""

from __future__ import annotations

import torch

from medusa_engine.tree import TreeBuffers

PAD_TOKEN = -1  # stands in for "no node" in padded paths; never equals a real token


def fill_tree(
    root: torch.Tensor, logits_JV: torch.Tensor | None, tree: TreeBuffers
) -> torch.Tensor:
    """tree_tokens_N from the root and path-independent head logits (the Medusa rule).

    `root` is the 0-d token chosen by the base model; node i takes entry `tree.topk_index_N[i]`
    of [root, head 0's top-k, head 1's top-k, ...].
    """
    root_1 = root.reshape(1)
    if tree.num_nodes == 1:
        return root_1
    if logits_JV is None or logits_JV.shape[0] < tree.num_heads:
        got = 0 if logits_JV is None else logits_JV.shape[0]
        raise ValueError(f"tree needs {tree.num_heads} heads, the drafter gave {got}")
    topk_JR = torch.topk(logits_JV[: tree.num_heads], tree.top_k, dim=-1).indices
    pool = torch.cat([root_1, topk_JR.flatten()])
    return pool[tree.topk_index_N]


def path_tokens(tree_tokens_N: torch.Tensor, tree: TreeBuffers) -> torch.Tensor:
    """candidates_PL: the tokens along each root-to-leaf path, padded with PAD_TOKEN."""
    padded = torch.cat([tree_tokens_N, tree_tokens_N.new_full((1,), PAD_TOKEN)])
    return padded[tree.paths_PL]  # index -1 picks the PAD entry
