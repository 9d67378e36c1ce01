"""Captions computed from the digits, a word-level tokenizer and a tiny text encoder.

Shape legend: N images, B batch, C = 1 channel, H = W = 8, L tokens (`MAX_TOKENS`), E width,
V vocabulary.

Captions ("a bold seven slanted left") describe three things measured on the image itself:

* the class word (zero..nine);
* ink: `ink_mass` = sum of the pixels mapped to [0, 1] (0 = paper, 1 = full ink); below the
  class's lower tertile (train split) the digit is "thin", above its upper tertile "bold", and in
  between it gets no ink word. Tertiles are per class because a one simply has less ink than an
  eight.
* slant: from the image's second-order central moments (Hu, 1962): with x the column, r the row
  (growing downwards) and ink weights, shear = -mu11 / mu02 is how many columns the stroke moves
  right per row upwards; below the class's lower tertile it is "slanted left", above the upper
  "slanted right", else "upright".

Training captions keep each attribute phrase with probability `keep` (so "a seven", "a thin
seven" and "a seven upright" are all prompts the model has seen), and the class word always;
classifier-free guidance uses the empty prompt (all padding) as the null condition.

The encoder (`TextEncoder`) is a 2-layer pre-LN transformer over word embeddings plus learned
positions, trained jointly with the MM-DiT from scratch: the 19-word vocabulary is synthetic, so
there is no pretrained encoder to reuse, and joint training lets the encoder learn exactly the
distinctions the denoiser needs (class, ink, slant, word order in "slanted left") without a
separate contrastive stage and its extra budget. It returns the token states (the MM-DiT's text
stream) and a pooled vector (the mean over the non-padding tokens, a learned null vector for the
empty prompt) that joins the timestep in the adaLN conditioning, as SD3's pooled CLIP vector does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attention.api import attention
from attention.precision import norm_fp32

DIGIT_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
INK_WORDS: tuple[str, ...] = ("thin", "", "bold")  # below / between / above the tertiles
SLANT_WORDS: tuple[str, ...] = ("slanted left", "upright", "slanted right")
PAD = "<pad>"
VOCAB: tuple[str, ...] = (PAD, "a", "an", *DIGIT_WORDS, "thin", "bold", "slanted", "left")
VOCAB = (*VOCAB, "right", "upright")
MAX_TOKENS = 8


def ink_mass(x_NCHW: torch.Tensor) -> torch.Tensor:
    """Total ink per image [N]: pixels in [-1, 1] mapped to [0, 1] and summed."""
    return ((x_NCHW.float() + 1.0) / 2.0).clamp(0.0, 1.0).flatten(1).sum(1)


def shear(x_NCHW: torch.Tensor) -> torch.Tensor:
    """Slant per image [N] from central moments: -mu11 / mu02 (> 0 leans right), ink-weighted."""
    w_NHW = ((x_NCHW[:, 0].float() + 1.0) / 2.0).clamp(0.0, 1.0)
    n, h, w = w_NHW.shape
    rows_HW, cols_HW = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    mass_N = w_NHW.sum((1, 2)).clamp_min(1e-6)
    r_N = (w_NHW * rows_HW).sum((1, 2)) / mass_N
    c_N = (w_NHW * cols_HW).sum((1, 2)) / mass_N
    dr_NHW = rows_HW - r_N[:, None, None]
    dc_NHW = cols_HW - c_N[:, None, None]
    mu11_N = (w_NHW * dr_NHW * dc_NHW).sum((1, 2))
    mu02_N = (w_NHW * dr_NHW**2).sum((1, 2)).clamp_min(1e-6)
    return -mu11_N / mu02_N


@dataclass(frozen=True)
class Attributes:
    """Per-image attribute indices: ink_N in {0 thin, 1 middle, 2 bold}, slant_N in {0 left,
    1 upright, 2 right} (int64)."""

    ink_N: torch.Tensor
    slant_N: torch.Tensor


def _tertile_bins(v_N: torch.Tensor, y_N: torch.Tensor, num_classes: int) -> torch.Tensor:
    """0 / 1 / 2 for values below / between / above their class's tertiles."""
    out_N = torch.ones_like(y_N)
    for k in range(num_classes):
        sel = y_N == k
        if not bool(sel.any()):
            continue
        lo, hi = torch.quantile(v_N[sel], torch.tensor([1 / 3, 2 / 3])).tolist()
        out_N[sel & (v_N < lo)] = 0
        out_N[sel & (v_N > hi)] = 2
    return out_N


