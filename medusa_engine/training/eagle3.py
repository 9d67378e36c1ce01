"""EAGLE-3 heads (`eagle3.py`) trained with training-time test: loss, training, held-out
accuracy per depth, confidence temperatures.

Shape legend (ARCHITECTURE.md): B examples in a batch, T tokens, C = T - 1 chains, E hidden size,
X = 3E, H query heads, G key/value heads, D head dim, M draft vocabulary, J draft steps.

Features: the frozen base model's three aux layers' outputs and its own next-token choices a_t.
`Eagle3Features` computes them once for every example (bf16, 3E per token: 3.5 kB for SmolLM2)
and `train-heads` caches them on disk beside the checkpoint, so each step costs only the draft
layer: on the 2-core CPU, recomputing them per batch made a SmolLM2 step several times slower
than the draft layer's forward and backward. Without features, `Eagle3Loss` computes them per
batch (the tests' small runs).

Training-time test (EAGLE-3, Sec. 3.2): chain p starts at base position p. Step 0 reads
h^0_p = fc(aux_p) and x_{p+1}; step j >= 1 reads h^j_p = s^{j-1}_p (the draft's own state) and
x_{p+1+j}, at position p + j; each step predicts the base model's choice a_{p+1+j}. Step j of
chain p attends to step 0 of chains <= p (the draft cache: verified positions) and to steps
1..j of chain p itself (its tree ancestors): exactly what a tree node at depth j + 1 sees
when drafting (`eagle3.Eagle3Drafter`). Loss: Σ_j λ^j CE(logits^j, a_{p+1+j}) over chains whose
target lies in the answer; targets outside the draft vocabulary are skipped (and count as
misses in the accuracies). The tokens x are the example's (self-distilled: the base model's own
greedy answers, so x = a along them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from attention.precision import autocast, get_policy
from attention.state_files import atomic_write
from medusa_engine.eagle3 import MAX_UNROLL, Eagle3Config, Eagle3Heads, default_aux_layers
from medusa_engine.training.config import TrainConfig, TrainResult
from medusa_engine.training.data import Example
from medusa_engine.training.loop import OnStep, optimize, setup
from medusa_engine.training.recurrent import _nll_optimal_beta


def draft_vocabulary(examples: list[Example], size: int, vocab: int) -> torch.Tensor:
    """The `size` most frequent answer tokens of the examples (ties: lower id), increasing."""
    counts = Counter(t for e in examples for t in e.ids[e.start :])
    ranked = sorted(range(vocab), key=lambda t: (-counts[t], t))
    return torch.tensor(sorted(ranked[:size]), dtype=torch.int64)


def make_heads(
    model: Any, cfg: TrainConfig, vocab_M: torch.Tensor, aux_layers: tuple[int, ...] = ()
) -> Eagle3Heads:
    """Fresh heads with the base model's attention geometry; lm_head and norm start from the
    base model's rows of the draft vocabulary and its final norm."""
    c = model.text_config
    heads_n = int(c.num_attention_heads)
    config = Eagle3Config(
        hidden_size=model.hidden_size,
        vocab_size=model.vocab_size,
        draft_vocab_size=int(vocab_M.numel()),
        num_attention_heads=heads_n,
        num_key_value_heads=int(getattr(c, "num_key_value_heads", None) or heads_n),
        head_dim=int(getattr(c, "head_dim", None) or model.hidden_size // heads_n),
        intermediate_size=int(c.intermediate_size),
        rms_norm_eps=float(getattr(c, "rms_norm_eps", 1e-6)),
        rope_theta=float(_rope_theta(c)),
        max_position_embeddings=int(getattr(c, "max_position_embeddings", 2048)),
        aux_layers=aux_layers or default_aux_layers(int(c.num_hidden_layers)),
        num_heads=cfg.num_heads,
        base_model=model.name,
    )
    heads = Eagle3Heads(config)
    heads.set_draft_vocab(vocab_M)
    with torch.no_grad():
        heads.lm_head.weight.copy_(model.lm_head.weight.detach()[vocab_M].float())
        final_norm = getattr(model.model.get_decoder(), "norm", None)
        if final_norm is not None:
            heads.norm.weight.copy_(final_norm.weight.detach().float())
    return heads


def _rope_theta(c: Any) -> float:
    params = getattr(c, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(c, "rope_theta", None) or 10000.0)


def _pad(examples: list[Example], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids_BT (right-padded with 0) and lengths_B."""
    lengths = torch.tensor([len(examples[i].ids) for i in rows])
    ids_BT = torch.zeros(len(rows), int(lengths.max()), dtype=torch.int64)
    for b, i in enumerate(rows):
        ids_BT[b, : lengths[b]] = torch.tensor(examples[i].ids)
    return ids_BT, lengths


@torch.no_grad()
def base_features(
    model: Any, ids_BT: torch.Tensor, layers: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux_BTX, a_BT): the outputs of decoder layers `layers` and the base's next-token choice."""
    out = model.decoder(input_ids=ids_BT, output_hidden_states=True, use_cache=False)
    aux_BTX = torch.cat([out.hidden_states[k + 1] for k in layers], dim=-1)
    return aux_BTX.float(), model.logits(out.last_hidden_state).argmax(-1)


@dataclass
class Eagle3Features:
    """Base features of a list of examples, concatenated: example i owns rows
    offsets_N1[i]:offsets_N1[i + 1] (CPU tensors)."""

    aux_TX: torch.Tensor  # bf16, the aux layers' outputs at every position
    argmax_T: torch.Tensor  # int64, a_t
    offsets_N1: torch.Tensor  # int64

    def __len__(self) -> int:
        return int(self.offsets_N1.numel()) - 1

    def part(self, lo: int, hi: int) -> Eagle3Features:
        """The features of examples lo..hi-1 (views, no copy)."""
        return Eagle3Features(self.aux_TX, self.argmax_T, self.offsets_N1[lo : hi + 1])

    def batch(self, rows: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux_BTX float, a_BT) of the examples `rows`, right-padded with zeros to `width`."""
        aux_BTX = torch.zeros(len(rows), width, self.aux_TX.shape[1])
        a_BT = torch.zeros(len(rows), width, dtype=torch.int64)
        for b, i in enumerate(rows):
            lo, hi = int(self.offsets_N1[i]), int(self.offsets_N1[i + 1])
            aux_BTX[b, : hi - lo] = self.aux_TX[lo:hi]
            a_BT[b, : hi - lo] = self.argmax_T[lo:hi]
        return aux_BTX, a_BT


@torch.no_grad()
def compute_features(
    model: Any,
    examples: list[Example],
    layers: tuple[int, ...],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Eagle3Features:
    """`base_features` of every example (batches of similar lengths, to pad little)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    parts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for lo in range(0, len(order), batch_size):
        rows = order[lo : lo + batch_size]
        ids_BT, lengths_B = _pad(examples, rows)
        aux_BTX, a_BT = base_features(model, ids_BT.to(model.device), layers)
        for b, i in enumerate(rows):
            n = int(lengths_B[b])
            parts[i] = (aux_BTX[b, :n].to(torch.bfloat16).cpu(), a_BT[b, :n].cpu())
        if progress:
            progress(len(rows))
    sizes = torch.tensor([len(e.ids) for e in examples])
    return Eagle3Features(
        torch.cat([parts[i][0] for i in range(len(examples))]),
        torch.cat([parts[i][1] for i in range(len(examples))]),
        torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]),
    )


