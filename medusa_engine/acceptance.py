"""Acceptance rules: which prefix of which tree path the base model keeps (pure).

Shape legend (ARCHITECTURE.md): N tree nodes incl. the root, V vocabulary, P root-to-leaf paths,
L path length (max depth + 1).

Every rule returns one int64 tensor `[best_path, accepted, next_token]` on the device: `accepted`
counts candidates kept beyond the root along `best_path`, and `next_token` is the base model's
token after the last kept node (the "bonus" token, the root of the next tree). `decide` reads it,
with the kept path's nodes and tokens, in one host transfer: the decode step's one sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medusa_engine.config import SamplingConfig
from medusa_engine.sampling import sampling_logp


def accept_greedy(
    logits_NV: torch.Tensor, candidates_PL: torch.Tensor, paths_PL: torch.Tensor
) -> torch.Tensor:
    """Longest path prefix equal to the base model's argmax chain (lossless under greedy)."""
    pred_N = logits_NV.argmax(-1)
    pred_PL = pred_N[paths_PL]  # -1 padding reads the last node; never compared to a real token
    match_PL = candidates_PL[:, 1:] == pred_PL[:, :-1]
    accepted_P = match_PL.to(torch.int64).cumprod(dim=1).sum(dim=1)
    best_1, accepted_1, last_1 = best_path(accepted_P, accepted_P, paths_PL)
    return torch.cat([best_1, accepted_1, pred_N.gather(0, last_1)])


