"""Comparison grids from, and measurements of, an MM-DiT or ControlNet checkpoint: `python -m
diffusion_ext.sample_cond --checkpoint FILE --out grid.png [--evaluate]`.

Shape legend: B batch, C = 1 channel, H = W = 8, K classes, R rows, J columns.

A plain grid of any kind is `python -m diffusion_ext.sample --checkpoint FILE` (the pipeline);
this command adds what only these two kinds have: grids that compare (thin vs bold rows; the
control map beside samples with and without the ControlNet from the same noise) and `--evaluate`,
the measurements behind the README's tables. Its samples equal the pipeline's for the same
generators (`tests/test_diffusion_pipeline.py`). The checkpoint's `kind` metadata picks the model:

* `mmdit`: one grid row per prompt (`--prompts "a thin seven;a bold seven"`; by default thin and
  bold for every class, then slants), `--per-row` samples each. `--evaluate` measures, at
  `--guidance`: class accuracy of `--per-class` samples of "a <digit>" per class by the quality
  gate's classifier, their Fréchet distance to the held-out split and the floor (train vs
  held-out) with the same classifier features (`quality.py`); the mean ink (`text.ink_mass`) of
  "a bold <digit>" vs "a thin <digit>" samples per class; the mean shear of "slanted left" vs
  "slanted right".
* `controlnet`: one row per held-out digit (the first of each class): its control map (Sobel
  edges), then `--per-row` samples with the ControlNet, then as many of the base alone (same
  noise). `--evaluate` measures, over the whole held-out split, the edge IoU (`controlnet.edge_iou`)
  with and without the ControlNet from the same noise, and the class accuracy of both.

Bad input is one line `python -m diffusion_ext.sample_cond: error: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffusion_ext import cli
from diffusion_ext.checkpoint import read_metadata
from diffusion_ext.config import MAX_SAMPLE_STEPS, MAX_THREADS, SAMPLER_NAMES
from diffusion_ext.controlnet import DEFAULT_GUIDANCE as CONTROLNET_GUIDANCE
from diffusion_ext.data import load_digits_split
from diffusion_ext.mmdit import DEFAULT_GUIDANCE as MMDIT_GUIDANCE
from diffusion_ext.sample import save_grid

ASSETS = Path(__file__).parent / "assets"


def default_prompts() -> list[str]:
    from diffusion_ext.text import caption

    rows = [caption(k, ink) for k in range(10) for ink in (0, 2)]
    return rows + [caption(k, None, s) for k in (1, 7) for s in (0, 1, 2)]


def _generators(seed: int, n: int) -> list[torch.Generator]:
    """One generator per sample: sample i is the same whatever the batch it is drawn in."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(n)]


def _mmdit(args: argparse.Namespace) -> dict[str, Any]:
    from diffusion_ext.mmdit import load_mmdit_pipeline
    from diffusion_ext.text import DIGIT_WORDS, caption, ink_mass, shear, tokenize

    prompts = [p.strip() for p in args.prompts.split(";")] if args.prompts else default_prompts()
    tokenize(prompts)  # unknown words: an error before anything samples
    pipe = load_mmdit_pipeline(args.checkpoint, "cpu", args.sampler)
    rows = [p for p in prompts for _ in range(args.per_row)]
    x = pipe.sample(rows, args.steps, args.guidance, _generators(args.seed, len(rows)))
    save_grid(x, len(prompts), args.out)
    result: dict[str, Any] = {"out": str(args.out), "prompts": prompts}
    if not args.evaluate:
        return result
    n = args.per_class
    gens = _generators(args.seed + 1, 10 * n)
    plain = [caption(k) for k in range(10) for _ in range(n)]
    x = pipe.sample(plain, args.steps, args.guidance, gens)
    result.update(_accuracy_fd(x, torch.arange(10).repeat_interleave(n)))
    ink: dict[str, list[float]] = {}
    for word, level in (("thin", 0), ("bold", 2)):
        xs = pipe.sample(
            [caption(k, level) for k in range(10) for _ in range(n)],
            args.steps,
            args.guidance,
            gens,
        )
        ink[word] = ink_mass(xs).reshape(10, n).mean(1).tolist()
    result["ink_thin"], result["ink_bold"] = ink["thin"], ink["bold"]
    result["bold_gt_thin_classes"] = sum(b > t for b, t in zip(ink["bold"], ink["thin"]))
    for word, level in (("left", 0), ("right", 2)):
        xs = pipe.sample(
            [caption(k, None, level) for k in range(10) for _ in range(n)],
            args.steps,
            args.guidance,
            gens,
        )
        result[f"shear_{word}"] = float(shear(xs).mean())
    result["classes"] = list(DIGIT_WORDS)
    return result


def _accuracy_fd(x_NCHW: torch.Tensor, y_N: torch.Tensor) -> dict[str, float]:
    """Class accuracy, FD vs held-out and the train/held-out floor (quality gate's classifier)."""
    from diffusion_ext.quality import (
        DEFAULT_CLASSIFIER,
        accuracy,
        features,
        frechet_distance,
        load_classifier,
    )

    classifier = load_classifier(DEFAULT_CLASSIFIER)
    split = load_digits_split()
    held_out = features(classifier, split.x_test_NCHW)
    floor = frechet_distance(features(classifier, split.x_train_NCHW), held_out)
    fd = frechet_distance(features(classifier, x_NCHW), held_out)
    return {
        "accuracy": accuracy(classifier, x_NCHW, y_N),
        "fd": fd,
        "fd_floor": floor,
        "fd_over_floor": fd / floor,
    }


