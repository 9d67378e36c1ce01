"""MM-DiT: text-conditioned rectified flow on the digits (Esser et al., 2024, "Scaling Rectified
Flow Transformers for High-Resolution Image Synthesis", SD3, Sec. 4 and Fig. 2).

Shape legend: B batch, C channels, H/W image size, T image tokens, L text tokens, S = L + T joint
tokens, E hidden width, N heads, D head dim, P text-encoder width.

What SD3's MM-DiT block does, written out:

* two streams, text (`ctx`) and image (`x`), each with its own weights: adaLN modulation
  (shift, scale, gate for attention and MLP, zero-initialised: every block is the identity at
  init, DiT's adaLN-Zero), LayerNorm, qkv, per-head RMS QK-norm (SD3 Sec. 5.3.2), output
  projection and MLP;
* one attention over the concatenation [text tokens; image tokens] (`joint_attention`), through
  `attention.api.attention` with `config.attn_backend`: text attends to the image and back;
* the conditioning vector c = embed(t) + MLP(pooled text), as SD3's pooled CLIP vector; the image
  tokens carry fixed 2D sin-cos positions, the text tokens the encoder's learned 1D positions;
* the final adaLN + linear layer reads the image stream only.

Training (`train_cond.py`) is SD3's: rectified flow with logit-normal t (`schedules.RectifiedFlow`),
velocity MSE, and the prompt dropped to the empty prompt with probability `text_dropout` so that
classifier-free guidance on the text works at sampling time (`text_denoiser`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attention.api import BACKENDS, attention
from attention.precision import (
    PRECISION_PRESETS,
    PrecisionPolicy,
    autocast,
    norm_fp32,
    rms_norm_fp32,
)
from diffusion_ext.config import _check_fields
from diffusion_ext.dit import FinalLayer, modulate
from diffusion_ext.embeddings import TimestepEmbedder, patchify, sincos_2d, unpatchify
from diffusion_ext.pipeline import Components, Conditions, LoadOptions
from diffusion_ext.samplers import DenoiseFn, Generators, sample
from diffusion_ext.schedules import Process, bcast, get_process
from diffusion_ext.text import TextEncoder, tokenize

KIND = "mmdit"
DEFAULT_GUIDANCE = 1.0  # the measured best: all three bars met (diffusion_ext/README.md)


@dataclass(frozen=True)
class MMDiTConfig:
    """An MM-DiT on 8x8x1 digits with its text encoder (width `text_width`, `text_depth` layers)."""

    image_size: int = 8
    in_channels: int = 1
    patch_size: int = 2
    hidden_size: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 3.0
    text_width: int = 64
    text_depth: int = 2
    text_heads: int = 4
    qk_norm: bool = True
    attn_backend: str = "sdpa"

    def __post_init__(self) -> None:
        _check_fields(self)
        if min(self.image_size, self.patch_size, self.in_channels, self.depth) < 1:
            raise ValueError(f"sizes must be positive: {self}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} % patch_size {self.patch_size} != 0")
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size}: divisible by num_heads and 4")
        if self.text_width % self.text_heads or self.text_depth < 0 or self.mlp_ratio <= 0:
            raise ValueError(f"bad text encoder or MLP size: {self}")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {self.attn_backend!r}; {BACKENDS}")


def joint_attention(
    q_ctx: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    q_x: torch.Tensor,
    k_x: torch.Tensor,
    v_x: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention over [text; image]: inputs [B, N, L, D] and [B, N, T, D], outputs the same
    shapes. Every token attends to every token of both streams (no mask)."""
    if q_ctx.shape[:2] != q_x.shape[:2] or q_ctx.shape[3] != q_x.shape[3]:
        raise ValueError(f"streams disagree: {tuple(q_ctx.shape)} vs {tuple(q_x.shape)}")
    q_BNSD = torch.cat([q_ctx, q_x], dim=2)
    k_BNSD = torch.cat([k_ctx, k_x], dim=2)
    v_BNSD = torch.cat([v_ctx, v_x], dim=2)
    out_BNSD = attention(q_BNSD, k_BNSD, v_BNSD, backend=backend)
    assert isinstance(out_BNSD, torch.Tensor)
    out_ctx, out_x = out_BNSD.split([q_ctx.shape[2], q_x.shape[2]], dim=2)
    return out_ctx, out_x


