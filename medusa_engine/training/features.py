"""Base-model features for recurrent heads, computed once and cached on disk.

Shape legend (ARCHITECTURE.md): B = examples in a batch, T = tokens (of a forward; in `Features`,
the cached positions of all examples), E = hidden size.

The frozen base model runs once over every example; for each position t from the one before the
first answer token to the end it keeps h_t (the last hidden state, bf16), the token x_t and the
base model's own next-token choice a_t = argmax(lm_head(h_t)). They are cached in one safetensors
file (written atomically, reused when the examples and model match), so each epoch costs only
the heads, far cheaper than the base forward for recurrent heads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from attention.state_files import atomic_write
from medusa_engine.training.data import Example


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
    """A digest of the model name and the examples: the cache's validity check."""
    h = hashlib.sha256(model_name.encode())
    for e in examples:
        h.update(json.dumps([e.start, e.ids]).encode())
    return h.hexdigest()[:16]


def _pad(examples: list[Example], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids_BT and attention mask_BT of the examples `rows`."""
    width = max(len(examples[i].ids) for i in rows)
    ids_BT = torch.zeros(len(rows), width, dtype=torch.int64)
    mask_BT = torch.zeros(len(rows), width, dtype=torch.int64)
    for b, i in enumerate(rows):
        ids_BT[b, : len(examples[i].ids)] = torch.tensor(examples[i].ids)
        mask_BT[b, : len(examples[i].ids)] = 1
    return ids_BT, mask_BT


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
        ids_BT, mask_BT = _pad(examples, rows)
        out = model.decoder(
            input_ids=ids_BT.to(model.device),
            attention_mask=mask_BT.to(model.device),
            use_cache=False,
        )
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
    sizes = [parts[i][1].shape[0] for i in range(len(examples))]
    return Features(
        torch.cat([parts[i][0] for i in range(len(examples))]),
        torch.cat([parts[i][1] for i in range(len(examples))]),
        torch.cat([parts[i][2] for i in range(len(examples))]),
        torch.cat([(n - 1 - torch.arange(n)).clamp(max=max_depth) for n in sizes]),
        torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(sizes)]),
    )


def save_features(path: Path, features: Features, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in asdict(features).items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"key": key}))


def load_features(path: Path, key: str) -> Features | None:
    """The cached features, or None when absent or computed for other examples / model."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
    return Features(**load_file(str(path)))
