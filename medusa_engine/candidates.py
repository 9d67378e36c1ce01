"""Choose the root token, fill a tree from head logits, list its paths' tokens (pure).

Shape legend: K = heads, V = vocabulary, N = tree nodes incl. the root, P = paths, L = depth + 1.
"""

from __future__ import annotations

import torch

from medusa_engine.acceptance import sampling_logp
from medusa_engine.config import SamplingConfig
from medusa_engine.tree import TreeBuffers

PAD_TOKEN = -1  # stands in for "no node" in padded paths; never equals a real token


def choose_token(
    logits_V: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The base model's next token (0-d int64): argmax, or a sample from `sampling_logp`'s
    distribution (softmax(logits / T) after top-k / top-p)."""
    if sampling.greedy:
        return logits_V.argmax(-1)
    probs_V = sampling_logp(logits_V, sampling).exp()
    return torch.multinomial(probs_V, 1, generator=generator)[0]


def fill_tree(
    root: torch.Tensor, logits_KV: torch.Tensor | None, tree: TreeBuffers
) -> torch.Tensor:
    """tree_tokens_N from the root and path-independent head logits (the Medusa rule).

    `root` is the 0-d token chosen by the base model; node i takes entry `tree.topk_index_N[i]`
    of [root, head 0's top-k, head 1's top-k, ...].
    """
    root_1 = root.reshape(1)
    if tree.num_nodes == 1:
        return root_1
    if logits_KV is None or logits_KV.shape[0] < tree.num_heads:
        got = 0 if logits_KV is None else logits_KV.shape[0]
        raise ValueError(f"tree needs {tree.num_heads} heads, the drafter gave {got}")
    topk_KR = torch.topk(logits_KV[: tree.num_heads], tree.top_k, dim=-1).indices
    pool = torch.cat([root_1, topk_KR.flatten()])
    return pool[tree.topk_index_N]


def path_tokens(tree_tokens_N: torch.Tensor, tree: TreeBuffers) -> torch.Tensor:
    """candidates_PL: the tokens along each root-to-leaf path, padded with PAD_TOKEN."""
    padded = torch.cat([tree_tokens_N, tree_tokens_N.new_full((1,), PAD_TOKEN)])
    return padded[tree.paths_PL]  # index -1 picks the PAD entry
