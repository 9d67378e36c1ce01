"""Train recurrent draft heads (`recurrent_heads.py`) on cached base-model features.

Shape legend: T = cached positions, E = hidden size, B = positions in a batch, D = depths (heads),
M = draft vocabulary, V = base vocabulary.

Features. The frozen base model runs once over every example; for each position t from the one
before the first answer token to the end it keeps h_t (the last hidden state, bf16), the token x_t
and the base model's own next-token choice a_t = argmax(lm_head(h_t)). They are cached on disk
(one safetensors file, written atomically, reused when the examples and model match): each epoch
then costs only the heads, which for recurrent heads is far cheaper than the base forward.

Loss, for a position t and each depth d = 1..D (teacher forcing along the example's tokens):

    s_0 = h_t,  s_d = step(s_{d-1}, emb(x_{t+d})),
    L = Σ_d λ^(d-1) · [CE(logits(s_d), a_{t+d}) + β · SmoothL1(s_d, h_{t+d})].

Targets are the base model's own choices a_{t+d}, not the text's tokens: greedy verification
accepts exactly those, and any text (self-distilled or reference answers) becomes valid training
context. The regression term (EAGLE's feature loss) asks s_d to be the base model's hidden state,
which is what the next transition reads. Targets outside the draft vocabulary are skipped in the
CE (and count as misses in the accuracies).

Calibration. Trained heads are over-confident on new text (session-4 SmolLM2 heads: mean top-1
probability 0.58 at depth 1 vs 0.48 accuracy on the calibration prompts, worse deeper), and a
dynamic tree ranks its nodes by those probabilities. `fit_confidence_temperatures` fits one
temperature per depth on the held-out positions (minimum NLL of the base model's choice: a proper
scoring rule, so the probabilities become calibrated), down to the deepest depth a dynamic tree
may unroll (`MAX_UNROLL`); train-heads stores them in the heads' config.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attention.precision import autocast, get_policy
from medusa_engine.atomic import atomic_write
from medusa_engine.config import HeadsConfig
from medusa_engine.recurrent_heads import MAX_UNROLL, RecurrentHeads
from medusa_engine.train_data import Example

log = logging.getLogger(__name__)


@dataclass
class Features:
    """Cached base-model features of a list of examples (CPU tensors)."""

    hidden_TE: torch.Tensor  # bf16
    tokens_T: torch.Tensor  # int64, x_t
    argmax_T: torch.Tensor  # int64, a_t
    depths_T: torch.Tensor  # int64, how many depths (<= max_depth) position t can be trained on
    example_T: torch.Tensor  # int64, which example position t belongs to

    def __len__(self) -> int:
        return int(self.tokens_T.shape[0])

    def select(self, examples: torch.Tensor) -> torch.Tensor:
        """Positions of the given examples that have at least one trainable depth."""
        keep = torch.isin(self.example_T, examples) & (self.depths_T > 0)
        return keep.nonzero()[:, 0]


def features_key(model_name: str, examples: list[Example]) -> str:
    h = hashlib.sha256(model_name.encode())
    for e in examples:
        h.update(json.dumps([e.start, e.ids]).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def compute_features(
    model: Any,
    examples: list[Example],
    max_depth: int,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Features:
    """Run the frozen base model over `examples` (longest last, to pad little)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    parts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for lo in range(0, len(order), batch_size):
        rows = order[lo : lo + batch_size]
        width = max(len(examples[i].ids) for i in rows)
        ids_BT = torch.zeros(len(rows), width, dtype=torch.int64)
        mask_BT = torch.zeros(len(rows), width, dtype=torch.int64)
        for b, i in enumerate(rows):
            ids_BT[b, : len(examples[i].ids)] = torch.tensor(examples[i].ids)
            mask_BT[b, : len(examples[i].ids)] = 1
        out = model.decoder(
            input_ids=ids_BT.to(model.device), attention_mask=mask_BT.to(model.device),
            use_cache=False,
        )  # fmt: skip
        hidden_BTE = out.last_hidden_state
        argmax_BT = model.logits(hidden_BTE).argmax(-1).cpu()
        for b, i in enumerate(rows):
            lo_t, hi_t = examples[i].start - 1, len(examples[i].ids)
            parts[i] = (
                hidden_BTE[b, lo_t:hi_t].to(torch.bfloat16).cpu(),
                ids_BT[b, lo_t:hi_t],
                argmax_BT[b, lo_t:hi_t],
            )
        if progress:
            progress(len(rows))
    hidden, tokens, argmax, depths, example = [], [], [], [], []
    for i in range(len(examples)):
        h, x, a = parts[i]
        n = x.shape[0]
        hidden.append(h)
        tokens.append(x)
        argmax.append(a)
        depths.append((n - 1 - torch.arange(n)).clamp(max=max_depth))
        example.append(torch.full((n,), i, dtype=torch.int64))
    return Features(torch.cat(hidden), torch.cat(tokens), torch.cat(argmax), torch.cat(depths),
                    torch.cat(example))  # fmt: skip


def save_features(path: Path, features: Features, key: str) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in asdict(features).items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"key": key}))