def save_features(path: Path, features: Eagle3Features, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "aux_TX": features.aux_TX.contiguous(),
        "argmax_T": features.argmax_T.contiguous(),
        "offsets_N1": features.offsets_N1.contiguous(),
    }
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"key": key}))


def load_features(path: Path, key: str) -> Eagle3Features | None:
    """The cached features, or None when absent or computed for other examples / model / layers."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
    return Eagle3Features(**load_file(str(path)))


def _repeat_kv(x_BGCD: torch.Tensor, heads: int) -> torch.Tensor:
    return x_BGCD.repeat_interleave(heads // x_BGCD.shape[1], dim=1)


def unroll(
    heads: Eagle3Heads, aux_BCX: torch.Tensor, emb_BTE: torch.Tensor, steps: int
) -> list[torch.Tensor]:
    """states s_BCE (pre-norm) of each of `steps` training-time-test steps (see the module
    docstring); `heads.logits` scores them (callers score only the rows with a target).

    `aux_BCX`: features of positions 0..C-1; `emb_BTE`: embeddings of x_0..x_{T-1}; step j reads
    x_{p+1+j} (past the end: the last token, its loss masked by the caller)."""
    b, c_len = aux_BCX.shape[:2]
    cfg, layer = heads.config, heads.midlayer
    h_BCE = heads.fc(aux_BCX)
    causal_CC = torch.ones(c_len, c_len, dtype=torch.bool, device=aux_BCX.device).tril()
    keys: list[tuple[torch.Tensor, torch.Tensor]] = []  # (k, v) of steps 0..j, [B, H, C, D]
    out = []
    for j in range(steps):
        at = (torch.arange(c_len, device=aux_BCX.device) + 1 + j).clamp(max=emb_BTE.shape[1] - 1)
        pos = torch.arange(c_len, device=aux_BCX.device) + j
        cos, sin = heads.rope(pos)
        q, k, v = layer.qkv(
            emb_BTE[:, at].flatten(0, 1), h_BCE.flatten(0, 1), cos.repeat(b, 1), sin.repeat(b, 1)
        )
        q_BHCD = q.view(b, c_len, *q.shape[1:]).transpose(1, 2)
        k_BHCD = _repeat_kv(k.view(b, c_len, *k.shape[1:]).transpose(1, 2), cfg.num_attention_heads)
        v_BHCD = _repeat_kv(v.view(b, c_len, *v.shape[1:]).transpose(1, 2), cfg.num_attention_heads)
        keys.append((k_BHCD, v_BHCD))
        scale = cfg.head_dim**-0.5
        k0, v0 = keys[0]
        scores = [(q_BHCD @ k0.transpose(-1, -2) * scale).masked_fill(~causal_CC, float("-inf"))]
        scores += [(q_BHCD * ki).sum(-1, keepdim=True) * scale for ki, _ in keys[1:]]
        weights = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(q_BHCD.dtype)
        attn = weights[..., :c_len] @ v0
        for i, (_, vi) in enumerate(keys[1:]):
            attn = attn + weights[..., c_len + i : c_len + i + 1] * vi
        attn_BCHD = attn.transpose(1, 2).flatten(0, 1)
        s_BCE = layer.finish(attn_BCHD, h_BCE.flatten(0, 1)).view(b, c_len, -1)
        out.append(s_BCE)
        h_BCE = s_BCE
    return out


class Eagle3Loss(nn.Module):
    """Heads + the loss; the base model, its embedding and the targets' map are attributes."""

    def __init__(
        self,
        heads: Eagle3Heads,
        model: Any,
        examples: list[Example],
        decay: float,
        features: Eagle3Features | None = None,
    ):
        super().__init__()
        self.heads, self.decay = heads, decay
        self._base = [model]  # not a submodule: frozen, never wrapped or saved
        self.examples, self.features = examples, features
        if features is not None and len(features) != len(examples):
            raise ValueError(f"{len(features)} examples' features for {len(examples)} examples")
        self.to_draft_V = torch.full((model.vocab_size,), -1, dtype=torch.int64)
        self.to_draft_V[heads.draft_vocab_M.cpu()] = torch.arange(heads.d2t.numel())

    def targets(self, rows: list[int], steps: int) -> tuple[torch.Tensor, ...]:
        """(aux_BCX, emb_BTE, target_JBC): the draft id of step j of chain p's target, -1 for a
        target outside the draft vocabulary (a miss), -100 where there is no target."""
        model = self._base[0]
        ids_BT, lengths_B = _pad(self.examples, rows)
        ids_BT = ids_BT.to(model.device)
        if self.features is None:
            aux_BTX, a_BT = base_features(model, ids_BT, self.heads.config.aux_layers)
        else:
            aux_BTX, a_BT = self.features.batch(rows, ids_BT.shape[1])
            aux_BTX = aux_BTX.to(model.device)
        emb_BTE = model.embed_tokens(ids_BT).detach().float()
        c_len = ids_BT.shape[1] - 1
        p_C = torch.arange(c_len)
        start_B = torch.tensor([self.examples[i].start for i in rows])
        target = []
        for j in range(steps):
            at_C = (p_C + 1 + j).clamp(max=c_len)
            draft_BC = self.to_draft_V[a_BT[:, at_C].cpu()]
            valid_BC = (p_C[None] + 1 + j < lengths_B[:, None]) & (
                p_C[None] >= start_B[:, None] - 1
            )
            target.append(torch.where(valid_BC, draft_BC, -100))
        return aux_BTX[:, :c_len], emb_BTE, torch.stack(target).to(model.device)

    def forward(self, rows: list[int]) -> Any:
        """(loss, top-1 hits_J, counts_J) of the examples `rows`."""
        j_steps = self.heads.num_heads
        aux_BCX, emb_BTE, target_JBC = self.targets(rows, j_steps)
        states = unroll(self.heads, aux_BCX, emb_BTE, j_steps)
        total = aux_BCX.new_zeros(())
        hits, counts = (
            torch.zeros(j_steps, dtype=torch.int64),
            torch.zeros(j_steps, dtype=torch.int64),
        )
        for j, s_BCE in enumerate(states):
            t = target_JBC[j]
            scored = t >= 0  # only these rows go through the draft LM head
            if bool(scored.any()):
                logits_NM = self.heads.logits(s_BCE[scored]).float()
                total = total + self.decay**j * F.cross_entropy(logits_NM, t[scored])
                hits[j] = int((logits_NM.argmax(-1) == t[scored]).sum())
            counts[j] = int((t != -100).sum())
        return total, hits, counts