class Stream(nn.Module):
    """One stream's weights in an MM-DiT block: adaLN, norms, qkv, QK-norm, projection, MLP."""

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        e = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, e // config.num_heads
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(e, 6 * e))
        self.norm1 = nn.LayerNorm(e, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(e, 3 * e)
        self.q_norm = nn.Parameter(torch.ones(self.head_dim)) if config.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(self.head_dim)) if config.qk_norm else None
        self.proj = nn.Linear(e, e)
        self.norm2 = nn.LayerNorm(e, elementwise_affine=False, eps=1e-6)
        m = int(e * config.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(e, m), nn.GELU(approximate="tanh"), nn.Linear(m, e))

    def qkv_heads(
        self, h_BSE: torch.Tensor, shift_BE: torch.Tensor, scale_BE: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, N, S, D] of modulate(LN(h)), QK-normed, all in v's dtype."""
        b, s, _ = h_BSE.shape
        h_BSE = modulate(norm_fp32(h_BSE, self.norm1), shift_BE, scale_BE)
        qkv = self.qkv(h_BSE).reshape(b, s, 3, self.num_heads, self.head_dim)
        q_BNSD, k_BNSD, v_BNSD = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_norm is not None and self.k_norm is not None:
            q_BNSD = rms_norm_fp32(q_BNSD, self.q_norm)
            k_BNSD = rms_norm_fp32(k_BNSD, self.k_norm)
        return q_BNSD.to(v_BNSD.dtype), k_BNSD.to(v_BNSD.dtype), v_BNSD


