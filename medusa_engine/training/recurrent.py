"""Recurrent draft heads (`recurrent_heads.py`) trained on cached base-model features
(`features.py`): loss, training, held-out accuracy, confidence temperatures.

Shape legend (ARCHITECTURE.md): T = cached positions, B = positions in a batch, E = hidden size,
J = draft depths, M = draft vocabulary, V = base vocabulary.

Loss, for a position t and each depth d = 1..J (teacher forcing along the example's tokens):

    s_0 = h_t,  s_d = step(s_{d-1}, emb(x_{t+d})),
    L = Σ_d λ^(d-1) · [CE(logits(s_d), a_{t+d}) + β · SmoothL1(s_d, h_{t+d})].

Targets are the base model's own choices a_{t+d}, not the text's tokens: greedy verification
accepts exactly those, and any text (self-distilled or reference answers) becomes valid training
context. The regression term (EAGLE's feature loss) asks s_d to be the base model's hidden state,
which is what the next transition reads. Targets outside the draft vocabulary are skipped in the
CE (and count as misses in the accuracies).

Calibration: trained heads are over-confident on new text, and a dynamic tree ranks its nodes by
their probabilities (figures: medusa_engine/assets/heads/smollm2-135m-instruct/README.md,
"Training choices"). `fit_confidence_temperatures` fits one temperature per depth on held-out
positions (minimum NLL of the base model's choice: a proper scoring rule, so the probabilities
become calibrated), down to the deepest depth a dynamic tree may unroll (`MAX_UNROLL`);
train-heads stores them in the heads' config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attention.precision import autocast, get_policy
from medusa_engine.config import HeadsConfig
from medusa_engine.recurrent_heads import MAX_UNROLL, RecurrentHeads
from medusa_engine.training.config import TrainConfig, TrainResult
from medusa_engine.training.features import Features
from medusa_engine.training.loop import OnStep, optimize, setup


def draft_vocabulary(
    features: Features, positions: torch.Tensor, size: int, vocab: int
) -> torch.Tensor:
    """The `size` most frequent base-model choices at the training positions (ties: lower id)."""
    counts = torch.bincount(features.argmax_T[positions], minlength=vocab).double()
    counts -= torch.arange(vocab, dtype=torch.float64) / (2 * vocab)  # deterministic tie-break
    return counts.argsort(descending=True)[:size].sort().values


class RecurrentLoss(nn.Module):
    """Heads + the loss above; the base embedding and LM head rows are frozen attributes."""

    def __init__(
        self,
        heads: RecurrentHeads,
        embed_VE: torch.Tensor,
        lm_VE: torch.Tensor,
        decay: float,
        feature_weight: float,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.embed_VE = embed_VE
        vocab_M = heads.draft_vocab_M
        self.lm_ME = lm_VE[vocab_M.to(lm_VE.device)].float()
        self.to_draft_V = torch.full((lm_VE.shape[0],), -100, dtype=torch.int64)
        self.to_draft_V[vocab_M.cpu()] = torch.arange(vocab_M.numel())
        self.decay, self.feature_weight = decay, feature_weight

    def forward(self, features: Features, positions_B: torch.Tensor) -> Any:
        """(loss, top-1 hits_J, positions counts_J) for a batch of positions."""
        heads, f = self.heads, features
        device = self.lm_ME.device
        state_BE = f.hidden_TE[positions_B].to(device).float()
        depths_B = f.depths_T[positions_B].to(device)
        total = state_BE.new_zeros(())
        hits_J = torch.zeros(heads.num_heads, dtype=torch.int64)
        counts_J = torch.zeros(heads.num_heads, dtype=torch.int64)
        for d in range(1, heads.num_heads + 1):
            valid_B = depths_B >= d
            if not bool(valid_B.any()):
                break
            at_B = (positions_B + d).clamp(max=len(f) - 1)
            emb_BE = self.embed_VE[f.tokens_T[at_B].to(self.embed_VE.device)].to(device).float()
            state_BE = heads.step(state_BE, emb_BE)
            logits_BM = heads.logits(state_BE, self.lm_ME).float()
            target_B = self.to_draft_V[f.argmax_T[at_B]].to(device)
            target_B = torch.where(valid_B, target_B, -100)
            loss = F.cross_entropy(logits_BM, target_B, ignore_index=-100)
            if self.feature_weight > 0:
                truth_BE = f.hidden_TE[at_B].to(device).float()
                loss = loss + self.feature_weight * F.smooth_l1_loss(
                    state_BE[valid_B].float(), truth_BE[valid_B]
                )
            total = total + self.decay ** (d - 1) * loss
            hits_J[d - 1] = int(((logits_BM.argmax(-1) == target_B) & valid_B).sum())
            counts_J[d - 1] = int(valid_B.sum())
        return total, hits_J, counts_J


def make_heads(model: Any, cfg: TrainConfig, vocab_M: torch.Tensor) -> RecurrentHeads:
    """Fresh recurrent heads for `model` scoring the draft vocabulary `vocab_M`."""
    config = HeadsConfig(
        cfg.num_heads,
        1,
        model.hidden_size,
        model.vocab_size,
        True,
        model.name,
        kind="recurrent",
        ffn_size=cfg.ffn_size,
        draft_vocab=int(vocab_M.numel()),
    )
    heads = RecurrentHeads(config)
    heads.set_draft_vocab(vocab_M)
    return heads


def train(
    model: Any,
    features: Features,
    positions: torch.Tensor,
    cfg: TrainConfig,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    accelerator: Any = None,
    on_step: OnStep | None = None,
) -> TrainResult:
    """Train recurrent heads on the cached `features` at `positions` (`loop.optimize`)."""
    acc = setup(model, cfg, accelerator)
    size = cfg.draft_vocab or model.vocab_size
    vocab_M = draft_vocabulary(features, positions, size, model.vocab_size)
    heads = make_heads(model, cfg, vocab_M).to(acc.device)
    embed_VE = model.model.get_input_embeddings().weight.detach()
    lm_VE = model.lm_head.weight.detach()
    module = RecurrentLoss(heads, embed_VE, lm_VE, cfg.decay, cfg.feature_weight)

    def batch_loss(rows: list[int], module: Any) -> Any:
        return module(features, positions[rows])

    return optimize(
        heads,
        module,
        batch_loss,
        cfg,
        len(positions),
        acc,
        checkpoint_path,
        resume,
        on_step,
        items="positions",
    )


@torch.no_grad()
def evaluate(
    model: Any,
    heads: RecurrentHeads,
    features: Features,
    positions: torch.Tensor,
    batch_size: int = 1024,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Per-depth top-1/top-5 of the base model's own choice, teacher-forced, on `positions`."""
    policy, f = get_policy(precision), features
    heads = heads.to(model.device).eval()
    embed_VE = model.model.get_input_embeddings().weight.detach()
    lm_ME = model.lm_head.weight.detach()[heads.draft_vocab_M].float()
    vocab_M = heads.draft_vocab_M.cpu()
    n = heads.num_heads
    hits1, hits5, counts = [0] * n, [0] * n, [0] * n
    for lo in range(0, len(positions), batch_size):
        p_B = positions[lo : lo + batch_size]
        with autocast(policy, model.device):
            state_BE = f.hidden_TE[p_B].to(model.device).float()
            for d in range(1, n + 1):
                valid_B = f.depths_T[p_B] >= d
                at_B = (p_B + d).clamp(max=len(f) - 1)
                emb_BE = embed_VE[f.tokens_T[at_B].to(model.device)].float()
                state_BE = heads.step(state_BE, emb_BE)
                top5_B5 = vocab_M[heads.logits(state_BE, lm_ME).topk(5, dim=-1).indices.cpu()]
                target_B = f.argmax_T[at_B]
                hits1[d - 1] += int(((top5_B5[:, 0] == target_B) & valid_B).sum())
                hits5[d - 1] += int(((top5_B5 == target_B[:, None]).any(-1) & valid_B).sum())
                counts[d - 1] += int(valid_B.sum())
    # The base model's own top-1: how often a_t is the example's next token x_{t+1}.
    nxt = positions[f.depths_T[positions] >= 1]
    base = float((f.argmax_T[nxt] == f.tokens_T[nxt + 1]).float().mean()) if len(nxt) else 0.0
    in_vocab = float(torch.isin(f.argmax_T[positions], vocab_M).float().mean())
    per_head = [
        {
            "head": k,
            "top1": hits1[k] / max(counts[k], 1),
            "top5": hits5[k] / max(counts[k], 1),
            "tokens": counts[k],
        }
        for k in range(n)
    ]
    return {"base_top1": base, "draft_vocab_coverage": in_vocab, "heads": per_head}


