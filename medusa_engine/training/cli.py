"""Train draft heads on a frozen base model (the `medusa-engine train-heads` command).

Also `python -m medusa_engine.training.cli` and `accelerate launch -m medusa_engine.training.cli`
(DDP). Flags map one-to-one onto `TrainConfig` fields, plus data, output and self-distillation
flags. `medusa-engine --help` builds this parser, so the heavy imports (transformers, accelerate,
datasets) wait in `pipeline.py` until `run`. Bad input ends with one `train-heads: error: ...`
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medusa_engine.config import HEAD_KINDS
from medusa_engine.training.config import TrainConfig, TrainError

CHECKPOINT = "train_state.safetensors"  # default training state file, inside --out


def add_arguments(p: Any) -> None:
    """The `train-heads` flags (TrainConfig fields one-to-one, plus data and output)."""
    p.add_argument("--model", required=True, help="alias, HF folder, .gguf file or hub id")
    p.add_argument("--data", required=True, help="json/jsonl/txt/parquet file or hub dataset")
    p.add_argument("--out", required=True, help="heads folder to write (config, weights, metrics)")
    p.add_argument("--split", default="train", help="split of a hub dataset")
    p.add_argument("--max-examples", type=int, default=0, help="use the first N records (0 = all)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="held out: the last part")
    dtypes = ["auto", "bf16", "fp16", "fp32"]
    p.add_argument("--dtype", default="auto", choices=dtypes, help="the frozen base model's dtype")
    p.add_argument("--device", default=None, help="default: what accelerate picks")
    p.add_argument("--checkpoint", default=None, help=f"training state (default OUT/{CHECKPOINT})")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if present")
    p.add_argument(
        "--with-reference-answers",
        action="store_true",
        help="--kind recurrent + --self-distill: also train on the data's own answers",
    )
    p.add_argument(
        "--save-dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="dtype of the written heads' weights (bf16 halves the file)",
    )
    p.add_argument(
        "--features-cache",
        default=None,
        help="--kind recurrent: cached base features (default beside --checkpoint)",
    )
    _add_distill_arguments(p)
    _add_config_arguments(p)


def _add_distill_arguments(p: Any) -> None:
    p.add_argument(
        "--self-distill",
        action="store_true",
        help="train on the base model's own answers to the data's prompts",
    )
    p.add_argument("--distill-cache", default=None, help="default runs/self_distill/<model>-<data>")
    p.add_argument("--distill-max-new-tokens", type=int, default=256)
    p.add_argument("--distill-temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--distill-batch-size", type=int, default=8)
    p.add_argument(
        "--extra-distill-temperature",
        type=float,
        action="append",
        default=[],
        metavar="T",
        help="--self-distill: one more answer per prompt, sampled at T (seed + i + 1, its own "
        "cache beside --distill-cache); repeatable; prompts of held-out examples are left out",
    )
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=32,
        help="plain text + --self-distill: continue the first N tokens",
    )


def _add_config_arguments(p: Any) -> None:
    """One flag per `TrainConfig` field, its default the field's."""
    for name, value in asdict(TrainConfig()).items():
        flag = "--" + name.replace("_", "-")
        if name == "shared_lm_head":  # default on
            help_ = "give each head its own vocabulary projection (published format)"
            p.add_argument("--own-lm-head", dest=name, action="store_false", help=help_)
        elif name == "out_map":  # default on
            help_ = "no residual linear map after the blocks (HeadsConfig.out_map)"
            p.add_argument("--no-out-map", dest=name, action="store_false", help=help_)
        elif name == "precision":
            p.add_argument(flag, default=value, choices=["fp32", "bf16", "fp16"])
        elif name == "kind":
            help_ = "medusa: independent heads; recurrent: heads that read the drafted tokens"
            p.add_argument(flag, default=value, choices=list(HEAD_KINDS), help=help_)
        else:
            p.add_argument(flag, type=type(value), default=value)


def config_from_args(args: Any) -> TrainConfig:
    return TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__})


def check_writable(out: Path) -> None:
    """Fail before any work when the heads folder cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise TrainError(f"heads folder {out} is not writable: {err.strerror or err}") from None


def run(args: Any) -> int:
    """`train-heads`: data -> (self-distill) -> train -> held-out accuracy -> heads + metrics."""
    cfg = config_from_args(args)
    out = Path(args.out)
    check_writable(out)
    checkpoint = Path(args.checkpoint) if args.checkpoint else out / CHECKPOINT
    from medusa_engine.training import pipeline  # transformers, accelerate: see the docstring

    return pipeline.train_heads(args, cfg, out, checkpoint)


def main(argv: list[str] | None = None) -> int:
    """The command on its own: `python -m` / `accelerate launch -m medusa_engine.training.cli`."""
    parser = argparse.ArgumentParser(prog="train-heads", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, OSError) as err:
        print(f"train-heads: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