def _controlnet(args: argparse.Namespace) -> dict[str, Any]:
    from diffusion_ext.controlnet import edge_iou, load_controlnet_pipeline, sobel_edges
    from diffusion_ext.quality import DEFAULT_CLASSIFIER, accuracy, load_classifier

    pipe = load_controlnet_pipeline(args.checkpoint, "cpu", sampler=args.sampler)
    split = load_digits_split()
    first = [int((split.y_test_N == k).nonzero()[0]) for k in range(10)]
    y_R, control_R = split.y_test_N[first], sobel_edges(split.x_test_NCHW[first])
    j = args.per_row
    y_B, control_B = y_R.repeat_interleave(j), control_R.repeat_interleave(j, 0)
    gens = _generators(args.seed, len(y_B))
    with_cn = pipe.sample(y_B, control_B, args.steps, args.guidance, gens)
    without = pipe.sample(y_B, control_B, args.steps, args.guidance, gens, use_control=False)
    grid = torch.cat(
        [
            2 * control_R[:, None] - 1,
            with_cn.reshape(10, j, 1, 8, 8),
            without.reshape(10, j, 1, 8, 8),
        ],
        dim=1,
    ).reshape(-1, 1, 8, 8)
    save_grid(grid, 10, args.out)
    result: dict[str, Any] = {"out": str(args.out), "columns": f"control, {j} with, {j} without"}
    if not args.evaluate:
        return result
    y_N, control_N = split.y_test_N, sobel_edges(split.x_test_NCHW)
    gens = _generators(args.seed + 1, len(y_N))
    with_cn = pipe.sample(y_N, control_N, args.steps, args.guidance, gens)
    without = pipe.sample(y_N, control_N, args.steps, args.guidance, gens, use_control=False)
    classifier = load_classifier(DEFAULT_CLASSIFIER)
    result.update(
        {
            "edge_iou_with": edge_iou(with_cn, control_N),
            "edge_iou_without": edge_iou(without, control_N),
            "edge_iou_other_digit_same_class": edge_iou(_same_class_other(split), control_N),
            "accuracy_with": accuracy(classifier, with_cn, y_N),
            "accuracy_without": accuracy(classifier, without, y_N),
            "n": len(y_N),
        }
    )
    return result


def _same_class_other(split: Any) -> torch.Tensor:
    """Each held-out digit replaced by the next held-out digit of its class (a reference: how
    much a different digit of the right class overlaps the control by chance)."""
    x_N, y_N = split.x_test_NCHW, split.y_test_N
    out_N = x_N.clone()
    for k in range(10):
        idx = (y_N == k).nonzero()[:, 0]
        out_N[idx] = x_N[idx.roll(1)]
    return out_N


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m diffusion_ext.sample_cond", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--checkpoint", type=Path, default=ASSETS / "mmdit_digits.safetensors")
    parser.add_argument("--out", type=Path, default=None, help="a .png; default <cache>/KIND.png")
    parser.add_argument("--prompts", default=None, help="mmdit: rows, separated by ';'")
    parser.add_argument("--per-row", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--guidance", type=float, default=None, help="default: the kind's own")
    parser.add_argument("--sampler", default="heun", choices=["heun", "rf-euler"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate", action="store_true", help="also measure the bars")
    parser.add_argument("--per-class", type=int, default=100, help="mmdit --evaluate")
    parser.add_argument("--threads", type=int, default=1)
    return parser


GUIDANCE = {"mmdit": MMDIT_GUIDANCE, "controlnet": CONTROLNET_GUIDANCE}  # the kinds' defaults


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    if not 1 <= args.steps <= MAX_SAMPLE_STEPS:
        raise cli.UserError(f"--steps must be in [1, {MAX_SAMPLE_STEPS}], got {args.steps}")
    if not (1 <= args.per_row <= 64 and 2 <= args.per_class <= 1000):
        raise cli.UserError("need 1 <= --per-row <= 64 and 2 <= --per-class <= 1000")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise cli.UserError(f"--guidance must be finite and >= 0, got {args.guidance}")
    if not 1 <= args.threads <= MAX_THREADS or not 0 <= args.seed < 2**32:
        raise cli.UserError(f"need 1 <= --threads <= {MAX_THREADS} and 0 <= --seed < 2**32")
    assert args.sampler in SAMPLER_NAMES
    if not args.checkpoint.is_file():
        raise cli.UserError(f"--checkpoint {args.checkpoint}: no such file")
    kind = read_metadata(args.checkpoint).get("kind")
    if kind not in GUIDANCE:
        raise cli.UserError(
            f"--checkpoint {args.checkpoint}: kind {kind!r} is not mmdit/controlnet"
        )
    args.out = args.out or cli.cache_dir() / f"{kind}.png"
    cli.check_out_file(args.out, "--out", (".png",))
    args.guidance = GUIDANCE[kind] if args.guidance is None else args.guidance
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = _mmdit(args) if kind == "mmdit" else _controlnet(args)
    result.update(
        {"kind": kind, "guidance": args.guidance, "steps": args.steps, "sampler": args.sampler}
    )
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
