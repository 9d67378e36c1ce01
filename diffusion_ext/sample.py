"""Sample a trained model into a PNG grid: `python -m diffusion_ext.sample [--checkpoint FILE]`.

Shape legend: B batch, C channels, H/W image size, R rows (classes), K columns (samples per class).

The work is `pipeline.Pipeline`: the checkpoint's kind decides the model (the committed
class-conditional DiT by default), so every kind samples through this one command. Rows are the
classes for a label kind ("class-dit", "latent-dit"); the `--prompts` (";"-separated, default
"a zero" ... "a nine") for a prompt kind ("mmdit"); for a kind that takes a control map
("controlnet") the classes, each controlled by the Sobel edges of the first held-out digit of that
class. Without `--guidance-scale` the kind's default scale is used. Flags map onto `SampleConfig`, plus `--attention BACKEND` (any of
`attention.api.BACKENDS`; one that cannot run here, e.g. triton without CUDA, is a one-line error
before loading), `--classifier-guidance SCALE` with the noise-aware classifier `--classifier`
(without `--guidance-scale` the DiT then runs unconditionally, as in Dhariwal & Nichol, 2021), and
a tqdm bar of model evaluations on stderr when it is a terminal (`--no-progress`).

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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attention.api import BACKENDS, check_backend
from attention.precision import PRECISION_PRESETS, PrecisionPolicy
from diffusion_ext import cli
from diffusion_ext.checkpoint import load_dit
from diffusion_ext.config import MAX_THREADS, SampleConfig
from diffusion_ext.dit import DiT
from diffusion_ext.noisy_classifier import DEFAULT_NOISY_CLASSIFIER, load_guidance_classifier
from diffusion_ext.pipeline import (
    CLASS_DIT,
    Components,
    Conditions,
    LoadOptions,
    Pipeline,
    checkpoint_kind,
    class_dit_components,
    resolve_loader,
    save_grid,
)

DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "dit_digits_ema.safetensors"
OUT_SUFFIXES = (".png",)
__all__ = ["class_grid", "generate", "main", "save_grid"]


def generate(
    model: DiT,
    process_name: str,
    y_B: torch.Tensor,
    config: SampleConfig,
    policy: PrecisionPolicy = PRECISION_PRESETS["fp32"],
    classifier: tuple[nn.Module, str] | None = None,
) -> torch.Tensor:
    """Samples x_BCHW (fp32, clamped to [-1, 1]) for labels y_B with `config`'s sampler,
    classifier-free guidance scale and (with `classifier` = (noise-aware classifier, its
    process)) classifier guidance; deterministic given `config.seed`."""
    components = class_dit_components(model, process_name, LoadOptions(policy=policy))
    pipe = Pipeline(components, *(classifier or (None, None)))
    return pipe(y_B, generator=torch.Generator().manual_seed(config.seed), **call_kwargs(config))


def call_kwargs(config: SampleConfig) -> dict[str, Any]:
    """`Pipeline.__call__` keywords of a `SampleConfig` (all but per_class and seed)."""
    return {
        "steps": config.steps,
        "sampler": config.sampler,
        "guidance": config.guidance_scale,
        "eta": config.eta if config.sampler == "ddim" else None,
        "classifier_guidance": config.classifier_guidance,
        "clip": config.clip_denoised,
    }


def class_grid(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels y_B = [0]*K + [1]*K + ... (row-major grid order)."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def default_prompts(num_classes: int = 10) -> list[str]:
    """One plain prompt per class: "a zero", ..., "a nine"."""
    from diffusion_ext.text import caption

    return [caption(k) for k in range(num_classes)]


def held_out_controls(num_classes: int) -> torch.Tensor:
    """Control maps [K, 1, 8, 8]: the Sobel edges of the first held-out digit of each class."""
    from diffusion_ext.controlnet import sobel_edges
    from diffusion_ext.data import load_digits_split

    split = load_digits_split()
    first = [int((split.y_test_N == k).nonzero()[0]) for k in range(num_classes)]
    return sobel_edges(split.x_test_NCHW[first])


def grid_inputs(
    components: Components, prompts: str | None, per_class: int
) -> tuple[Conditions, torch.Tensor | None, int]:
    """(labels or prompts [B], control maps [B, 1, 8, 8] or None, rows) of a grid with
    `per_class` samples per row for `components`' kind (rows: the module docstring)."""
    control = None
    if components.conditioning == "prompts":
        rows = default_prompts() if prompts is None else [p.strip() for p in prompts.split(";")]
        return [p for p in rows for _ in range(per_class)], control, len(rows)
    if prompts is not None:
        raise cli.UserError(f"--prompts: a {components.kind} checkpoint takes class labels")
    if components.takes_control:
        control = held_out_controls(components.num_classes).repeat_interleave(per_class, 0)
    return class_grid(components.num_classes, per_class), control, components.num_classes


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
    parser.add_argument(
        "--attention",
        default=None,
        metavar="BACKEND",
        help=f"attention backend ({', '.join(BACKENDS)}); default: the checkpoint's",
    )
    parser.add_argument(
        "--classifier",
        type=Path,
        default=DEFAULT_NOISY_CLASSIFIER,
        help="the noise-aware classifier for --classifier-guidance",
    )
    parser.add_argument(
        "--prompts",
        default=None,
        help="a prompt kind's rows, separated by ';' (default: 'a zero;...;a nine')",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a progress bar on stderr (only when it is a terminal)",
    )
    defaults = SampleConfig()
    for field in dataclasses.fields(SampleConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        elif field.name == "guidance_scale":
            parser.add_argument(
                flag,
                type=float,
                default=None,
                help=f"classifier-free guidance; default the kind's ({defaults.guidance_scale} for "
                "the class DiT), or 0 (the unconditional model) with --classifier-guidance",
            )
        else:
            parser.add_argument(
                flag, type=type(getattr(defaults, field.name)), default=field.default
            )
    return parser


def config_from_args(args: argparse.Namespace) -> SampleConfig:
    """The `SampleConfig` of parsed flags (ValueError for a bad value, e.g. a NaN scale)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SampleConfig)}
    if values["guidance_scale"] is None:  # Dhariwal & Nichol: classifier guidance alone
        classifier_guided = isinstance(values["classifier_guidance"], float) and (
            values["classifier_guidance"] > 0
        )
        values["guidance_scale"] = 0.0 if classifier_guided else SampleConfig().guidance_scale
    return SampleConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not 1 <= args.threads <= MAX_THREADS:
        raise cli.UserError(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    out = args.out or cli.cache_dir() / "samples.png"
    cli.check_out_file(out, "--out", OUT_SUFFIXES)  # before the model loads and samples
    options = LoadOptions(attention=args.attention, policy=PRECISION_PRESETS[args.precision])
    if args.attention is not None:
        check_backend(args.attention, options.device)  # e.g. triton without CUDA: one line
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    classifier = None
    if config.classifier_guidance > 0:
        classifier = load_guidance_classifier(args.classifier)
    kind = checkpoint_kind(args.checkpoint)
    if kind == CLASS_DIT:
        model, process_name = load_dit(args.checkpoint)
        components = class_dit_components(model, process_name, options)
    else:
        components = resolve_loader(kind)(args.checkpoint, options)
    if args.guidance_scale is None and config.classifier_guidance == 0:
        config = dataclasses.replace(config, guidance_scale=components.default_guidance)
    pipe = Pipeline(components, *(classifier or (None, None)))
    conditions, control, rows = grid_inputs(components, args.prompts, config.per_class)
    x = _sample_with_progress(pipe, conditions, control, config, args.progress)
    if not bool(torch.isfinite(x).all()):  # e.g. a huge finite guidance scale overflows
        raise cli.UserError(
            f"sampling produced non-finite values (guidance_scale {config.guidance_scale}, "
            f"{config.sampler}, {config.steps} steps); nothing written"
        )
    save_grid(x, rows, out)
    print(json.dumps({"out": str(out), "kind": kind, **dataclasses.asdict(config)}))
    return 0


def _sample_with_progress(
    pipe: Pipeline,
    conditions: Conditions,
    control: torch.Tensor | None,
    config: SampleConfig,
    progress: bool,
) -> torch.Tensor:
    """`pipe` on labels or prompts with a tqdm bar of model evaluations on stderr (off unless a
    terminal)."""
    from tqdm import tqdm

    total = pipe.model_calls(config.sampler, config.steps)
    disable = None if progress else True  # None: tqdm turns itself off when not a terminal
    with tqdm(total=total, desc="sample", unit="call", disable=disable, file=sys.stderr) as bar:
        return pipe(
            conditions,
            control=control,
            generator=torch.Generator().manual_seed(config.seed),
            callback=lambda: bar.update(1),
            **call_kwargs(config),
        )


if __name__ == "__main__":
    raise SystemExit(main())
