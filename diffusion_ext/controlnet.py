"""ControlNet on the frozen class-conditional digits DiT (Zhang, Rao & Agrawala, 2023, "Adding
Conditional Control to Text-to-Image Diffusion Models", Sec. 3).

Shape legend: B batch, C = 1 channel, H = W = 8, T image tokens, E hidden width, K copied blocks.

* Control map: `sobel_edges` of the target digit, a {0, 1} map [B, 1, 8, 8] (definition below).
* ControlNet (Sec. 3.1, eq. 2, y_c = F(x; Θ) + Z(F(x + Z(c; Θ_z1); Θ_c); Θ_z2)): a trainable copy
  Θ_c of the base's first K blocks, initialised from the base's weights, reads the base's own
  embedded tokens plus Z1(patchify(control)); after each copied block k, Z2_k(h) is added to the
  base's tokens after its block k (`DiT.forward(..., block_residuals=...)`). Z1 and every Z2_k are
  zero-initialised linear maps ("zero convolutions"), so at initialisation every residual is
  exactly 0 and the controlled model's output is bit-identical to the base's.
* The base (`assets/dit_digits_ema.safetensors`) stays frozen: outside the optimizer,
  `requires_grad_(False)`, its weights' hash (`weights_hash`) checked after training; the
  ControlNet file stores only the ControlNet's weights, with the base's file name and hash, and
  loading refuses a base whose hash differs.

Edge maps and edge IoU (the measure of how well samples follow the control):

* `sobel_edges(x)`: pixels mapped to ink in [0, 1] (clamped), 3x3 Sobel gradients gx, gy with zero
  padding, magnitude sqrt(gx^2 + gy^2) (at most 4 sqrt(2) = 5.66); an edge is magnitude >
  `EDGE_THRESHOLD` = 3.25. The threshold was chosen on real digits only, before any model was
  sampled: edges cover ~19% of the pixels, two different train digits of the same class share an
  IoU of 0.27 on average, and ink noise of std 0.1 leaves a digit's own edges at IoU 0.66.
* `edge_iou(samples, control)`: per image |E(sample) AND control| / |E(sample) OR control| (1 when
  both are empty), averaged over the batch.

`load_components` is `pipeline.Pipeline.from_pretrained`'s loader of the "controlnet" kind
(class labels plus a control map per sample); it samples bit-identically to
`load_controlnet_pipeline(...).sample(...)` (tested).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_ext.checkpoint import export_weights, load_dit, load_weights
from diffusion_ext.dit import DiT
from diffusion_ext.embeddings import patchify
from diffusion_ext.guidance import clip_denoised, model_denoiser
from diffusion_ext.pipeline import Components, Conditions, LoadOptions, with_attention
from diffusion_ext.samplers import DenoiseFn, Generators, sample
from diffusion_ext.schedules import get_process

KIND = "controlnet"
DEFAULT_GUIDANCE = 1.25  # the base DiT's (the edge-IoU bars are measured here: README)
EDGE_THRESHOLD = 3.25
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def sobel_edges(x_BCHW: torch.Tensor, threshold: float = EDGE_THRESHOLD) -> torch.Tensor:
    """{0, 1} float32 edge map [B, 1, H, W] of images in [-1, 1] (see the module docstring)."""
    if x_BCHW.ndim != 4 or x_BCHW.shape[1] != 1:
        raise ValueError(f"expected images [B, 1, H, W], got {tuple(x_BCHW.shape)}")
    ink = ((x_BCHW.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    kx = torch.tensor(_SOBEL_X, device=ink.device)[None, None]
    gx = F.conv2d(ink, kx, padding=1)
    gy = F.conv2d(ink, kx.transpose(2, 3), padding=1)
    return ((gx**2 + gy**2).sqrt() > threshold).float()


def edge_iou(x_BCHW: torch.Tensor, control_BCHW: torch.Tensor) -> float:
    """Mean over the batch of IoU(sobel_edges(x), control); an image with both empty counts 1."""
    a = sobel_edges(x_BCHW).bool().flatten(1)
    b = control_BCHW.bool().flatten(1)
    inter, union = (a & b).sum(1).float(), (a | b).sum(1).float()
    return float(torch.where(union > 0, inter / union.clamp_min(1.0), 1.0).mean())


def weights_hash(module: nn.Module) -> str:
    """sha256 over the state dict's names, dtypes, shapes and bytes (sorted by name)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_frozen_base(path: str | Path) -> DiT:
    """The base DiT in eval mode with `requires_grad_(False)` (ValueError if it is not rf)."""
    base, process = load_dit(path)
    if process != "rf":
        raise ValueError(
            f"{path}: the ControlNet is trained with rectified flow, base is {process}"
        )
    return base.requires_grad_(False).eval()