def load_features(path: Path, key: str) -> Features | None:
    """The cached features, or None when absent or computed for other examples / model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
    return Features(**load_file(str(path)))


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
        self, heads: RecurrentHeads, embed_VE: torch.Tensor, lm_VE: torch.Tensor,
        decay: float, feature_weight: float,
    ) -> None:  # fmt: skip
        super().__init__()
        self.heads = heads
        self.embed_VE = embed_VE
        vocab_M = heads.draft_vocab_M
        self.lm_ME = lm_VE[vocab_M.to(lm_VE.device)].float()
        self.to_draft_V = torch.full((lm_VE.shape[0],), -100, dtype=torch.int64)
        self.to_draft_V[vocab_M.cpu()] = torch.arange(vocab_M.numel())
        self.decay, self.feature_weight = decay, feature_weight

    def forward(self, features: Features, positions_B: torch.Tensor) -> Any:
        """(loss, top-1 hits per depth, positions per depth) for a batch of positions."""
        heads, f = self.heads, features
        device = self.lm_ME.device
        d_max = heads.num_heads
        state_BE = f.hidden_TE[positions_B].to(device).float()
        depths_B = f.depths_T[positions_B].to(device)
        total = state_BE.new_zeros(())
        hits, counts = torch.zeros(d_max, dtype=torch.int64), torch.zeros(d_max, dtype=torch.int64)
        for d in range(1, d_max + 1):
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
            hits[d - 1] = int(((logits_BM.argmax(-1) == target_B) & valid_B).sum())
            counts[d - 1] = int(valid_B.sum())
        return total, hits, counts


def make_recurrent_heads(model: Any, cfg: Any, vocab_M: torch.Tensor) -> RecurrentHeads:
    heads = RecurrentHeads(HeadsConfig(
        cfg.num_heads, 1, model.hidden_size, model.vocab_size, True, model.name,
        kind="recurrent", ffn_size=cfg.ffn_size, draft_vocab=int(vocab_M.numel()),
    ))  # fmt: skip
    heads.set_draft_vocab(vocab_M)
    return heads


@torch.no_grad()
def evaluate_recurrent(
    model: Any, heads: RecurrentHeads, features: Features, positions: torch.Tensor,
    batch_size: int = 1024, precision: str = "fp32",
) -> dict[str, Any]:  # fmt: skip
    """Per-depth top-1/top-5 of the base model's own choice, teacher-forced, on `positions`."""
    policy = get_policy(precision)
    heads = heads.to(model.device).eval()
    lm_VE = model.lm_head.weight.detach()
    embed_VE = model.model.get_input_embeddings().weight.detach()
    lm_ME = lm_VE[heads.draft_vocab_M].float()
    vocab_M = heads.draft_vocab_M.cpu()
    d_max = heads.num_heads
    hits1, hits5, counts = [0] * d_max, [0] * d_max, [0] * d_max
    f = features
    for lo in range(0, len(positions), batch_size):
        p_B = positions[lo : lo + batch_size]
        with autocast(policy, model.device):
            state_BE = f.hidden_TE[p_B].to(model.device).float()
            for d in range(1, d_max + 1):
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
    return {
        "base_top1": base,
        "draft_vocab_coverage": in_vocab,
        "heads": [{"head": k, "top1": hits1[k] / max(counts[k], 1),
                   "top5": hits5[k] / max(counts[k], 1), "tokens": counts[k]}
                  for k in range(d_max)],
    }  # fmt: skip


@torch.no_grad()
def fit_confidence_temperatures(
    model: Any, heads: RecurrentHeads, features: Features, positions: torch.Tensor,
    max_positions: int = 4096,
) -> list[dict[str, float]]:  # fmt: skip
    """Per depth 1..MAX_UNROLL * K, teacher-forced on (up to `max_positions` of) `positions`:
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
        z_y = z_BM.gather(1, target_B.to(device)[keep][:, None])[:, 0]

        def nll(beta: float, z_BM: torch.Tensor = z_BM, z_y: torch.Tensor = z_y) -> float:
            return float((torch.logsumexp(beta * z_BM, -1) - beta * z_y).mean())

        lo, hi = 0.1, 3.0  # golden-section search on beta = 1 / T (NLL is convex in beta)
        g = (5**0.5 - 1) / 2
        for _ in range(30):
            a, b = hi - g * (hi - lo), lo + g * (hi - lo)
            lo, hi = (lo, b) if nll(a) < nll(b) else (a, hi)
        beta = (lo + hi) / 2
        top1 = z_BM.argmax(-1) == target_B.to(device)[keep]
        out.append({
            "depth": d, "temperature": round(1 / beta, 4), "positions": int(keep.sum()),
            "top1": float(top1.float().mean()),
            "confidence": float(torch.softmax(z_BM, -1).amax(-1).mean()),
            "calibrated_confidence": float(torch.softmax(beta * z_BM, -1).amax(-1).mean()),
        })  # fmt: skip
    return out


def train_recurrent(
    model: Any,
    features: Features,
    positions: torch.Tensor,
    cfg: Any,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    accelerator: Any = None,
    on_step: Callable[[int, float, list[float]], None] | None = None,
) -> Any:
    """Train recurrent heads on the cached `features` at `positions`; returns a TrainResult."""
    from accelerate import Accelerator

    from medusa_engine.train_heads import optimize

    acc = accelerator or Accelerator(cpu=model.device.type == "cpu")
    model.model.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    vocab_M = draft_vocabulary(features, positions, cfg.draft_vocab or model.vocab_size,
                               model.vocab_size)  # fmt: skip
    heads = make_recurrent_heads(model, cfg, vocab_M).to(acc.device)
    embed_VE = model.model.get_input_embeddings().weight.detach()
    module = RecurrentLoss(heads, embed_VE, model.lm_head.weight.detach(), cfg.decay,
                           cfg.feature_weight)  # fmt: skip

    def batch_loss(rows: list[int], module: Any) -> Any:
        return module(features, positions[rows])

    return optimize(heads, module, batch_loss, cfg, len(positions), "positions", acc,
                    checkpoint_path, resume, on_step)  # fmt: skip
