"""Medusa heads on a frozen base model (Cai et al. 2024, "Medusa", Sec. 2.2): loss, training,
held-out accuracy.

Shape legend (ARCHITECTURE.md): B = sequences in a batch, T = padded length, E = hidden size,
V = vocabulary, J = draft heads; A = the answer rows of one head, the (sequence, position) pairs
whose target lies in the response (this file only).

Loss (Medusa-1, Eq. 1): L = Σ_k λ^k · CE(p_k(h_t), x_{t+k+2}), k = 0..J-1. The base LM head at
h_t predicts x_{t+1}; head k predicts the token k + 2 positions ahead, exactly as `generate` uses
it (heads read the hidden state of the last kept token; head 0 proposes the token after the base
model's own next token). With `distill_weight` w > 0 the target mixes in the base model's own
distribution for that token (Medusa-2 self-distillation): (1 - w)·CE + w·KL(p_base(h_{t+k+1}) ||
p_k(h_t)). Only positions whose target lies in the response (`Example.start`) count.

Hidden states are recomputed every step, not cached on disk: the base model is frozen and its
forward is not the dominant cost of a step (figures: medusa_engine/assets/heads/*/README.md,
"Training choices"). The vocabulary projection and its loss run in chunks of `loss_chunk` rows under
activation checkpointing, so memory is O(chunk·V) rather than O(J·B·T·V).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from attention.precision import autocast, get_policy
from medusa_engine.config import HeadsConfig
from medusa_engine.heads import MedusaHeads
from medusa_engine.training.config import TrainConfig, TrainResult
from medusa_engine.training.data import Example
from medusa_engine.training.loop import OnStep, optimize, setup


def collate(examples: list[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded ids_BT, lengths_B and target starts_B."""
    width = max(len(e.ids) for e in examples)
    ids_BT = torch.full((len(examples), width), pad_id, dtype=torch.int64)
    for b, e in enumerate(examples):
        ids_BT[b, : len(e.ids)] = torch.as_tensor(e.ids)
    lengths_B = torch.tensor([len(e.ids) for e in examples])
    starts_B = torch.tensor([e.start for e in examples])
    return {"ids_BT": ids_BT, "lengths_B": lengths_B, "starts_B": starts_B}


def head_rows(
    lengths_B: torch.Tensor, starts_B: torch.Tensor, width: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b_A, t_A): the rows where head k has a target x[b, t + k + 2] inside the response."""
    j_T = torch.arange(width, device=lengths_B.device) + k + 2
    valid_BT = (j_T[None] < lengths_B[:, None]) & (j_T[None] >= starts_B[:, None])
    b_A, t_A = valid_BT.nonzero(as_tuple=True)
    return b_A, t_A


def _chunk_loss(
    h_AE: torch.Tensor,
    w_VE: torch.Tensor,
    target_A: torch.Tensor,
    teacher_AE: torch.Tensor | None,
    distill_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, top-1 hits) of one chunk of rows; logits_AV live only inside this call."""
    logits_AV = F.linear(h_AE, w_VE.to(h_AE.dtype)).float()
    loss = F.cross_entropy(logits_AV, target_A, reduction="sum")
    if teacher_AE is not None and distill_weight > 0:
        with torch.no_grad():
            teacher_AV = F.linear(teacher_AE, w_VE.to(teacher_AE.dtype)).float().log_softmax(-1)
        kl = F.kl_div(logits_AV.log_softmax(-1), teacher_AV, log_target=True, reduction="sum")
        loss = (1 - distill_weight) * loss + distill_weight * kl
    hits = (logits_AV.detach().argmax(-1) == target_A).sum()
    return loss, hits


def _projection(lm_weight_VE: torch.Tensor, heads: MedusaHeads, k: int) -> torch.Tensor:
    """Head k's vocabulary projection: the shared base LM head or the head's own."""
    if heads.lm_heads is None:
        return lm_weight_VE
    return cast(torch.Tensor, heads.lm_heads[k].weight)


