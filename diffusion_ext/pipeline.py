"""A pipeline object in diffusers' spirit: `Pipeline.from_pretrained(path)`, then
`pipe(labels_or_prompts, steps=..., guidance=..., control=..., generator=...)` -> images.

Shape legend: B batch, C channels, H/W size, X one sample in the sampler's space (C, H, W: pixels,
or latents for a latent model), K classes.

A pipeline is a kind's `Components` (what differs per model: the denoiser, the process, the
sampler space, the decoder) plus what every kind shares, written once here: noise from the
caller's generator, the sampler (any of `samplers.SAMPLERS`, DDIM's eta), x0 clipping, classifier
guidance with the noise-aware classifier, a per-model-call progress callback, decoding, [-1, 1].

Kinds: a checkpoint records its kind (safetensors metadata `kind`; a folder holds a
`pipeline.json` with `{"kind": ..., ...}`); an export without one that carries a `dit_config` is
the class-conditional DiT ("class-dit", `assets/dit_digits_ema.safetensors`). `KIND_LOADERS` maps a
kind to "module:function", imported only when that kind is loaded. A loader has the signature of
`load_class_dit_components`:

    def load_components(path: Path, options: LoadOptions) -> Components

Libraries never print: progress reaches the caller through `callback` (the CLI draws a tqdm bar).

One module (~420 lines, over the house's ~400): the call, the kind table and the class-DiT kind
are one contract, and the grid helpers beside them are the only other thing every kind's CLI uses.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from attention.api import check_backend
from attention.precision import PRECISION_PRESETS, PrecisionPolicy
from attention.state_files import atomic_write
from diffusion_ext.checkpoint import load_dit, read_header
from diffusion_ext.config import SampleConfig
from diffusion_ext.dit import DiT
from diffusion_ext.guidance import (
    classifier_guided,
    classifier_log_prob,
    clip_denoised,
    model_denoiser,
)
from diffusion_ext.samplers import DenoiseFn, Generators, model_calls, sample
from diffusion_ext.schedules import get_process

Conditions = torch.Tensor | list[str]  # int64 labels [B], or B prompts
MakeDenoiser = Callable[[Conditions, float, "torch.Tensor | None"], DenoiseFn]

PIPELINE_INDEX = "pipeline.json"  # a folder checkpoint's index (diffusers' model_index.json)
CLASS_DIT = "class-dit"
KIND_LOADERS: dict[str, str] = {
    CLASS_DIT: "diffusion_ext.pipeline:load_class_dit_components",
    # Each has the signature of `load_class_dit_components`; tested bit-identical to the module's
    # own `load_*_pipeline(...).sample(...)`.
    "latent-dit": "diffusion_ext.latent:load_components",
    "mmdit": "diffusion_ext.mmdit:load_components",
    "controlnet": "diffusion_ext.controlnet:load_components",
}


@dataclass(frozen=True)
class LoadOptions:
    """What `from_pretrained` passes every loader. `attention` None keeps the checkpoint's
    backend; a name is checked (`attention.api.check_backend`) before anything loads."""

    device: torch.device = torch.device("cpu")
    attention: str | None = None
    policy: PrecisionPolicy = PRECISION_PRESETS["fp32"]


@dataclass(frozen=True)
class Components:
    """What a kind gives the pipeline.

    * `make_denoiser(conditions, guidance, control) -> DenoiseFn`: conditions are int64 labels
      [B] (on `device`) when `conditioning` is "labels", a list of B strings for "prompts";
      `guidance` is the classifier-free guidance scale w (0: the unconditional model, 1: the
      conditional one); `control` is None unless `takes_control` ([B, ...] on `device`).
    * `sample_shape`: one sample X in the sampler's space; noise is N(0, I) of [B, *X].
    * `decode`: sampler space -> images [B, 1, 8, 8] (None: the samples are the images).
    * `x0_range`: x0_hat is clipped to it when the caller asks for clipping (None: never, e.g.
      latents).
    """

    kind: str
    process_name: str
    sample_shape: tuple[int, ...]
    make_denoiser: MakeDenoiser
    conditioning: Literal["labels", "prompts"] = "labels"
    num_classes: int = 10
    default_guidance: float = 1.25
    takes_control: bool = False
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    x0_range: tuple[float, float] | None = (-1.0, 1.0)
    device: torch.device = torch.device("cpu")
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)


class Pipeline:
    """`pipe(labels_or_prompts, ...)` -> images [B, 1, 8, 8], fp32 in [-1, 1] (on the CPU).

    `classifier` (optional): a noise-aware classifier `classifier(c_in x_t, model time) ->
    logits [B, K]` (`noisy_classifier.py`) trained on `classifier_process`, for classifier
    guidance in pixel space.
    """

    def __init__(
        self,
        components: Components,
        classifier: nn.Module | None = None,
        classifier_process: str | None = None,
    ) -> None:
        self.components = components
        self.classifier = classifier
        self.classifier_process = classifier_process

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        attention: str | None = None,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
        classifier: str | Path | None = None,
    ) -> Pipeline:
        """Load a checkpoint file or folder by its recorded kind; `classifier` is the path of a
        noise-aware classifier (`noisy_classifier.py`, used as its `ShiftEnsemble`) for
        classifier guidance.

        FileNotFoundError / ValueError (one line each) for a missing or foreign checkpoint, an
        unknown kind, a kind not wired yet, an attention backend that cannot run on `device`.
        """
        if precision not in PRECISION_PRESETS:
            raise ValueError(
                f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_PRESETS)}"
            )
        options = LoadOptions(torch.device(device), attention, PRECISION_PRESETS[precision])
        if attention is not None:
            check_backend(attention, options.device)
        path = Path(path)
        loader = resolve_loader(checkpoint_kind(path))
        components = loader(path, options)
        if classifier is None:
            return cls(components)
        from diffusion_ext.noisy_classifier import load_guidance_classifier

        model, process = load_guidance_classifier(classifier)
        return cls(components, model.to(options.device), process)

    @torch.no_grad()
    def __call__(
        self,
        labels_or_prompts: int | str | Sequence[int] | Sequence[str] | torch.Tensor,
        *,
        steps: int = 32,
        guidance: float | None = None,
        control: torch.Tensor | None = None,
        generator: Generators = None,
        sampler: str = "heun",
        eta: float | None = None,
        classifier_guidance: float = 0.0,
        clip: bool = True,
        callback: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Images [B, 1, 8, 8] (fp32, CPU, clamped to [-1, 1]); ValueError if any model call
        returned non-finite values (the check costs one host sync, at the end).

        `guidance`: the classifier-free scale; None is the kind's default, or 0 (the
        unconditional model) when `classifier_guidance` > 0 (Dhariwal & Nichol's setting; pass
        both to combine them). `generator`: one `torch.Generator` (the noise is drawn from it
        first, then the sampler's noise) or one per sample. `callback()` runs after every model
        evaluation (`self.model_calls(sampler, steps)` of them).
        """
        c = self.components
        conditions = self._conditions(labels_or_prompts)
        b = conditions.shape[0] if isinstance(conditions, torch.Tensor) else len(conditions)
        if guidance is None:
            guidance = 0.0 if classifier_guidance > 0 else c.default_guidance
        SampleConfig(  # validates the numbers (finite, in range) and the sampler name
            sampler=sampler,
            steps=steps,
            guidance_scale=guidance,
            eta=0.0 if eta is None else eta,
            classifier_guidance=classifier_guidance,
        )
        if control is not None and not c.takes_control:
            raise ValueError(f"a {c.kind} pipeline takes no control image")
        if control is not None:
            if control.ndim < 1 or control.shape[0] != b:
                raise ValueError(f"control has {tuple(control.shape)}; need [B={b}, ...]")
            control = control.to(c.device)
        process = get_process(c.process_name)
        denoise = c.make_denoiser(conditions, guidance, control)
        if classifier_guidance > 0:
            denoise = self._classifier_guided(denoise, conditions, classifier_guidance)
        finite = _FiniteCheck(denoise)  # before clipping, which would hide an overflow
        denoise = finite
        if clip and c.x0_range is not None:
            denoise = clip_denoised(denoise, process, *c.x0_range)
        if callback is not None:
            denoise = _counting(denoise, callback)
        noise = _noise((b, *c.sample_shape), generator).to(c.device)
        x = sample(sampler, denoise, process, noise, steps, generator, eta)
        if not finite.all_finite():  # e.g. a huge finite guidance scale overflows
            raise ValueError(
                f"sampling produced non-finite values (guidance {guidance}, classifier guidance "
                f"{classifier_guidance}, {sampler}, {steps} steps): the model's output overflowed"
            )
        images = x if c.decode is None else c.decode(x)
        return images.float().cpu().clamp(-1.0, 1.0)

    @staticmethod
    def model_calls(sampler: str, steps: int) -> int:
        """Model evaluations of one call (the progress bar's total)."""
        return model_calls(sampler, steps)

    def _conditions(
        self, value: int | str | Sequence[int] | Sequence[str] | torch.Tensor
    ) -> Conditions:
        c = self.components
        if isinstance(value, str) or (
            isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value)
        ):
            prompts = [value] if isinstance(value, str) else [str(v) for v in value]
            if c.conditioning != "prompts":
                raise ValueError(f"a {c.kind} pipeline takes class labels, not prompts")
            return prompts
        if c.conditioning != "labels":
            raise ValueError(f"a {c.kind} pipeline takes prompts (strings), not labels")
        y_B = torch.as_tensor([value] if isinstance(value, int) else value)
        if y_B.ndim != 1 or y_B.numel() == 0 or y_B.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected a non-empty list of int labels, got {value!r}")
        if bool(((y_B < 0) | (y_B >= c.num_classes)).any()):
            raise ValueError(f"labels must be in [0, {c.num_classes}), got {y_B.tolist()}")
        return y_B.long().to(c.device)

    def _classifier_guided(
        self, denoise: DenoiseFn, conditions: Conditions, scale: float
    ) -> DenoiseFn:
        c = self.components
        if self.classifier is None:
            raise ValueError("classifier guidance needs a noise-aware classifier (classifier=...)")
        if not isinstance(conditions, torch.Tensor) or c.decode is not None:
            raise ValueError(f"classifier guidance needs a pixel-space label model, not {c.kind}")
        if self.classifier_process != c.process_name:
            raise ValueError(
                f"the classifier was trained on the {self.classifier_process!r} process, the "
                f"model samples {c.process_name!r}"
            )
        process = get_process(c.process_name)
        log_prob = classifier_log_prob(self.classifier, process, conditions)
        return classifier_guided(denoise, process, log_prob, scale)


