"""Medusa heads (Cai et al. 2024, "Medusa", Sec. 2.1.1) and their on-disk formats.

Shape legend: B = rows (positions), K = heads, E = hidden size, V = vocabulary.

Head k maps the base model's last hidden state h_t to logits for token t + k + 2 (the base LM head
itself predicts t + 1):  p_k = softmax(W2_k · (h + SiLU(W1_k h + b1_k))), with `num_layers`
residual blocks. W1 is zero-initialised, so an untrained head starts as the base LM head applied
one token too early. W2 is either the head's own matrix (initialised from the base LM head, the
published format) or the base LM head itself, shared by all heads and frozen (one matmul projects
all K heads at once).

On-disk formats (ours and the published FasterDecoding/Medusa one): `heads_io.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medusa_engine.config import HeadsConfig


class ResBlock(nn.Module):
    """x + SiLU(W x + b), W and b zero-initialised (the identity at init)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x_BE: torch.Tensor) -> torch.Tensor:
        return x_BE + F.silu(self.linear(x_BE))


class LinearResidual(nn.Module):
    """x + U x, U zero-initialised (the identity at init); see `HeadsConfig.out_map`."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x_BE: torch.Tensor) -> torch.Tensor:
        return x_BE + self.linear(x_BE)


class MedusaHeads(nn.Module):
    """K heads; `forward(hidden_BE, lm_head)` returns logits_BKV."""

    def __init__(self, config: HeadsConfig) -> None:
        super().__init__()
        self.config = config
        e, v = config.hidden_size, config.vocab_size
        # Distinct modules per block (never `[ResBlock(e)] * n`, which would share weights).
        self.blocks = nn.ModuleList(
            nn.Sequential(
                *(ResBlock(e) for _ in range(config.num_layers)),
                *([LinearResidual(e)] if config.out_map else []),
            )
            for _ in range(config.num_heads)
        )
        self.lm_heads = (
            None
            if config.shared_lm_head
            else nn.ModuleList(nn.Linear(e, v, bias=False) for _ in range(config.num_heads))
        )

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def init_from_base(self, lm_head_VE: torch.Tensor) -> None:
        """Copy the base LM head into each head's own projection (no-op when shared)."""
        if self.lm_heads is not None:
            with torch.no_grad():
                for head in self.lm_heads:
                    head.weight.copy_(lm_head_VE)  # type: ignore[operator]

    def hidden(self, hidden_BE: torch.Tensor) -> torch.Tensor:
        """The heads' residual stacks: hidden_BKE."""
        return torch.stack([blocks(hidden_BE) for blocks in self.blocks], dim=1)

    def forward(self, hidden_BE: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        h_BKE = self.hidden(hidden_BE)
        if self.lm_heads is None:
            if lm_head is None:
                raise ValueError("these heads share the base LM head: pass lm_head=")
            return lm_head(h_BKE)
        return torch.stack([proj(h_BKE[:, k]) for k, proj in enumerate(self.lm_heads)], dim=1)

    def check_compatible(self, hidden_size: int, vocab_size: int, model_name: str = "") -> None:
        """Raise `HeadsError` when these heads cannot run on a model of this shape."""
        self.config.check_fits(hidden_size, vocab_size, model_name)
