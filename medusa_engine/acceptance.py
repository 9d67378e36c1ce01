"""Acceptance rules: which prefix of which tree path the base model keeps (pure).

Shape legend: N = tree nodes incl. the root, V = vocabulary, P = root-to-leaf paths,
L = max depth + 1.

Both rules return one int64 tensor `[best_path, accepted, next_token]`, so the caller syncs with
the host once per step: `accepted` counts candidates kept beyond the root along `best_path`, and
`next_token` is the base model's token after the last kept node (the "bonus" token, the root of
the next tree).
"""

from __future__ import annotations

import torch

from medusa_engine.config import SamplingConfig


def accept_greedy(
    logits_NV: torch.Tensor, candidates_PL: torch.Tensor, paths_PL: torch.Tensor
) -> torch.Tensor:
    """Longest path prefix equal to the base model's argmax chain (lossless under greedy)."""
    pred_N = logits_NV.argmax(-1)
    pred_PL = pred_N[paths_PL]  # -1 padding reads the last node; never compared to a real token
    match_PL = candidates_PL[:, 1:] == pred_PL[:, :-1]
    accepted_P = match_PL.to(torch.int64).cumprod(dim=1).sum(dim=1)
    # 1-element index tensors throughout: indexing with a 0-d tensor reads it on the host, which
    # would sync (and break CUDA-graph capture of the step).
    best_1 = accepted_P.argmax(dim=0, keepdim=True)
    accepted_1 = accepted_P.gather(0, best_1)
    last_1 = paths_PL.index_select(0, best_1)[0].gather(0, accepted_1)
    return torch.cat([best_1, accepted_1, pred_N.gather(0, last_1)])


def typical_threshold(logits_NV: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Medusa's per-node threshold min(epsilon, delta * exp(-H(p))) with p = softmax(logits / T)."""
    logp_NV = torch.log_softmax(logits_NV.float() / sampling.temperature, dim=-1)
    entropy_N = -(logp_NV.exp() * logp_NV).sum(-1)
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

    Among the longest accepted prefixes the most likely one wins; the next token is sampled from
    softmax(logits / T) at the last kept node.
    """
    logp_NV = torch.log_softmax(logits_NV.float() / sampling.temperature, dim=-1)
    threshold_N = typical_threshold(logits_NV, sampling)
    parent_PL1 = paths_PL[:, :-1]
    child_PL1 = candidates_PL[:, 1:]
    logp_child_PL1 = logp_NV[parent_PL1, child_PL1.clamp(min=0)]
    ok_PL1 = (child_PL1 >= 0) & (logp_child_PL1.exp() > threshold_N[parent_PL1])
    kept_PL1 = ok_PL1.to(torch.int64).cumprod(dim=1)
    accepted_P = kept_PL1.sum(dim=1)
    loglik_P = (logp_child_PL1 * kept_PL1).sum(dim=1)
    score_P = torch.where(accepted_P == accepted_P.max(), loglik_P, float("-inf"))
    best_1 = score_P.argmax(dim=0, keepdim=True)  # 1-element indices: no host sync (see greedy)
    accepted_1 = accepted_P.gather(0, best_1)
    last_1 = paths_PL.index_select(0, best_1)[0].gather(0, accepted_1)
    next_1 = torch.multinomial(logp_NV.index_select(0, last_1)[0].exp(), 1, generator=generator)
    return torch.cat([best_1, accepted_1, next_1])


def accept(
    logits_NV: torch.Tensor,
    candidates_PL: torch.Tensor,
    paths_PL: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dispatch on the sampling config: greedy at temperature 0, else typical acceptance."""
    if sampling.greedy:
        return accept_greedy(logits_NV, candidates_PL, paths_PL)
    return accept_typical(logits_NV, candidates_PL, paths_PL, sampling, generator)