def attributes(x_NCHW: torch.Tensor, y_N: torch.Tensor, num_classes: int = 10) -> Attributes:
    """Ink and slant tertiles of each image within its class (computed on the images given)."""
    return Attributes(
        _tertile_bins(ink_mass(x_NCHW), y_N, num_classes),
        _tertile_bins(shear(x_NCHW), y_N, num_classes),
    )


def caption(label: int, ink: int | None = None, slant: int | None = None) -> str:
    """'a bold seven slanted left'; `ink` / `slant` None (or ink 1, the middle) leave it out."""
    ink_word = "" if ink is None else INK_WORDS[ink]
    words = [w for w in (ink_word, DIGIT_WORDS[label]) if w]
    article = "an" if words[0] == "eight" else "a"  # "a one", "an eight": by sound
    parts = [article, *words, "" if slant is None else SLANT_WORDS[slant]]
    return " ".join(p for p in parts if p)


def training_captions(
    y_B: torch.Tensor, attrs: Attributes, keep: float, generator: torch.Generator
) -> list[str]:
    """One caption per image; each attribute phrase kept with probability `keep`."""
    keep_B2 = torch.rand((y_B.shape[0], 2), generator=generator) < keep
    return [
        caption(
            int(y),
            int(i) if bool(k[0]) else None,
            int(s) if bool(k[1]) else None,
        )
        for y, i, s, k in zip(y_B, attrs.ink_N, attrs.slant_N, keep_B2, strict=True)
    ]


def tokenize(prompts: list[str]) -> torch.Tensor:
    """Prompts -> token ids [B, L] (int64, padded with 0); the empty prompt is all padding.

    Words are lower-cased and split on whitespace; a word outside `VOCAB` or a prompt longer
    than `MAX_TOKENS` words is a ValueError naming it.
    """
    index = {w: i for i, w in enumerate(VOCAB)}
    ids_BL = torch.zeros((len(prompts), MAX_TOKENS), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        words = prompt.lower().split()
        if len(words) > MAX_TOKENS:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most {MAX_TOKENS}")
        for j, word in enumerate(words):
            if word not in index or word == PAD:
                known = " ".join(VOCAB[1:])
                raise ValueError(f"unknown word {word!r} in prompt {prompt!r}; known: {known}")
            ids_BL[b, j] = index[word]
    return ids_BL


class _TextBlock(nn.Module):
    """Pre-LN transformer layer; attention through `attention.api` (no mask: padding is a learned
    token that every prompt of the same length shares)."""

    def __init__(self, width: int, heads: int, backend: str) -> None:
        super().__init__()
        self.heads, self.backend = heads, backend
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(approximate="tanh"), nn.Linear(2 * width, width)
        )

    def forward(self, h_BLE: torch.Tensor) -> torch.Tensor:
        b, t, e = h_BLE.shape
        qkv = self.qkv(norm_fp32(h_BLE, self.norm1)).reshape(b, t, 3, self.heads, e // self.heads)
        q_BNLD, k_BNLD, v_BNLD = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out_BNLD = attention(q_BNLD, k_BNLD, v_BNLD, backend=self.backend)
        assert isinstance(out_BNLD, torch.Tensor)
        h_BLE = h_BLE + self.proj(out_BNLD.transpose(1, 2).reshape(b, t, e))
        return h_BLE + self.mlp(norm_fp32(h_BLE, self.norm2))


class TextEncoder(nn.Module):
    """ids_BL -> (tokens_BLE, pooled_BE). Pooled = mean of the non-padding token states, or the
    learned `null` vector for an all-padding (empty) prompt."""

    def __init__(self, width: int, depth: int, heads: int, backend: str = "sdpa") -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), width)
        self.pos_LE = nn.Parameter(torch.randn(MAX_TOKENS, width) * 0.02)
        self.blocks = nn.ModuleList([_TextBlock(width, heads, backend) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.null_E = nn.Parameter(torch.zeros(width))

    def forward(self, ids_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids_BL.ndim != 2 or ids_BL.shape[1] != MAX_TOKENS or ids_BL.dtype != torch.long:
            raise ValueError(
                f"expected int64 ids [B, {MAX_TOKENS}], got {ids_BL.dtype} {tuple(ids_BL.shape)}"
            )
        h_BLE = self.embed(ids_BL) + self.pos_LE
        for block in self.blocks:
            h_BLE = block(h_BLE)
        h_BLE = norm_fp32(h_BLE, self.norm)
        real_BL = (ids_BL != 0).to(h_BLE.dtype)
        count_B = real_BL.sum(1, keepdim=True)
        mean_BE = (h_BLE * real_BL[..., None]).sum(1) / count_B.clamp_min(1.0)
        pooled_BE = torch.where(count_B > 0, mean_BE, self.null_E.to(mean_BE.dtype))
        return h_BLE, pooled_BE