class ControlNet(nn.Module):
    """Trainable copy of `base`'s first `num_blocks` blocks plus zero-initialised projections.
    Holds no reference to `base` (its state dict is its own weights only)."""

    def __init__(self, base: DiT, num_blocks: int) -> None:
        super().__init__()
        c = base.config
        if not 1 <= num_blocks <= c.depth:
            raise ValueError(f"num_blocks must be in [1, {c.depth}], got {num_blocks}")
        self.num_blocks = num_blocks
        self.patch_size = c.patch_size
        e = c.hidden_size
        self.blocks = nn.ModuleList([copy.deepcopy(base.blocks[k]) for k in range(num_blocks)])
        self.blocks.requires_grad_(True)
        self.control_in = nn.Linear(c.patch_size**2 * c.in_channels, e)  # Z1
        self.zero_out = nn.ModuleList([nn.Linear(e, e) for _ in range(num_blocks)])  # Z2_k
        for layer in [self.control_in, *self.zero_out]:
            assert isinstance(layer, nn.Linear)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, tokens_BTE: torch.Tensor, c_BE: torch.Tensor, control_BCHW: torch.Tensor
    ) -> list[torch.Tensor]:
        """Residuals [B, T, E] for the base's blocks 0..K-1, from the base's embedded tokens, its
        conditioning vector and the control map ({0, 1}, fed as 2 * control - 1)."""
        h_BTE = tokens_BTE + self.control_in(patchify(2.0 * control_BCHW - 1.0, self.patch_size))
        residuals = []
        for block, zero in zip(self.blocks, self.zero_out, strict=True):
            h_BTE = block(h_BTE, c_BE)
            residuals.append(zero(h_BTE))
        return residuals