def train(
    model: Any,
    train_ex: list[Example],
    cfg: TrainConfig,
    checkpoint_path: Any = None,
    resume: bool = False,
    accelerator: Any = None,
    on_step: OnStep | None = None,
    aux_layers: tuple[int, ...] = (),
    features: Eagle3Features | None = None,
) -> TrainResult:
    """Train EAGLE-3 heads on `train_ex` (`loop.optimize`: resumable atomic checkpoints), reading
    `features` (`compute_features` of `train_ex` with the heads' aux layers) when given."""
    acc = setup(model, cfg, accelerator)
    size = min(cfg.draft_vocab or model.vocab_size, model.vocab_size)
    vocab_M = draft_vocabulary(train_ex, size, model.vocab_size)
    heads = make_heads(model, cfg, vocab_M, aux_layers).to(acc.device)
    module = Eagle3Loss(heads, model, train_ex, cfg.decay, features)

    def batch_loss(rows: list[int], wrapped: Any) -> Any:
        return wrapped(rows)

    return optimize(
        heads, module, batch_loss, cfg, len(train_ex), acc, checkpoint_path, resume, on_step
    )


@torch.no_grad()
def evaluate(
    model: Any,
    heads: Eagle3Heads,
    examples: list[Example],
    batch_size: int = 8,
    precision: str = "fp32",
    features: Eagle3Features | None = None,
) -> dict[str, Any]:
    """Per-depth top-1/top-5 of the base model's own choice on held-out `examples` (training-time
    test: each depth reads the draft's own states), then the NLL-optimal confidence temperature
    per depth down to MAX_UNROLL * J."""
    heads = heads.to(model.device).eval()
    loss = Eagle3Loss(heads, model, examples, 1.0, features)
    depths = MAX_UNROLL * heads.num_heads
    hits1, hits5, counts = [0] * depths, [0] * depths, [0] * depths
    logits_of: list[list[torch.Tensor]] = [[] for _ in range(depths)]
    targets_of: list[list[torch.Tensor]] = [[] for _ in range(depths)]
    base_hits = base_counts = 0
    for lo in range(0, len(examples), batch_size):
        rows = list(range(lo, min(lo + batch_size, len(examples))))
        with autocast(get_policy(precision), model.device):
            aux_BCX, emb_BTE, target_JBC = loss.targets(rows, depths)
            states = unroll(heads, aux_BCX, emb_BTE, depths)
            for j, s_BCE in enumerate(states):
                t = target_JBC[j]
                scored = t >= 0
                logits_NM = heads.logits(s_BCE[scored]).float()
                top5 = logits_NM.topk(min(5, logits_NM.shape[-1]), dim=-1).indices
                hits1[j] += int((top5[:, 0] == t[scored]).sum())
                hits5[j] += int((top5 == t[scored][:, None]).any(-1).sum())
                counts[j] += int((t != -100).sum())  # targets outside the vocabulary: misses
                logits_of[j].append(logits_NM.cpu())
                targets_of[j].append(t[scored].cpu())
        ids_BT, lengths_B = _pad(examples, rows)
        if features is None:
            _, a_BT = base_features(model, ids_BT.to(model.device), heads.config.aux_layers)
        else:
            a_BT = features.batch(rows, ids_BT.shape[1])[1]
        for b, i in enumerate(rows):
            s, n = examples[i].start, int(lengths_B[b])
            base_hits += int((a_BT[b, s - 1 : n - 1].cpu() == ids_BT[b, s:n]).sum())
            base_counts += n - s
    per_depth = [
        {
            "head": j,
            "top1": hits1[j] / max(counts[j], 1),
            "top5": hits5[j] / max(counts[j], 1),
            "tokens": counts[j],
        }
        for j in range(depths)
    ]
    calibration = []
    for j in range(depths):
        z = torch.cat(logits_of[j]) if logits_of[j] else torch.zeros(0, 1)
        if z.shape[0] == 0:
            break
        y = torch.cat(targets_of[j])
        z_y = z.gather(1, y[:, None])[:, 0]
        beta = _nll_optimal_beta(z, z_y)
        calibration.append(
            {
                "depth": j + 1,
                "temperature": round(1 / beta, 4),
                "positions": int(z.shape[0]),
                "top1": float((z.argmax(-1) == y).float().mean()),
                "confidence": float(torch.softmax(z, -1).amax(-1).mean()),
                "calibrated_confidence": float(torch.softmax(beta * z, -1).amax(-1).mean()),
            }
        )
    return {
        "base_top1": base_hits / max(base_counts, 1),
        "heads": per_depth[: heads.num_heads],
        "unrolled": per_depth[heads.num_heads :],
        "calibration": calibration,
    }