class MMDiTBlock(nn.Module):
    """Both streams: h + gate_msa * proj(joint attention), then h + gate_mlp * MLP(modulate(LN))."""

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        self.backend = config.attn_backend
        self.ctx = Stream(config)
        self.x = Stream(config)

    def forward(
        self, ctx_BLE: torch.Tensor, x_BTE: torch.Tensor, c_BE: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mods_ctx = self.ctx.ada_ln(c_BE).chunk(6, dim=-1)
        mods_x = self.x.ada_ln(c_BE).chunk(6, dim=-1)
        q_c, k_c, v_c = self.ctx.qkv_heads(ctx_BLE, mods_ctx[0], mods_ctx[1])
        q_x, k_x, v_x = self.x.qkv_heads(x_BTE, mods_x[0], mods_x[1])
        out_c, out_x = joint_attention(q_c, k_c, v_c, q_x, k_x, v_x, self.backend)
        streams = []
        for h_BSE, out_BNSD, stream, mods in (
            (ctx_BLE, out_c, self.ctx, mods_ctx),
            (x_BTE, out_x, self.x, mods_x),
        ):
            _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
            attn_BSE = stream.proj(out_BNSD.transpose(1, 2).reshape(h_BSE.shape))
            h_BSE = h_BSE + gate_msa[:, None] * attn_BSE
            mlp_in = modulate(norm_fp32(h_BSE, stream.norm2), shift_mlp, scale_mlp)
            streams.append(h_BSE + gate_mlp[:, None] * stream.mlp(mlp_in))
        return streams[0], streams[1]


class MMDiT(nn.Module):
    """Velocity predictor out_BCHW = MMDiT(x_BCHW, t_B, ids_BL) (ids from `text.tokenize`;
    the all-padding row is the empty prompt, the null condition of guidance)."""

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        self.config = config
        e, c = config.hidden_size, config
        self.text = TextEncoder(c.text_width, c.text_depth, c.text_heads, c.attn_backend)
        self.ctx_embed = nn.Linear(c.text_width, e)
        self.pooled_embed = nn.Sequential(nn.Linear(c.text_width, e), nn.SiLU(), nn.Linear(e, e))
        self.patch_embed = nn.Linear(c.patch_size**2 * c.in_channels, e)
        self.register_buffer(
            "pos_TE", sincos_2d(e, c.image_size // c.patch_size)[None], persistent=False
        )
        self.t_embed = TimestepEmbedder(e)
        self.blocks = nn.ModuleList([MMDiTBlock(config) for _ in range(config.depth)])
        self.final = FinalLayer(_final_layer_config(config))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier linears, N(0, 0.02) embeddings; adaLN modulation and output zeroed."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.text.embed.weight, std=0.02)
        streams = [s for b in self.blocks if isinstance(b, MMDiTBlock) for s in (b.ctx, b.x)]
        for layer in [*(s.ada_ln[1] for s in streams), self.final.ada_ln[1], self.final.linear]:
            assert isinstance(layer, nn.Linear)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, x_BCHW: torch.Tensor, t_B: torch.Tensor, ids_BL: torch.Tensor
    ) -> torch.Tensor:
        c = self.config
        b = x_BCHW.shape[0]
        if tuple(x_BCHW.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(
                f"expected x [B, {c.in_channels}, {c.image_size}, {c.image_size}], "
                f"got {tuple(x_BCHW.shape)}"
            )
        if t_B.shape != (b,) or ids_BL.shape[0] != b:
            raise ValueError(
                f"expected t [{b}] and ids [{b}, L], got {tuple(t_B.shape)}, {tuple(ids_BL.shape)}"
            )
        tokens_BLP, pooled_BP = self.text(ids_BL)
        ctx_BLE = self.ctx_embed(tokens_BLP)
        x_BTE = self.patch_embed(patchify(x_BCHW, c.patch_size)) + self.pos_TE
        c_BE = self.t_embed(t_B) + self.pooled_embed(pooled_BP)
        for block in self.blocks:
            ctx_BLE, x_BTE = block(ctx_BLE, x_BTE, c_BE)
        return unpatchify(self.final(x_BTE, c_BE), c.patch_size, c.in_channels)


def _final_layer_config(config: MMDiTConfig) -> Any:
    """FinalLayer reads hidden_size, patch_size, in_channels only."""
    from diffusion_ext.config import DiTConfig

    return DiTConfig(
        image_size=config.image_size,
        in_channels=config.in_channels,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
    )


def text_denoiser(
    model: MMDiT,
    process: Process,
    ids_BL: torch.Tensor,
    guidance_scale: float | None,
    policy: PrecisionPolicy = PRECISION_PRESETS["fp32"],
) -> DenoiseFn:
    """DenoiseFn for prompts ids_BL; with a `guidance_scale` w, classifier-free guidance on the
    text: the prompt and the empty prompt run as one batch of 2B, out = uncond + w (cond -
    uncond) in fp32 (as `guidance.model_denoiser` does for class labels)."""

    def run(x: torch.Tensor, t_B: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x_in = (bcast(process.c_in(t_B), x) * x).float()
        with autocast(policy, x.device):
            return model(x_in, process.model_time(t_B).float(), ids).float()

    def denoise(x: torch.Tensor, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if guidance_scale is None:
            return process.to_x0_eps(x, t_B, run(x, t_B, ids_BL))
        ids_2B = torch.cat([ids_BL, torch.zeros_like(ids_BL)])
        cond, uncond = run(torch.cat([x, x]), torch.cat([t_B, t_B]), ids_2B).chunk(2)
        return process.to_x0_eps(x, t_B, uncond + guidance_scale * (cond - uncond))

    return denoise


def clip_x0(denoise: DenoiseFn, process: Process) -> DenoiseFn:
    """x0_hat clamped to [-1, 1], eps_hat recomputed where sigma > 0 (`guidance.clip_denoised`)."""
    from diffusion_ext.guidance import clip_denoised

    return clip_denoised(denoise, process)


@dataclass
class MMDiTPipeline:
    """A loaded MM-DiT: `sample(prompts, steps, guidance, generator)` -> images [B, 1, 8, 8]."""

    model: MMDiT
    process_name: str
    device: torch.device
    sampler: str = "heun"
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        steps: int = 16,
        guidance: float | None = DEFAULT_GUIDANCE,
        generator: Generators = None,
    ) -> torch.Tensor:
        """Images x_BCHW (fp32 on `device`, in [-1, 1]), one per prompt; noise and sampler
        randomness from `generator` (a CPU `torch.Generator`, or one per prompt). `guidance` None
        is the conditional model alone, a float w classifier-free guidance on the text."""
        if not prompts:
            raise ValueError("need at least one prompt")
        ids_BL = tokenize(prompts).to(self.device)
        c = self.model.config
        process = get_process(self.process_name)
        shape = (len(prompts), c.in_channels, c.image_size, c.image_size)
        noise = _noise(shape, generator).to(self.device)
        denoise = clip_x0(text_denoiser(self.model, process, ids_BL, guidance), process)
        return sample(self.sampler, denoise, process, noise, steps, generator).clamp(-1.0, 1.0)


def _noise(shape: tuple[int, ...], generator: Generators) -> torch.Tensor:
    """Standard normal noise on the CPU from one generator, or one per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator)
    return torch.stack([torch.randn(shape[1:], generator=g) for g in generator])


def export_mmdit(
    model: MMDiT, path: str | Path, dtype: torch.dtype = torch.float32, **extra: str
) -> None:
    """Weights + `kind` "mmdit", the config and `process` "rf" in the metadata (atomic)."""
    from diffusion_ext.checkpoint import export_weights

    export_weights(model, KIND, model.config, path, dtype, {"process": "rf", **extra})


def load_mmdit(path: str | Path) -> tuple[MMDiT, dict[str, str]]:
    """(MMDiT in eval mode, fp32 weights, metadata); ValueError for anything but an export."""
    from diffusion_ext.checkpoint import load_weights

    model, meta = load_weights(path, KIND, lambda cfg: MMDiT(MMDiTConfig(**cfg)))
    assert isinstance(model, MMDiT)
    return model, meta


def load_mmdit_pipeline(
    path: str | Path, device: str | torch.device = "cpu", sampler: str = "heun"
) -> MMDiTPipeline:
    """An `MMDiTPipeline` from an `export_mmdit` file, on `device`."""
    model, meta = load_mmdit(path)
    device = torch.device(device)
    return MMDiTPipeline(model.to(device), meta.get("process", "rf"), device, sampler, meta)


def with_attention(model: MMDiT, backend: str | None) -> MMDiT:
    """`model` (unchanged when `backend` is None or its own) or a copy on another attention
    backend (the backend is part of the frozen config); ValueError for an unknown backend."""
    if backend is None or backend == model.config.attn_backend:
        return model
    copy = MMDiT(dataclasses.replace(model.config, attn_backend=backend))
    copy.load_state_dict(model.state_dict())
    return copy.to(next(model.parameters()).device).eval()


def load_components(path: Path, options: LoadOptions) -> Components:
    """`pipeline.Pipeline`'s loader of the "mmdit" kind: prompts in, the text denoiser on
    `options`' device, attention backend and precision; the pipeline clips x0_hat."""
    pipe = load_mmdit_pipeline(path, options.device)
    model = with_attention(pipe.model, options.attention)
    model = model.to(options.device, options.policy.param_torch_dtype).eval()
    process = get_process(pipe.process_name)
    c = model.config

    def make_denoiser(
        conditions: Conditions, guidance: float, control: torch.Tensor | None
    ) -> DenoiseFn:
        assert isinstance(conditions, list) and control is None  # the pipeline checks
        ids_BL = tokenize(conditions).to(options.device)
        if guidance == 0:  # the unconditional model: one empty-prompt pass (= CFG at w = 0)
            return text_denoiser(model, process, torch.zeros_like(ids_BL), None, options.policy)
        return text_denoiser(model, process, ids_BL, guidance, options.policy)

    return Components(
        kind=KIND,
        process_name=pipe.process_name,
        sample_shape=(c.in_channels, c.image_size, c.image_size),
        make_denoiser=make_denoiser,
        conditioning="prompts",
        default_guidance=DEFAULT_GUIDANCE,
        device=options.device,
        metadata=pipe.metadata,
    )