class ControlledDiT(nn.Module):
    """base(x, t, y) with the ControlNet's residuals: forward(x, t, y, control) -> out_BCHW.

    A batch of k * B rows with a control of B rows (classifier-free guidance doubles the batch)
    repeats the control k times."""

    def __init__(self, base: DiT, controlnet: ControlNet) -> None:
        super().__init__()
        self.base, self.controlnet = base, controlnet

    def forward(
        self,
        x_BCHW: torch.Tensor,
        t_B: torch.Tensor,
        y_B: torch.Tensor,
        control_BCHW: torch.Tensor,
    ) -> torch.Tensor:
        b, bc = x_BCHW.shape[0], control_BCHW.shape[0]
        if tuple(control_BCHW.shape[1:]) != tuple(x_BCHW.shape[1:]) or b % bc:
            raise ValueError(
                f"control {tuple(control_BCHW.shape)} does not fit x {tuple(x_BCHW.shape)}"
            )
        control_BCHW = control_BCHW.to(x_BCHW.dtype).repeat(b // bc, 1, 1, 1)
        residuals = self.controlnet(
            self.base.embed(x_BCHW), self.base.condition(t_B, y_B), control_BCHW
        )
        return self.base(x_BCHW, t_B, y_B, block_residuals=residuals)


class _BoundControl(nn.Module):
    """net(x, t, y) for `guidance.model_denoiser`, the control map bound for one request."""

    def __init__(self, controlled: ControlledDiT, control_BCHW: torch.Tensor) -> None:
        super().__init__()
        self.controlled = controlled
        self.control_BCHW = control_BCHW

    def forward(self, x: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
        return self.controlled(x, t_B, y_B, self.control_BCHW)


def export_controlnet(
    controlnet: ControlNet,
    path: str | Path,
    base_path: str | Path,
    base_sha256: str,
    dtype: torch.dtype = torch.float32,
    **extra: str,
) -> None:
    """The ControlNet's weights (not the base's) with `kind` "controlnet", the base's file name
    (looked up beside this file, then in `assets/`) and its weights' hash in the metadata."""
    config = ControlNetMeta(num_blocks=controlnet.num_blocks)
    meta = {"base": Path(base_path).name, "base_sha256": base_sha256, "process": "rf", **extra}
    export_weights(controlnet, KIND, config, path, dtype, meta)


@dataclass(frozen=True)
class ControlNetMeta:
    """The ControlNet's own config (the rest is the base's)."""

    num_blocks: int = 2


def _find_base(path: Path, name: str) -> Path:
    for candidate in (path.parent / name, Path(__file__).parent / "assets" / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path}: its base {name!r} is neither beside it nor in assets/")


def load_controlnet(
    path: str | Path, base_path: str | Path | None = None
) -> tuple[ControlledDiT, dict[str, str]]:
    """(ControlledDiT in eval mode, metadata). The base is `base_path` or the file named in the
    metadata; ValueError if its weights' hash is not the one the ControlNet was trained on."""
    path = Path(path)
    from diffusion_ext.checkpoint import read_metadata

    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    meta = read_metadata(path)
    if meta.get("kind") != KIND or "base" not in meta or "base_sha256" not in meta:
        raise ValueError(f"{path} is not a diffusion_ext controlnet export")
    base = load_frozen_base(base_path or _find_base(path, meta["base"]))
    if weights_hash(base) != meta["base_sha256"]:
        raise ValueError(f"{path}: the base's weights are not the ones it was trained on")
    cn, meta = load_weights(
        path, KIND, lambda cfg: ControlNet(base, ControlNetMeta(**cfg).num_blocks)
    )
    assert isinstance(cn, ControlNet)
    return ControlledDiT(base, cn).eval(), meta


@dataclass
class ControlNetPipeline:
    """`sample(labels, control, steps, guidance, generator)` -> images [B, 1, 8, 8] in [-1, 1]."""

    model: ControlledDiT
    device: torch.device
    sampler: str = "heun"
    metadata: dict[str, str] = field(default_factory=dict)

    @torch.no_grad()
    def sample(
        self,
        labels: list[int] | torch.Tensor,
        control: torch.Tensor,
        steps: int = 16,
        guidance: float | None = DEFAULT_GUIDANCE,
        generator: Generators = None,
        use_control: bool = True,
    ) -> torch.Tensor:
        """Images x_BCHW (fp32, on `device`) for class labels [B] and edge maps control
        [B, 1, 8, 8] ({0, 1}, e.g. `sobel_edges`); classifier-free guidance on the label with
        the control in both passes. `use_control=False` samples the base alone (same noise)."""
        y_B = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        base = self.model.base
        c = base.config
        if y_B.ndim != 1 or control.shape != (y_B.shape[0], 1, c.image_size, c.image_size):
            raise ValueError(
                f"need labels [B] and control [B, 1, {c.image_size}, {c.image_size}], got "
                f"{tuple(y_B.shape)} and {tuple(control.shape)}"
            )
        if bool(((y_B < 0) | (y_B >= c.num_classes)).any()):
            raise ValueError(f"labels must be in [0, {c.num_classes})")
        process = get_process("rf")
        shape = (y_B.shape[0], c.in_channels, c.image_size, c.image_size)
        if generator is None or isinstance(generator, torch.Generator):
            noise = torch.randn(shape, generator=generator)
        else:
            noise = torch.stack([torch.randn(shape[1:], generator=g) for g in generator])
        net: nn.Module = base
        if use_control:
            net = _BoundControl(self.model, control.to(self.device).float())
        denoise = model_denoiser(
            net, process, y_B, null_class=base.null_class, guidance_scale=guidance
        )
        denoise = clip_denoised(denoise, process)
        x = sample(self.sampler, denoise, process, noise.to(self.device), steps, generator)
        return x.clamp(-1.0, 1.0)


def load_controlnet_pipeline(
    path: str | Path,
    device: str | torch.device = "cpu",
    base_path: str | Path | None = None,
    sampler: str = "heun",
) -> ControlNetPipeline:
    """A `ControlNetPipeline` from an `export_controlnet` file (and its base), on `device`."""
    model, meta = load_controlnet(path, base_path)
    device = torch.device(device)
    return ControlNetPipeline(model.to(device), device, sampler, meta)


def controlled_with_attention(model: ControlledDiT, backend: str | None) -> ControlledDiT:
    """`model`, or a copy whose base and ControlNet blocks run on another attention backend (the
    copied blocks take the backend of the base they are copied from, so both are rebuilt)."""
    base = with_attention(model.base, backend)
    if base is model.base:
        return model
    controlnet = ControlNet(base, model.controlnet.num_blocks)
    controlnet.load_state_dict(model.controlnet.state_dict())
    return ControlledDiT(base.requires_grad_(False), controlnet).eval()


def load_components(path: Path, options: LoadOptions) -> Components:
    """`pipeline.Pipeline`'s loader of the "controlnet" kind: class labels plus a control map
    [B, 1, 8, 8] per sample (ValueError without one), classifier-free guidance on the label with
    the control in both passes; the base DiT's file is found as `load_controlnet` finds it."""
    model, meta = load_controlnet(path)
    model = controlled_with_attention(model, options.attention)
    model = model.to(options.device, options.policy.param_torch_dtype).eval()
    base = model.base
    c = base.config
    process_name = meta.get("process", "rf")
    process = get_process(process_name)

    def make_denoiser(
        conditions: Conditions, guidance: float, control: torch.Tensor | None
    ) -> DenoiseFn:
        assert isinstance(conditions, torch.Tensor)  # the pipeline checks
        if control is None:
            raise ValueError(
                "a controlnet pipeline needs a control map per sample (control=[B, 1, 8, 8], "
                "e.g. controlnet.sobel_edges(images))"
            )
        expected = (conditions.shape[0], 1, c.image_size, c.image_size)
        if tuple(control.shape) != expected:
            raise ValueError(f"control has {tuple(control.shape)}; need {list(expected)}")
        net = _BoundControl(model, control.float())
        null = base.null_class
        if guidance == 0:  # the unconditional model, controlled: one null-label pass
            y_null = torch.full_like(conditions, null)
            return model_denoiser(net, process, y_null, null_class=null, policy=options.policy)
        return model_denoiser(
            net,
            process,
            conditions,
            null_class=null,
            guidance_scale=guidance,
            policy=options.policy,
        )

    return Components(
        kind=KIND,
        process_name=process_name,
        sample_shape=(c.in_channels, c.image_size, c.image_size),
        make_denoiser=make_denoiser,
        num_classes=c.num_classes,
        default_guidance=DEFAULT_GUIDANCE,
        takes_control=True,
        device=options.device,
        metadata=meta,
    )
