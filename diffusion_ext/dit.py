"""Diffusion Transformer (Peebles & Xie, 2023, "Scalable Diffusion Models with Transformers").

Shape legend: B batch, C channels, H/W image size, T tokens, E hidden width, N heads,
D head dim (E = N * D), M MLP width.

Paper's tricks, written out:

* adaLN-Zero (Sec. 3.2): the conditioning c = embed(t) + embed(y) regresses per-block shift,
  scale and gate for the attention and MLP branches; the regression layer is zero-initialised, so
  every gate is 0 and every block is the identity at initialisation. The final layer (adaLN +
  linear) is zero-initialised too, so the untrained model outputs zeros.
* QK-normalisation (Esser et al., 2024, SD3, Sec. 5.3.2): RMSNorm on queries and keys per head
  before attention keeps attention logits bounded in low precision.
* Attention runs through `attention.api.attention` with no mask and `config.attn_backend`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from attention.api import attention
from attention.precision import norm_fp32, rms_norm_fp32
from diffusion_ext.config import DiTConfig
from diffusion_ext.embeddings import (
    LabelEmbedder,
    TimestepEmbedder,
    patchify,
    sincos_2d,
    unpatchify,
)


def modulate(x_BTE: torch.Tensor, shift_BE: torch.Tensor, scale_BE: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, broadcast over tokens."""
    return x_BTE * (1 + scale_BE[:, None]) + shift_BE[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens, optional per-head RMS QK-norm."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.backend = config.attn_backend
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.q_norm = nn.Parameter(torch.ones(self.head_dim)) if config.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(self.head_dim)) if config.qk_norm else None

    def forward(self, x_BTE: torch.Tensor) -> torch.Tensor:
        b, t, e = x_BTE.shape
        qkv = self.qkv(x_BTE).reshape(b, t, 3, self.num_heads, self.head_dim)
        q_BNTD, k_BNTD, v_BNTD = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_norm is not None and self.k_norm is not None:
            q_BNTD = rms_norm_fp32(q_BNTD, self.q_norm)
            k_BNTD = rms_norm_fp32(k_BNTD, self.k_norm)
        # Under autocast the norms return the input dtype; make all three agree for the API.
        dtype = v_BNTD.dtype
        out_BNTD = attention(q_BNTD.to(dtype), k_BNTD.to(dtype), v_BNTD, backend=self.backend)
        assert isinstance(out_BNTD, torch.Tensor)
        return self.proj(out_BNTD.transpose(1, 2).reshape(b, t, e))


class DiTBlock(nn.Module):
    """x + gate_msa * Attn(modulate(LN(x))) then x + gate_mlp * MLP(modulate(LN(x)))."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        e = config.hidden_size
        m = int(e * config.mlp_ratio)
        self.norm1 = nn.LayerNorm(e, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(config)
        self.norm2 = nn.LayerNorm(e, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(e, m), nn.GELU(approximate="tanh"), nn.Linear(m, e))
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(e, 6 * e))

    def forward(self, x_BTE: torch.Tensor, c_BE: torch.Tensor) -> torch.Tensor:
        mods = self.ada_ln(c_BE).chunk(6, dim=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h_BTE = modulate(norm_fp32(x_BTE, self.norm1), shift_msa, scale_msa)
        x_BTE = x_BTE + gate_msa[:, None] * self.attn(h_BTE)
        h_BTE = modulate(norm_fp32(x_BTE, self.norm2), shift_mlp, scale_mlp)
        return x_BTE + gate_mlp[:, None] * self.mlp(h_BTE)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to P*P*C values per token."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        e = config.hidden_size
        self.norm = nn.LayerNorm(e, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(e, config.patch_size**2 * config.in_channels)
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(e, 2 * e))

    def forward(self, x_BTE: torch.Tensor, c_BE: torch.Tensor) -> torch.Tensor:
        shift_BE, scale_BE = self.ada_ln(c_BE).chunk(2, dim=-1)
        return self.linear(modulate(norm_fp32(x_BTE, self.norm), shift_BE, scale_BE))


class DiT(nn.Module):
    """eps/velocity predictor out_BCHW = DiT(x_BCHW, t_B, y_B).

    `t_B` is the process's model time (float, roughly 0..1000, see `schedules.Process.model_time`);
    `y_B` int64 labels in [0, num_classes], `num_classes` being the null class. The output has the
    input's shape; what it means (eps or velocity) is the process's business.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        e = config.hidden_size
        self.patch_embed = nn.Linear(config.patch_size**2 * config.in_channels, e)
        grid = config.image_size // config.patch_size
        self.register_buffer("pos_TE", sincos_2d(e, grid)[None], persistent=False)
        self.t_embed = TimestepEmbedder(e)
        self.y_embed = LabelEmbedder(config.num_classes, e)
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.depth)])
        self.final = FinalLayer(config)
        self.reset_parameters()

    @property
    def null_class(self) -> int:
        return self.y_embed.null_class

    def reset_parameters(self) -> None:
        """DiT's initialisation: Xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        for layer in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            assert isinstance(layer, nn.Linear)
            nn.init.normal_(layer.weight, std=0.02)
        blocks = [b for b in self.blocks if isinstance(b, DiTBlock)]
        for ada in [block.ada_ln[1] for block in blocks] + [self.final.ada_ln[1]]:
            assert isinstance(ada, nn.Linear)
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def embed(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus fixed 2D positions, x_BTE."""
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if x_BCHW.ndim != 4 or tuple(x_BCHW.shape[1:]) != expected:
            raise ValueError(
                f"expected x [B, {', '.join(map(str, expected))}], got {tuple(x_BCHW.shape)}"
            )
        return self.patch_embed(patchify(x_BCHW, c.patch_size)) + self.pos_TE

    def condition(self, t_B: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
        """c_BE = embed(t) + embed(y)."""
        return self.t_embed(t_B) + self.y_embed(y_B)

    def forward(
        self,
        x_BCHW: torch.Tensor,
        t_B: torch.Tensor,
        y_B: torch.Tensor,
        block_residuals: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`block_residuals` (ControlNet, `controlnet.py`): tensors [B, T, E] added to the tokens
        after blocks 0, 1, ... in order (at most `depth`); None leaves the forward untouched."""
        b = x_BCHW.shape[0]
        if t_B.shape != (b,) or y_B.shape != (b,):
            raise ValueError(
                f"expected t and y of shape ({b},), got {tuple(t_B.shape)}, {tuple(y_B.shape)}"
            )
        residuals = list(block_residuals or [])
        if len(residuals) > len(self.blocks):
            raise ValueError(f"{len(residuals)} block residuals for {len(self.blocks)} blocks")
        x_BTE = self.embed(x_BCHW)
        c_BE = self.condition(t_B, y_B)
        for i, block in enumerate(self.blocks):
            x_BTE = block(x_BTE, c_BE)
            if i < len(residuals):
                x_BTE = x_BTE + residuals[i]
        out_BTE = self.final(x_BTE, c_BE)
        return unpatchify(out_BTE, self.config.patch_size, self.config.in_channels)
