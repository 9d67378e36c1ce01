"""Frozen configs for the DiT, the diffusion process and training, with named presets.

DiT sizes follow Peebles & Xie (2023), Table 1: S (384 wide, 12 deep, 6 heads), B (768, 12, 12),
L (1024, 24, 16), XL (1152, 28, 16); the presets `DiT-{S,B,L,XL}/{2,4,8}` are for 32x32x4 latents
(256x256 images through the SD VAE). `tiny-digits` is the 8x8x1 model trained in `train.py`.

Every config checks its fields' types and ranges in `__post_init__` (`_check_fields`): numbers
must be finite (a NaN guidance scale once sampled a blank grid), ints may stand in for floats,
bools and strings must be what they say. The upper bounds (`MAX_*`) keep a typo from asking for
a batch or a thread count that takes the machine down instead of giving an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from attention.api import BACKENDS
from attention.precision import PRECISION_PRESETS

PROCESSES: tuple[str, ...] = ("vp-linear", "vp-cosine", "ve", "rf")
SAMPLER_NAMES: tuple[str, ...] = ("ddpm", "ddim", "euler", "heun", "euler-maruyama", "rf-euler")
MAX_THREADS = 256  # torch accepts 10**6 threads and then crashes the process at exit
MAX_BATCH = 65_536  # training batch
MAX_SAMPLE_STEPS = 10_000
MAX_PER_CLASS = 1_000  # the sample grid is one batch of num_classes * per_class images
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range (scikit-learn's split: 2**32 - 1)


def _check_fields(config: object) -> None:
    """Each field has its default's type (an int may stand in for a float; it is stored as a
    float) and every float is finite. Raises ValueError naming the field."""
    for f in fields(config):  # type: ignore[arg-type]
        value: object = getattr(config, f.name)
        kind: type = type(f.default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            object.__setattr__(config, f.name, value)  # frozen: set once, while validating
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{f.name} must be {kind.__name__}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")


check_fields = _check_fields  # the public name, for configs that live beside their module (vqvae)


@dataclass(frozen=True)
class DiTConfig:
    """A DiT denoiser. `num_classes` real classes; index `num_classes` is the null class (CFG)."""

    image_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    qk_norm: bool = False
    attn_backend: str = "sdpa"

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.image_size <= 0 or self.patch_size <= 0:
            raise ValueError(f"image_size and patch_size must be positive, got {self}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_size % 4 != 0:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 (2D sin-cos)")
        if self.depth < 1 or self.in_channels < 1 or self.num_classes < 1 or self.mlp_ratio <= 0:
            raise ValueError(f"depth, in_channels, num_classes, mlp_ratio must be positive: {self}")
        if self.attn_backend not in BACKENDS:
            raise ValueError(
                f"unknown attention backend {self.attn_backend!r}; choose one of {', '.join(BACKENDS)}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _dit_presets() -> dict[str, DiTConfig]:
    sizes = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
    presets = {
        f"DiT-{name}/{patch}": DiTConfig(
            patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads
        )
        for name, (hidden, depth, heads) in sizes.items()
        for patch in (2, 4, 8)
    }
    presets["tiny-digits"] = DiTConfig(
        image_size=8,
        in_channels=1,
        patch_size=2,
        hidden_size=96,
        depth=4,
        num_heads=6,
        mlp_ratio=3.0,
        num_classes=10,
        qk_norm=True,
    )
    # The rectified-flow DiT on the VQ-VAE's 4x4x4 latents (diffusion_ext/latent.py): patch 1,
    # so 16 tokens as in tiny-digits.
    presets["latent-digits"] = replace(
        presets["tiny-digits"], image_size=4, in_channels=4, patch_size=1
    )
    return presets


DIT_PRESETS: dict[str, DiTConfig] = _dit_presets()


def get_dit_config(name: str, **overrides: object) -> DiTConfig:
    """The preset `name` with `overrides` applied (validated again)."""
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; choose one of {', '.join(DIT_PRESETS)}")
    return replace(DIT_PRESETS[name], **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TrainConfig:
    """Class-conditional training on scikit-learn digits. CLI flags map one-to-one onto fields."""

    model: str = "tiny-digits"
    process: str = "rf"
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup_steps: int = 500
    class_dropout: float = 0.1
    precision: str = "bf16"
    seed: int = 0
    holdout_fraction: float = 0.1
    checkpoint_every: int = 500
    threads: int = 1  # intra-op threads; 1 is fastest for these tiny tensors on a shared CPU

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.model not in DIT_PRESETS:
            raise ValueError(
                f"unknown DiT preset {self.model!r}; choose one of {', '.join(DIT_PRESETS)}"
            )
        if self.process not in PROCESSES:
            raise ValueError(
                f"unknown process {self.process!r}; choose one of {', '.join(PROCESSES)}"
            )
        if self.precision not in PRECISION_PRESETS:
            raise ValueError(
                f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISION_PRESETS)}"
            )
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, batch_size and checkpoint_every must be >= 1")
        if self.batch_size > MAX_BATCH:
            raise ValueError(f"batch_size must be <= {MAX_BATCH}, got {self.batch_size}")
        if not (self.lr > 0 and 0.0 <= self.ema_decay < 1.0 and 0.0 <= self.class_dropout < 1.0):
            raise ValueError("need lr > 0, 0 <= ema_decay < 1, 0 <= class_dropout < 1")
        if self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError(
                f"need weight_decay >= 0 and grad_clip > 0, got {self.weight_decay}, {self.grad_clip}"
            )
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.warmup_steps < 0 or self.ema_warmup_steps < 0 or self.threads < 0:
            raise ValueError("warmup_steps, ema_warmup_steps and threads must be >= 0")
        if self.threads > MAX_THREADS:
            raise ValueError(f"threads must be <= {MAX_THREADS}, got {self.threads}")
        if not 0 <= self.seed < 2**32:  # the seed of scikit-learn's split too
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")


TRAIN_PRESETS: dict[str, TrainConfig] = {
    "digits": TrainConfig(),
    "digits-smoke": TrainConfig(steps=20, batch_size=32, checkpoint_every=10, warmup_steps=5),
}


@dataclass(frozen=True)
class SampleConfig:
    """How to sample a trained model (the `sample` CLI's flags)."""

    sampler: str = "heun"
    steps: int = 32
    guidance_scale: float = 1.25  # meets the quality bar (diffusion_ext/README.md)
    per_class: int = 10
    seed: int = 0
    clip_denoised: bool = True
    eta: float = 0.0  # DDIM's eta in [0, 1] (0: deterministic, 1: DDPM); ddim only
    # > 0: classifier guidance (Dhariwal & Nichol, 2021) with the noise-aware classifier
    # (`noisy_classifier.py`) on top of the DiT; with guidance_scale 0 the DiT is unconditional.
    classifier_guidance: float = 0.0

    def __post_init__(self) -> None:
        _check_fields(self)
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(
                f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM), got {self.eta}"
            )
        if self.eta != 0.0 and self.sampler != "ddim":
            raise ValueError(f"eta is DDIM's parameter; sampler {self.sampler!r} takes none")
        if self.classifier_guidance < 0:
            raise ValueError(f"classifier_guidance must be >= 0, got {self.classifier_guidance}")
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(
                f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}"
            )
        if not (1 <= self.steps <= MAX_SAMPLE_STEPS and 1 <= self.per_class <= MAX_PER_CLASS):
            raise ValueError(
                f"need 1 <= steps <= {MAX_SAMPLE_STEPS} and 1 <= per_class <= {MAX_PER_CLASS}, "
                f"got steps={self.steps}, per_class={self.per_class}"
            )
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
