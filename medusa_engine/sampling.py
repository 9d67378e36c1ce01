"""The distribution tokens are sampled from, and the base model's own next token (pure).

Shape legend (ARCHITECTURE.md): N rows (tree nodes), V vocabulary.
"""

from __future__ import annotations

import torch

from medusa_engine.config import SamplingConfig


def sampling_logp(logits_NV: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """log p of the distribution tokens are sampled from: softmax(logits / T) after top-k, then
    top-p (nucleus) filtering, in that order, as HF's warpers do; float32, -inf where filtered."""
    logits_NV = logits_NV.float() / sampling.temperature
    vocab = logits_NV.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth_N1 = logits_NV.topk(sampling.top_k, dim=-1).values[..., -1:]
        logits_NV = logits_NV.masked_fill(logits_NV < kth_N1, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_NV, order_NV = logits_NV.sort(dim=-1, descending=True)
        probs_NV = sorted_NV.softmax(dim=-1)
        before_NV = probs_NV.cumsum(dim=-1) - probs_NV  # mass of the likelier tokens
        drop_NV = torch.zeros_like(before_NV, dtype=torch.bool).scatter(
            -1, order_NV, before_NV >= sampling.top_p
        )
        logits_NV = logits_NV.masked_fill(drop_NV, float("-inf"))
    return torch.log_softmax(logits_NV, dim=-1)


def choose_token(
    logits_V: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The base model's next token (0-d int64): argmax, or a sample from `sampling_logp`'s
    distribution (softmax(logits / T) after top-k / top-p)."""
    if sampling.greedy:
        return logits_V.argmax(-1)
    probs_V = sampling_logp(logits_V, sampling).exp()
    return torch.multinomial(probs_V, 1, generator=generator)[0]