# -- kinds ------------------------------------------------------------------------------------


def checkpoint_kind(path: Path) -> str:
    """The kind a checkpoint file's metadata or a folder's `pipeline.json` records."""
    if path.is_dir():
        index = path / PIPELINE_INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{path} is a folder without {PIPELINE_INDEX}")
        try:
            kind = json.loads(index.read_text())["kind"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a pipeline index with a 'kind': {err}") from None
        return str(kind)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    meta, _ = read_header(path)
    if "kind" in meta:
        return meta["kind"]
    if "dit_config" in meta:
        return CLASS_DIT
    raise ValueError(f"{path} is not a diffusion_ext checkpoint (no kind in its metadata)")


def resolve_loader(kind: str) -> Callable[[Path, LoadOptions], Components]:
    """The loader of `kind`, imported now; ValueError for an unknown kind or one not wired."""
    if kind not in KIND_LOADERS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known: {', '.join(KIND_LOADERS)}")
    module_name, _, name = KIND_LOADERS[kind].partition(":")
    loader = getattr(importlib.import_module(module_name), name, None)
    if loader is None:
        raise ValueError(f"kind {kind!r} is not wired to the pipeline yet ({module_name}.{name})")
    return loader  # type: ignore[no-any-return]


def with_attention(model: DiT, backend: str | None) -> DiT:
    """`model` (unchanged when `backend` is None or its own) or a copy on another attention
    backend: the backend is part of the frozen config, so the DiT is rebuilt and reloaded."""
    if backend is None or backend == model.config.attn_backend:
        return model
    copy = DiT(dataclasses.replace(model.config, attn_backend=backend))
    copy.load_state_dict(model.state_dict())
    return copy.to(next(model.parameters()).device).eval()


def class_dit_components(
    model: DiT, process_name: str, options: LoadOptions = LoadOptions()
) -> Components:
    """The class-conditional DiT (`checkpoint.load_dit`) as pipeline components."""
    model = with_attention(model, options.attention)
    model = model.to(options.device, options.policy.param_torch_dtype).eval()
    null_class = model.null_class
    cfg = model.config

    def make_denoiser(
        conditions: Conditions, guidance: float, control: torch.Tensor | None
    ) -> DenoiseFn:
        assert isinstance(conditions, torch.Tensor)
        process = get_process(process_name)
        if guidance == 0:  # the unconditional model: one null-label pass (= CFG at w = 0)
            y_null = torch.full_like(conditions, null_class)
            return model_denoiser(
                model, process, y_null, null_class=null_class, policy=options.policy
            )
        return model_denoiser(
            model,
            process,
            conditions,
            null_class=null_class,
            guidance_scale=guidance,
            policy=options.policy,
        )

    return Components(
        kind=CLASS_DIT,
        process_name=process_name,
        sample_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
        make_denoiser=make_denoiser,
        num_classes=cfg.num_classes,
        default_guidance=SampleConfig().guidance_scale,
        device=options.device,
    )


def load_class_dit_components(path: Path, options: LoadOptions) -> Components:
    """Loader of the "class-dit" kind (an `export_ema` file)."""
    model, process_name = load_dit(path)
    return class_dit_components(model, process_name, options)


# -- helpers --------------------------------------------------------------------------------


def _noise(shape: tuple[int, ...], generator: Generators) -> torch.Tensor:
    """N(0, I) on the CPU from one generator, or one per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g) for g in generator])


class _FiniteCheck:
    """A DenoiseFn that remembers, on the device, whether every output so far was finite."""

    def __init__(self, denoise: DenoiseFn) -> None:
        self.denoise = denoise
        self.finite: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0, eps = self.denoise(x, t_B)
        ok = torch.isfinite(x0).all() & torch.isfinite(eps).all()
        self.finite = ok if self.finite is None else self.finite & ok
        return x0, eps

    def all_finite(self) -> bool:
        return self.finite is None or bool(self.finite)


def _counting(denoise: DenoiseFn, callback: Callable[[], None]) -> DenoiseFn:
    def counted(x: torch.Tensor, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = denoise(x, t_B)
        callback()
        return out

    return counted


def grid_image(x_BCHW: torch.Tensor, rows: int, upscale: int = 4) -> np.ndarray:
    """One-channel images in [-1, 1] -> a [rows * (H + 1) + 1, cols * (W + 1) + 1] * upscale
    float32 canvas in [0, 1] (1 = ink), 1-pixel gutters, row-major."""
    b, c, h, w = x_BCHW.shape
    if c != 1 or rows < 1 or b % rows:
        raise ValueError(f"need one-channel images in full rows, got {tuple(x_BCHW.shape)}")
    cols = b // rows
    img = ((x_BCHW[:, 0].float().cpu().numpy() + 1.0) / 2.0).clip(0, 1)
    canvas = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1), dtype=np.float32)
    for i in range(b):
        r, k = divmod(i, cols)
        top, left = 1 + r * (h + 1), 1 + k * (w + 1)
        canvas[top : top + h, left : left + w] = img[i]
    return np.kron(canvas, np.ones((upscale, upscale), dtype=np.float32))


def save_grid(x_BCHW: torch.Tensor, rows: int, path: str | Path, upscale: int = 4) -> None:
    """Write `grid_image` as a grayscale PNG (ink dark on white), atomically."""
    import matplotlib.image

    canvas = grid_image(x_BCHW, rows, upscale)
    atomic_write(
        path,
        lambda tmp: matplotlib.image.imsave(
            tmp, canvas, cmap="gray_r", vmin=0.0, vmax=1.0, format="png"
        ),
    )