def _nll_optimal_beta(z_BM: torch.Tensor, z_y: torch.Tensor) -> float:
    """argmin over β in [0.1, 3] of mean(logsumexp(β·z) - β·z_y): golden-section search (the
    NLL is convex in β = 1 / T)."""

    def nll(beta: float) -> float:
        return float((torch.logsumexp(beta * z_BM, -1) - beta * z_y).mean())

    lo, hi = 0.1, 3.0
    g = (5**0.5 - 1) / 2
    for _ in range(30):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        lo, hi = (lo, b) if nll(a) < nll(b) else (a, hi)
    return (lo + hi) / 2


@torch.no_grad()
def fit_confidence_temperatures(
    model: Any,
    heads: RecurrentHeads,
    features: Features,
    positions: torch.Tensor,
    max_positions: int = 4096,
) -> list[dict[str, float]]:
    """Per depth 1..MAX_UNROLL * J, teacher-forced on (up to `max_positions` of) `positions`:
    the NLL-optimal temperature, the mean top-1 probability before/after it and the top-1
    accuracy. Positions whose target is outside the draft vocabulary are left out."""
    heads = heads.to(model.device).eval()
    device, dtype = model.device, heads.fc1.weight.dtype
    embed_VE = model.model.get_input_embeddings().weight.detach().to(dtype)
    lm_ME = model.lm_head.weight.detach()[heads.draft_vocab_M].to(dtype)
    index_V = torch.full((model.vocab_size,), -1, dtype=torch.int64)
    index_V[heads.draft_vocab_M.cpu()] = torch.arange(heads.draft_vocab_M.numel())
    f, p_B = features, positions[:max_positions]
    last = torch.zeros(int(f.example_T.max()) + 1, dtype=torch.int64)
    last = last.scatter_reduce(0, f.example_T, torch.arange(len(f)), "amax")
    remaining_B = last[f.example_T[p_B]] - p_B  # tokens after t in its example
    state_BE, out = f.hidden_TE[p_B].to(device, dtype), []
    for d in range(1, MAX_UNROLL * heads.num_heads + 1):
        at_B = (p_B + d).clamp(max=len(f) - 1)
        state_BE = heads.step(state_BE, embed_VE[f.tokens_T[at_B].to(device)])
        target_B = index_V[f.argmax_T[at_B]]
        keep = ((remaining_B >= d) & (target_B >= 0)).to(device)
        if not keep.any():
            break
        z_BM = heads.logits(state_BE[keep], lm_ME).float()
        y_B = target_B.to(device)[keep]
        beta = _nll_optimal_beta(z_BM, z_BM.gather(1, y_B[:, None])[:, 0])
        out.append(
            {
                "depth": d,
                "temperature": round(1 / beta, 4),
                "positions": int(keep.sum()),
                "top1": float((z_BM.argmax(-1) == y_B).float().mean()),
                "confidence": float(torch.softmax(z_BM, -1).amax(-1).mean()),
                "calibrated_confidence": float(torch.softmax(beta * z_BM, -1).amax(-1).mean()),
            }
        )
    return out