class MedusaLoss(nn.Module):
    """The trainable part as one module (what DDP wraps): heads + the Medusa loss.

    `forward(hidden_BTE, batch)` -> (loss, hits_J, counts_J); gradients reach only the heads.
    The base LM head's weight (`lm_weight_VE`, frozen) is a plain attribute, not a parameter.
    """

    def __init__(self, heads: MedusaHeads, lm_weight_VE: torch.Tensor, cfg: TrainConfig) -> None:
        super().__init__()
        self.heads = heads
        self.lm_weight_VE = lm_weight_VE
        self.cfg = cfg

    def forward(self, hidden_BTE: torch.Tensor, batch: dict[str, torch.Tensor]) -> Any:
        heads, chunk, w = self.heads, self.cfg.loss_chunk, self.cfg.distill_weight
        hidden_BTE = hidden_BTE.float()  # the heads' master weights are fp32 (autocast may lower)
        ids_BT, width = batch["ids_BT"], hidden_BTE.shape[1]
        total = hidden_BTE.new_zeros((), dtype=torch.float32)
        hits_J = torch.zeros(heads.num_heads, dtype=torch.int64)
        counts_J = torch.zeros(heads.num_heads, dtype=torch.int64)
        for k in range(heads.num_heads):
            b_A, t_A = head_rows(batch["lengths_B"], batch["starts_B"], width, k)
            if b_A.numel() == 0:
                continue
            h_AE = heads.blocks[k](hidden_BTE[b_A, t_A])
            w_VE = _projection(self.lm_weight_VE, heads, k)
            teacher_AE = hidden_BTE[b_A, t_A + k + 1] if w > 0 else None
            target_A = ids_BT[b_A, t_A + k + 2]
            loss_k = h_AE.new_zeros((), dtype=torch.float32)
            for s in range(0, len(b_A), chunk):
                sl = slice(s, s + chunk)
                teacher = None if teacher_AE is None else teacher_AE[sl]
                args = (h_AE[sl], w_VE, target_A[sl], teacher, w)
                if len(b_A) > chunk:
                    loss, hits = checkpoint(_chunk_loss, *args, use_reentrant=False)
                else:
                    loss, hits = _chunk_loss(*args)
                loss_k = loss_k + loss
                hits_J[k] += int(hits)
            counts_J[k] = len(b_A)
            total = total + self.cfg.decay**k * loss_k / len(b_A)
        return total, hits_J, counts_J


@torch.no_grad()
def base_hidden(model: Any, ids_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
    """The frozen base model's last hidden states hidden_BTE (after the final norm)."""
    width = ids_BT.shape[1]
    mask_BT = (torch.arange(width, device=ids_BT.device)[None] < lengths_B[:, None]).long()
    out = model.decoder(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)
    return out.last_hidden_state


def make_heads(model: Any, cfg: TrainConfig) -> MedusaHeads:
    """Fresh heads for `model` (an own LM head starts as a copy of the base one)."""
    config = HeadsConfig(
        cfg.num_heads,
        cfg.num_layers,
        model.hidden_size,
        model.vocab_size,
        cfg.shared_lm_head,
        model.name,
        cfg.out_map,
    )
    heads = MedusaHeads(config)
    heads.init_from_base(model.lm_head.weight.float())
    return heads


def train(
    model: Any,
    examples: list[Example],
    cfg: TrainConfig,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    accelerator: Any = None,
    on_step: OnStep | None = None,
) -> TrainResult:
    """Train Medusa heads on `examples` with `model` frozen (`loop.optimize`); the result holds
    the unwrapped heads."""
    acc = setup(model, cfg, accelerator)
    heads = make_heads(model, cfg)
    module = MedusaLoss(heads, model.lm_head.weight, cfg)

    def batch_loss(rows: list[int], module: Any) -> Any:
        batch = {k: v.to(acc.device) for k, v in collate([examples[i] for i in rows]).items()}
        hidden_BTE = base_hidden(model, batch["ids_BT"], batch["lengths_B"])
        return module(hidden_BTE, batch)

    return optimize(
        heads, module, batch_loss, cfg, len(examples), acc, checkpoint_path, resume, on_step
    )


@torch.no_grad()
def evaluate(
    model: Any,
    heads: MedusaHeads,
    examples: list[Example],
    batch_size: int = 8,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Per-head top-1/top-5 accuracy of x_{t+k+2} on held-out `examples` (+ the base LM's)."""
    policy = get_policy(precision)
    heads = heads.to(model.device).eval()
    n = heads.num_heads + 1  # index 0: the base LM head (target x_{t+1}); k + 1: head k
    hits1, hits5, counts = [0] * n, [0] * n, [0] * n
    w_VE = model.lm_head.weight
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(examples[i : i + batch_size]).items()}
        with autocast(policy, model.device):
            hidden_BTE = base_hidden(model, batch["ids_BT"], batch["lengths_B"]).float()
            for k in range(-1, heads.num_heads):
                b_A, t_A = head_rows(batch["lengths_B"], batch["starts_B"], hidden_BTE.shape[1], k)
                h_AE = hidden_BTE[b_A, t_A] if k < 0 else heads.blocks[k](hidden_BTE[b_A, t_A])
                proj = w_VE if k < 0 else _projection(w_VE, heads, k)
                top5_A5 = F.linear(h_AE, proj.to(h_AE.dtype)).topk(5, dim=-1).indices
                target_A = batch["ids_BT"][b_A, t_A + k + 2]
                hits1[k + 1] += int((top5_A5[:, 0] == target_A).sum())
                hits5[k + 1] += int((top5_A5 == target_A[:, None]).any(-1).sum())
                counts[k + 1] += len(b_A)
    acc1 = [h / max(c, 1) for h, c in zip(hits1, counts)]
    acc5 = [h / max(c, 1) for h, c in zip(hits5, counts)]
    per_head = [
        {"head": k, "top1": acc1[k + 1], "top5": acc5[k + 1], "tokens": counts[k + 1]}
        for k in range(heads.num_heads)
    ]
    return {"base_top1": acc1[0], "heads": per_head}
