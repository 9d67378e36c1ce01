"""Sample a trained DiT into a PNG grid (one row per class): `python -m diffusion_ext.sample`.

Shape legend: B batch, C channels, H/W image size, R rows (classes), K columns (samples per class).

Bad input (flags, checkpoint, output path) is one line `python -m diffusion_ext.sample: error: ...`
and exit code 2, checked before sampling where it can be. Without `--out` the grid goes to
`$XDG_CACHE_HOME/diffusion_ext/samples.png` (`~/.cache/...`), never under the current directory;
the PNG is written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from attention.precision import PRECISION_PRESETS, PrecisionPolicy
from attention.state_files import atomic_write
from diffusion_ext import cli
from diffusion_ext.checkpoint import load_dit
from diffusion_ext.config import MAX_THREADS, SampleConfig
from diffusion_ext.dit import DiT
from diffusion_ext.guidance import clip_denoised, model_denoiser
from diffusion_ext.samplers import sample
from diffusion_ext.schedules import get_process

DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "dit_digits_ema.safetensors"
OUT_SUFFIXES = (".png",)


def generate(
    model: DiT,
    process_name: str,
    y_B: torch.Tensor,
    config: SampleConfig,
    policy: PrecisionPolicy = PRECISION_PRESETS["fp32"],
) -> torch.Tensor:
    """Samples x_BCHW (fp32, clamped to [-1, 1]) for labels y_B with `config`'s sampler and
    classifier-free guidance scale; deterministic given `config.seed`."""
    process = get_process(process_name)
    c = model.config
    generator = torch.Generator().manual_seed(config.seed)
    noise = torch.randn(
        (y_B.shape[0], c.in_channels, c.image_size, c.image_size), generator=generator
    )
    denoise = model_denoiser(
        model,
        process,
        y_B,
        null_class=model.null_class,
        guidance_scale=config.guidance_scale,
        policy=policy,
    )
    if config.clip_denoised:
        denoise = clip_denoised(denoise, process)
    x = sample(config.sampler, denoise, process, noise, config.steps, generator)
    return x.clamp(-1.0, 1.0)


def class_grid(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels y_B = [0]*K + [1]*K + ... (row-major grid order)."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def save_grid(x_BCHW: torch.Tensor, rows: int, path: str | Path, upscale: int = 4) -> None:
    """Write a grayscale PNG grid with `rows` rows (ink dark on white), 1-pixel gutters,
    atomically (a temporary file renamed over `path`)."""
    import matplotlib.image

    b, c, h, w = x_BCHW.shape
    if c != 1 or b % rows:
        raise ValueError(f"need one-channel images in full rows, got {tuple(x_BCHW.shape)}")
    cols = b // rows
    img = ((x_BCHW[:, 0].float().numpy() + 1.0) / 2.0).clip(0, 1)  # 1 = ink
    canvas = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1), dtype=np.float32)
    for i in range(b):
        r, k = divmod(i, cols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = img[
            i
        ]
    canvas = np.kron(canvas, np.ones((upscale, upscale), dtype=np.float32))
    atomic_write(
        path,
        lambda tmp: matplotlib.image.imsave(
            tmp, canvas, cmap="gray_r", vmin=0.0, vmax=1.0, format="png"
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="python -m diffusion_ext.sample", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="a .png file; default: $XDG_CACHE_HOME/diffusion_ext/samples.png (~/.cache if unset)",
    )
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISION_PRESETS))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    defaults = SampleConfig()
    for field in dataclasses.fields(SampleConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            parser.add_argument(
                flag, type=type(getattr(defaults, field.name)), default=field.default
            )
    return parser


def config_from_args(args: argparse.Namespace) -> SampleConfig:
    """The `SampleConfig` of parsed flags (ValueError for a bad value, e.g. a NaN scale)."""
    return SampleConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SampleConfig)})


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not 1 <= args.threads <= MAX_THREADS:
        raise cli.UserError(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    out = args.out or cli.cache_dir() / "samples.png"
    cli.check_out_file(out, "--out", OUT_SUFFIXES)  # before the model loads and samples
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model, process_name = load_dit(args.checkpoint)
    policy = PRECISION_PRESETS[args.precision]
    model = model.to(policy.param_torch_dtype)
    y_B = class_grid(model.config.num_classes, config.per_class)
    with torch.no_grad():
        x = generate(model, process_name, y_B, config, policy)
    if not bool(torch.isfinite(x).all()):  # e.g. a huge finite guidance scale overflows
        raise cli.UserError(
            f"sampling produced non-finite values (guidance_scale {config.guidance_scale}, "
            f"{config.sampler}, {config.steps} steps); nothing written"
        )
    save_grid(x, model.config.num_classes, out)
    print(json.dumps({"out": str(out), **dataclasses.asdict(config)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
