"""Sequentially dependent draft heads: one small recurrent transition over the base hidden state.

Shape legend (ARCHITECTURE.md): B rows, E hidden size, F transition (MLP) width, M draft
vocabulary, V base vocabulary.

Medusa head k sees only h_t, the base model's hidden state at the last kept token, and must guess
token t + k + 2 without knowing which tokens the tree puts before it. These heads see them
(Hydra, Ankner et al. 2024; Apple's ReDrafter): a state starts at s_0 = h_t and advances by one
token at a time,

    s_d = s_{d-1} + W2 · SiLU(W1 · [RMSNorm(s_{d-1}); RMSNorm(emb(x_{t+d}))] + b1) + b2,

where x_{t+1} is the root (the base model's own next token) and x_{t+d} the token of the tree node
at depth d - 1. Depth d's proposals are the top-k of `base_lm_head(s_d)`: s_d is trained to be
h_{t+d} (feature regression, as EAGLE does) and to give the base model's own next token. One
transition serves every depth (the same "advance by one token" map), so the weights stay small:
the embedding and the LM head are the base model's, frozen and shared. Trained for J depths, the
same map unrolls further (`MAX_UNROLL`): dynamic trees may grow up to MAX_UNROLL * J deep, where
accuracy keeps falling slowly (eval/results/cpu-refactor-2026-12-03/README.md, "Figures that
left the code").

Draft vocabulary: the heads only score the M most frequent tokens of the training answers
(`draft_vocab_M`, token ids of the base vocabulary). Verification is exact, so this is lossless;
it costs the tokens the heads can never propose (rare ones: the bundled heads' README gives the
draft vocabulary's coverage) and cuts the heads' projection by V/M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medusa_engine.config import HeadsConfig, HeadsError

MAX_UNROLL = 2  # a transition trained for K depths drafts up to MAX_UNROLL * K deep


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x_BE: torch.Tensor) -> torch.Tensor:
        x = x_BE.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(x_BE.dtype)


class RecurrentHeads(nn.Module):
    """`HeadsConfig(kind="recurrent")`: `step` advances states; `logits` scores the draft vocab."""

    draft_vocab_M: torch.Tensor  # int64 token ids of the base vocabulary (a buffer, saved)

    def __init__(self, config: HeadsConfig) -> None:
        super().__init__()
        if config.kind != "recurrent":
            raise ValueError(f"RecurrentHeads needs kind='recurrent', got {config.kind!r}")
        self.config = config
        e, h = config.hidden_size, config.ffn_size
        self.norm_state = RMSNorm(e)
        self.norm_token = RMSNorm(e)
        self.fc1 = nn.Linear(2 * e, h)
        self.fc2 = nn.Linear(h, e)
        nn.init.zeros_(self.fc2.weight)  # the identity at init: s_d = s_{d-1}
        nn.init.zeros_(self.fc2.bias)
        m = config.draft_vocab or config.vocab_size
        self.register_buffer("draft_vocab_M", torch.arange(m, dtype=torch.int64))

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def set_draft_vocab(self, token_ids_M: torch.Tensor) -> None:
        if token_ids_M.shape != self.draft_vocab_M.shape:
            raise ValueError(
                f"draft vocabulary has {token_ids_M.numel()} ids, config says "
                f"{self.draft_vocab_M.numel()}"
            )
        self.draft_vocab_M.copy_(token_ids_M)

    def step(self, state_BE: torch.Tensor, token_emb_BE: torch.Tensor) -> torch.Tensor:
        """s_d from s_{d-1} and the embedding of the token at depth d - 1."""
        x = torch.cat([self.norm_state(state_BE), self.norm_token(token_emb_BE)], dim=-1)
        return state_BE + self.fc2(F.silu(self.fc1(x)))

    def logits(self, state_BE: torch.Tensor, draft_lm_ME: torch.Tensor) -> torch.Tensor:
        """logits_BM over the draft vocabulary (`draft_lm_ME` = base LM head rows of it)."""
        return F.linear(state_BE, draft_lm_ME.to(state_BE.dtype))

    def check_compatible(self, hidden_size: int, vocab_size: int, model_name: str = "") -> None:
        """Raise `HeadsError` when these heads cannot run on a model of this shape."""
        self.config.check_fits(hidden_size, vocab_size, model_name)
        if int(self.draft_vocab_M.max()) >= vocab_size or int(self.draft_vocab_M.min()) < 0:
            raise HeadsError("the heads' draft vocabulary has ids outside the model's vocabulary")
