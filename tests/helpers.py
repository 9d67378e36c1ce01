"""Test doubles shared by several test files: random heads and oracle/adversarial drafters."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from medusa_engine.config import HeadsConfig
from medusa_engine.drafters import LogitsDrafter
from medusa_engine.heads import MedusaHeads
from medusa_engine.heads_io import save_heads
from medusa_engine.recurrent_heads import RecurrentHeads


def random_heads(
    model=None,
    num_heads: int = 4,
    seed: int = 0,
    *,
    hidden: int = 64,
    vocab: int = 512,
    save_to: Path | None = None,
) -> MedusaHeads:
    """Heads with random weights (they propose real, mostly wrong, tokens), for `model`'s shape."""
    if model is not None:
        hidden, vocab = model.hidden_size, model.vocab_size
    torch.manual_seed(seed)
    heads = MedusaHeads(HeadsConfig(num_heads, 1, hidden, vocab))
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if save_to is not None:
        save_heads(heads, save_to)
    return heads


def random_recurrent(model, num_heads=4, draft_vocab=300, seed=0) -> RecurrentHeads:
    """Recurrent heads with random weights over a random draft vocabulary, for `model`."""
    torch.manual_seed(seed)
    config = HeadsConfig(num_heads, 1, model.hidden_size, model.vocab_size, kind="recurrent",
                         ffn_size=96, draft_vocab=draft_vocab)  # fmt: skip
    heads = RecurrentHeads(config)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    heads.set_draft_vocab(torch.randperm(model.vocab_size)[:draft_vocab].sort().values)
    return heads


class OracleDrafter(LogitsDrafter):
    """Proposes the reference continuation (or, adversarially, anything but it).

    The session holds the prompt and every emitted token but the last (the current root), so
    the heads must propose ref[done + 1 : done + 1 + J] with done = tokens emitted before it.
    `truth_rank` puts the right token at that top-k rank of head 0 (exercises branch paths).
    """

    def __init__(
        self,
        ref: list[int],
        prompt_len: int,
        num_heads: int,
        vocab: int,
        adversarial: bool = False,
        truth_rank: int = 0,
    ) -> None:
        self.ref, self.prompt_len, self.num_heads, self.vocab = ref, prompt_len, num_heads, vocab
        self.draft_vocab_size = vocab
        self.adversarial, self.truth_rank = adversarial, truth_rank
        self.gen = torch.Generator().manual_seed(0)

    def logits(self, hidden_E: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
        done = len(token_ids) - self.prompt_len
        logits_JV = torch.rand(self.num_heads, self.vocab, generator=self.gen)
        for j in range(self.num_heads):
            i = done + 1 + j
            if i >= len(self.ref):
                continue
            truth = self.ref[i]
            if self.adversarial:
                logits_JV[j, truth] = float("-inf")
            elif j == 0 and self.truth_rank > 0:
                logits_JV[j, truth] = 2.0
                top = torch.topk(logits_JV[j], self.truth_rank + 1).indices
                logits_JV[j, top[: self.truth_rank]] = 3.0 + torch.arange(self.truth_rank).float()
                logits_JV[j, truth] = 2.5
            else:
                logits_JV[j, truth] = 10.0
        return logits_JV.to(hidden_E.dtype)