def best_path(
    score_P: torch.Tensor, accepted_P: torch.Tensor, paths_PL: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(best path, its accepted length, its last kept node), each a 1-element tensor: indexing
    with a 0-d tensor reads it on the host, which would sync (and break CUDA-graph capture)."""
    best_1 = score_P.argmax(dim=0, keepdim=True)
    accepted_1 = accepted_P.gather(0, best_1)
    return best_1, accepted_1, paths_PL.index_select(0, best_1)[0].gather(0, accepted_1)


def typical_threshold(logits_NV: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Medusa's per-node threshold min(epsilon, delta * exp(-H(p))), p = the sampling
    distribution (`sampling_logp`: softmax(logits / T) after top-k / top-p)."""
    return _threshold(sampling_logp(logits_NV, sampling), sampling)


def _threshold(logp_NV: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    entropy_N = -torch.where(logp_NV > float("-inf"), logp_NV.exp() * logp_NV, 0.0).sum(-1)
    return torch.clamp(
        sampling.posterior_alpha * torch.exp(-entropy_N), max=sampling.posterior_threshold
    )


def accept_typical(
    logits_NV: torch.Tensor,
    candidates_PL: torch.Tensor,
    paths_PL: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Typical acceptance (Medusa, Sec. 3.3.1): keep candidate x while p(x) > threshold.

    p is `sampling_logp`'s distribution. Among the longest accepted prefixes the most likely one
    wins; the next token is sampled from p at the last kept node.
    """
    logp_NV = sampling_logp(logits_NV, sampling)
    threshold_N = _threshold(logp_NV, sampling)
    parent_PL1 = paths_PL[:, :-1]
    child_PL1 = candidates_PL[:, 1:]
    logp_child_PL1 = logp_NV[parent_PL1, child_PL1.clamp(min=0)]
    ok_PL1 = (child_PL1 >= 0) & (logp_child_PL1.exp() > threshold_N[parent_PL1])
    kept_PL1 = ok_PL1.to(torch.int64).cumprod(dim=1)
    accepted_P = kept_PL1.sum(dim=1)
    loglik_P = torch.where(kept_PL1 > 0, logp_child_PL1, 0.0).sum(dim=1)  # -inf where filtered
    score_P = torch.where(accepted_P == accepted_P.max(), loglik_P, float("-inf"))
    best_1, accepted_1, last_1 = best_path(score_P, accepted_P, paths_PL)
    next_1 = torch.multinomial(logp_NV.index_select(0, last_1)[0].exp(), 1, generator=generator)
    return torch.cat([best_1, accepted_1, next_1])


def node_view(
    candidates_PL: torch.Tensor, paths_PL: torch.Tensor, num_nodes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_N, parent_N) of the tree's nodes, read off its paths (the root's parent is -1)."""
    node_PL = torch.where(paths_PL >= 0, paths_PL, num_nodes)  # padding -> a spare slot
    token_N = candidates_PL.new_full((num_nodes + 1,), -1).scatter_(
        0, node_PL.flatten(), candidates_PL.flatten()
    )
    parent_PL = torch.cat([paths_PL.new_full((paths_PL.shape[0], 1), -1), paths_PL[:, :-1]], 1)
    parent_N = paths_PL.new_full((num_nodes + 1,), -1).scatter_(
        0, node_PL.flatten(), parent_PL.flatten()
    )
    return token_N[:num_nodes], parent_N[:num_nodes]


def first_of_siblings(token_N: torch.Tensor, parent_N: torch.Tensor) -> torch.Tensor:
    """first_N: whether node n is the lowest-numbered child of its parent carrying its token.
    Siblings can share a token (a prompt-lookup branch under the root may repeat a head's
    guess); only the first of them may be accepted, or that token's chance would count twice."""
    index_N = torch.arange(token_N.shape[0], device=token_N.device)
    twin_NM = (
        (parent_N[:, None] == parent_N[None])
        & (token_N[:, None] == token_N[None])
        & (index_N[None] < index_N[:, None])
    )
    return ~twin_NM.any(dim=1)


def accept_lossless(
    logits_NV: torch.Tensor,
    candidates_PL: torch.Tensor,
    paths_PL: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Lossless sampling: every emitted token is a sample from p = `sampling_logp(logits).exp()`
    (softmax(logits / T) after the config's top-k / top-p filters).

    This is rejection sampling of the tree's drafts (SpecInfer, Miao et al. 2024; EAGLE's
    multi-draft rule) for drafts chosen deterministically (top-k), whose draft distribution is a
    point mass: at node n, child c is accepted with probability p_n(c) and otherwise removed from
    the residual. Equivalently, the walk from the root moves from n to its child c with
    probability p_n(c) (one uniform draw per node against the children's stacked
    probabilities) and stops with the rest; the stopping node's next token is drawn from p_n
    without its children's tokens. Each emitted token therefore has the distribution of plain
    sampling at temperature T, whatever the heads propose; they only change how many tokens a
    step keeps. Only one full-vocabulary draw is made per step: one per node would cost more than
    a CPU verification step.
    """
    num_nodes = logits_NV.shape[0]
    logp_NV = sampling_logp(logits_NV, sampling)
    token_N, parent_N = node_view(candidates_PL, paths_PL, num_nodes)
    first_N = first_of_siblings(token_N, parent_N)
    has_parent_N = parent_N >= 0
    # q_N: the chance that n's parent moves to n; [lo_N, lo_N + q_N): its slice of [0, 1).
    q_N = torch.where(
        has_parent_N & first_N,
        logp_NV[parent_N.clamp(min=0), token_N.clamp(min=0)].exp(),
        0.0,
    )
    index_N = torch.arange(num_nodes, device=logits_NV.device)
    earlier_NM = (parent_N[:, None] == parent_N[None]) & (index_N[None] < index_N[:, None])
    lo_N = (earlier_NM.to(q_N.dtype) * q_N[None]).sum(dim=1)
    u_N = torch.rand(num_nodes, generator=generator, device=logits_NV.device)
    u_parent_N = u_N[parent_N.clamp(min=0)]
    moved_N = has_parent_N & (q_N > 0) & (lo_N <= u_parent_N) & (u_parent_N < lo_N + q_N)
    padded_N = torch.cat([moved_N, moved_N.new_zeros(1)])  # path padding (-1) reads False
    match_PL1 = padded_N[paths_PL[:, 1:]]
    accepted_P = match_PL1.to(torch.int64).cumprod(dim=1).sum(dim=1)
    best_1, accepted_1, last_1 = best_path(accepted_P, accepted_P, paths_PL)
    # The residual at the stopping node: p without its children's tokens.
    probs_V = logp_NV.index_select(0, last_1)[0].exp()
    children_N = (parent_N == last_1) & (token_N >= 0)
    dropped_V = torch.zeros_like(probs_V).scatter_add_(
        0, token_N.clamp(min=0), children_N.to(probs_V.dtype)
    )
    residual_V = torch.where(dropped_V > 0, 0.0, probs_V)
    # Rounding can leave no mass outside the children (then a child's chance was ~1): fall
    # back on p itself rather than fail.
    residual_V = torch.where(residual_V.sum() > 0, residual_V, probs_V)
    next_1 = torch.multinomial(residual_V, 1, generator=generator)
    return torch.cat([best_1, accepted_1, next_1])


def accept(
    logits_NV: torch.Tensor,
    candidates_PL: torch.Tensor,
    paths_PL: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dispatch on the sampling config: greedy at temperature 0, else `sampling.acceptance`."""
    if sampling.greedy:
        return accept_greedy(logits_NV, candidates_PL, paths_PL)
    if sampling.acceptance == "lossless":
        return accept_lossless(logits_NV, candidates_PL, paths_PL, sampling, generator)
    return accept_typical(logits_NV, candidates_PL, paths_PL, sampling, generator)


@dataclass(frozen=True)
class Decision:
    """What one verification step keeps: tree `nodes` (root first) holding `tokens`, and the
    base model's `next_token` after them."""

    nodes: list[int]
    tokens: list[int]
    next_token: int

    @property
    def emitted(self) -> list[int]:
        """The tokens the step emits: the accepted candidates, then the bonus token."""
        return [*self.tokens[1:], self.next_token]


def decide(
    logits_NV: torch.Tensor,
    candidates_PL: torch.Tensor,
    paths_PL: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
) -> Decision:
    """`accept`, then the kept path read on the host in one transfer."""
    decision_3 = accept(logits_NV, candidates_PL, paths_PL, sampling, generator)
    best_1 = decision_3[0:1]  # a 0-d index would be read on the host: a second sync
    row = torch.cat(
        [
            decision_3[1:],
            paths_PL.index_select(0, best_1)[0],
            candidates_PL.index_select(0, best_1)[0],
        ]
    ).tolist()
    return _read_decision(row, paths_PL.shape[1])


def decide_rows(
    trees: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    samplings: Sequence[SamplingConfig],
    generators: Sequence[torch.Generator | None],
) -> list[Decision]:
    """`decide` for a batch of rows, each (logits_NV, candidates_PL, paths_PL) with its own
    sampling config and generator; all rows' kept paths are read in one host transfer."""
    parts = []
    width = max(paths_PL.shape[1] for _, _, paths_PL in trees)
    for (logits_NV, candidates_PL, paths_PL), sampling, generator in zip(
        trees, samplings, generators, strict=True
    ):
        decision_3 = accept(logits_NV, candidates_PL, paths_PL, sampling, generator)
        best_1 = decision_3[0:1]
        pad = width - paths_PL.shape[1]  # rows of narrower trees are padded to one width
        path_L = F.pad(paths_PL.index_select(0, best_1)[0], (0, pad), value=-1)
        tokens_L = F.pad(candidates_PL.index_select(0, best_1)[0], (0, pad), value=-1)
        parts.append(torch.cat([decision_3[1:], path_L, tokens_L]))
    rows = torch.stack(parts).tolist()
    return [_read_decision(row, width) for row in rows]


def _read_decision(row: list[int], width: int) -> Decision:
    """[accepted, next_token, path (width), path tokens (width)] -> Decision."""
    accepted, next_token = row[0], row[1]
    nodes = row[2 : 3 + accepted]
    tokens = row[2 + width : 3 + width + accepted]
    return Decision(nodes, tokens, next_token)
