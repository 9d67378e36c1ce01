"""GPU benchmark: DiT forward images/s per attention backend: `python -m eval.bench_diffusion`.

Default: DiT-XL/2 on 32x32x4 latents, batch 32, bf16 weights and compute (no autocast
overhead), every backend in `attention.api.BACKENDS` on the same random weights in the same
process, SDPA being the baseline. Warm-up iterations run first; the mean of CUDA events around
each call (`eval.timing.time_calls`). Prints a table, then one JSON line stamped with device,
dtype and versions (`eval.timing.environment`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import statistics
import sys
from collections.abc import Sequence

import torch

from attention.api import BACKENDS
from diffusion_ext.config import get_dit_config
from diffusion_ext.dit import DiT
from eval.timing import environment, load_average, time_calls

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run_bench(
    preset: str = "DiT-XL/2",
    batch: int = 32,
    iters: int = 20,
    warmup: int = 5,
    dtype: str = "bf16",
    backends: Sequence[str] = BACKENDS,
    device: str = "cuda",
) -> list[dict[str, float | str]]:
    """One row per backend: mean ms per forward and images/s.

    `device="cpu"` exists only so that tests can smoke-run this function; the CLI is CUDA-only.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the DiT benchmark needs a CUDA device")
    torch.manual_seed(0)
    base = DiT(get_dit_config(preset)).to(device, _DTYPES[dtype]).eval()
    with torch.no_grad():  # non-zero adaLN/output weights: time the real arithmetic
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    c = base.config
    x = torch.randn(
        batch, c.in_channels, c.image_size, c.image_size, device=device, dtype=_DTYPES[dtype]
    )
    t = torch.rand(batch, device=device) * 1000
    y = torch.randint(0, c.num_classes, (batch,), device=device)
    rows: list[dict[str, float | str]] = []
    for backend in backends:
        try:
            model = DiT(dataclasses.replace(c, attn_backend=backend)).to(device, _DTYPES[dtype])
            model.load_state_dict(base.state_dict())
            with torch.no_grad():
                forward = functools.partial(model, x, t, y)
                seconds = time_calls(forward, device, iters=iters, warmup=warmup, clock="events")
            ms = 1e3 * statistics.fmean(seconds)
        except Exception as err:  # one failing backend must not hide the others' numbers
            logger.warning("backend %s failed: %s", backend, err)
            rows.append(
                {
                    "backend": backend,
                    "ms_per_forward": float("nan"),
                    "images_per_s": float("nan"),
                    "error": f"{type(err).__name__}: {err}"[:200],
                }
            )
            continue
        rows.append({"backend": backend, "ms_per_forward": ms, "images_per_s": batch / ms * 1e3})
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    sdpa = next((r for r in rows if r["backend"] == "sdpa"), None)
    for r in rows:
        r["speed_vs_sdpa"] = (
            float(r["images_per_s"]) / float(sdpa["images_per_s"]) if sdpa else float("nan")
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.bench_diffusion", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", default="DiT-XL/2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args(argv)
    load_start = load_average()
    try:
        rows = run_bench(
            args.preset, args.batch, args.iters, args.warmup, args.dtype, args.backends.split(",")
        )
    except (RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'backend':>10} {'ms/forward':>11} {'images/s':>10} {'vs sdpa':>8}")
    for r in rows:
        print(
            f"{r['backend']:>10} {r['ms_per_forward']:11.2f} {r['images_per_s']:10.1f} {r['speed_vs_sdpa']:8.2f}"
        )
    stamp = {
        "bench": "dit_forward",
        "preset": args.preset,
        "batch": args.batch,
        **environment("cuda", _DTYPES[args.dtype], load_start),
        "rows": [{k: None if v != v else v for k, v in r.items()} for r in rows],  # NaN -> null
    }
    print(json.dumps(stamp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
