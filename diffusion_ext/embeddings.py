"""Patchify, 2D sin-cos positions, timestep and class embeddings of a DiT.

Shape legend: B batch, C image channels, H/W image height/width, P patch size, T tokens
(= (H/P) * (W/P)), E embedding width, F sinusoid frequencies.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def patchify(x_BCHW: torch.Tensor, patch: int) -> torch.Tensor:
    """Image -> tokens x_BTE with E = P*P*C, tokens in row-major patch order, (p, q, c) inside."""
    b, c, h, w = x_BCHW.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not divisible by patch size {patch}")
    x = x_BCHW.reshape(b, c, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 3, 5, 1)  # b, h', w', p, q, c
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(x_BTE: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """Inverse of `patchify` for a square grid: x_BTE (E = P*P*C) -> x_BCHW."""
    b, t, e = x_BTE.shape
    side = math.isqrt(t)
    if side * side != t or e != patch * patch * channels:
        raise ValueError(f"cannot unpatchify {tuple(x_BTE.shape)} with patch {patch}, C {channels}")
    x = x_BTE.reshape(b, side, side, patch, patch, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # b, c, h', p, w', q
    return x.reshape(b, channels, side * patch, side * patch)


def sincos_1d(dim: int, pos_T: torch.Tensor) -> torch.Tensor:
    """[T, dim] = [sin(pos * w_f), cos(pos * w_f)], w_f = 10000^(-f / (dim/2)) (Vaswani et al.)."""
    if dim % 2:
        raise ValueError(f"sin-cos width must be even, got {dim}")
    omega_F = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles_TF = pos_T.to(torch.float64)[:, None] * omega_F[None]
    return torch.cat([angles_TF.sin(), angles_TF.cos()], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D positions pos_TE (float32, T = grid^2): half the width for rows, half for columns."""
    if dim % 4:
        raise ValueError(f"2D sin-cos width must be divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], 1)
    return emb.float()


def timestep_features(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, [B, dim], float32."""
    half = dim // 2
    freqs_F = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half
    )
    args_BF = t_B.float()[:, None] * freqs_F[None]
    emb = torch.cat([torch.cos(args_BF), torch.sin(args_BF)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t_B (the process's model time, roughly 0..1000) -> c_BE through sinusoids and an MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        features_BF = timestep_features(t_B, self.freq_dim)  # fp32
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        # Weights stored in bf16/fp16 without autocast (inference) need inputs of their dtype.
        return self.mlp(features_BF.to(first.weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels y_B -> c_BE. Row `num_classes` is the null class used for classifier-free
    guidance; during training labels are replaced by it with probability `dropout` (Ho &
    Salimans, 2022), drawn from the caller's generator."""

    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def drop(
        self, y_B: torch.Tensor, dropout: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """y_B with each label replaced by the null class with probability `dropout`."""
        if dropout <= 0:
            return y_B
        u_B = torch.rand(y_B.shape, generator=generator, device=y_B.device)
        return torch.where(u_B < dropout, torch.full_like(y_B, self.null_class), y_B)

    def forward(self, y_B: torch.Tensor) -> torch.Tensor:
        if y_B.dtype != torch.long:
            raise ValueError(f"labels must be int64, got {y_B.dtype}")
        if bool(((y_B < 0) | (y_B > self.num_classes)).any()):
            raise ValueError(
                f"labels must be in [0, {self.num_classes}] ({self.num_classes} = null)"
            )
        return self.table(y_B)
