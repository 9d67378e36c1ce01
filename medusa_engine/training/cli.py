"""Train draft heads on a frozen base model (the `medusa-engine train-heads` command).

Also `python -m medusa_engine.training.cli` and `accelerate launch -m medusa_engine.training.cli`
(DDP). Flags map one-to-one onto `TrainConfig` fields, plus data, output and self-distillation
flags. `medusa-engine --help` builds this parser, so the heavy imports (transformers, accelerate,
datasets) wait in `pipeline.py` until `run`.

Bad input ends with one `train-heads: error: ...` line on stderr and exit code 2, before any
work when the flags alone show it, and loses nothing: heads already in --out are replaced only
with --overwrite or --resume, --resume needs its checkpoint, a folder the run created is removed
again when the run fails with it still empty. SIGINT / SIGTERM during training save a
checkpoint of the step reached, then exit with 130 / 143; --resume continues from it.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medusa_engine.config import HEAD_KINDS
from medusa_engine.training.config import TrainConfig, TrainError, TrainInterrupted

CHECKPOINT = "train_state.safetensors"  # default training state file, inside --out
HEADS_FILES = ("config.json", "heads.safetensors")  # what makes --out a heads folder already


def add_arguments(p: Any) -> None:
    """The `train-heads` flags (TrainConfig fields one-to-one, plus data and output)."""
    p.add_argument("--model", required=True, help="alias, HF folder, .gguf file or hub id")
    p.add_argument("--data", required=True, help="json/jsonl/txt/parquet file or hub dataset")
    p.add_argument("--out", required=True, help="heads folder to write (config, weights, metrics)")
    p.add_argument("--split", default="train", help="split of a hub dataset")
    p.add_argument("--overwrite", action="store_true", help="replace heads already in --out")
    p.add_argument("--max-examples", type=int, default=0, help="use the first N records (0 = all)")
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=0.05,
        help="held out for evaluation: the last part, in (0, 1)",
    )
    dtypes = ["auto", "bf16", "fp16", "fp32"]
    p.add_argument("--dtype", default="auto", choices=dtypes, help="the frozen base model's dtype")
    p.add_argument("--device", default=None, help="default: what accelerate picks")
    p.add_argument("--checkpoint", default=None, help=f"training state (default OUT/{CHECKPOINT})")
    p.add_argument(
        "--resume", action="store_true", help="continue from --checkpoint (it must exist)"
    )
    p.add_argument(
        "--with-reference-answers",
        action="store_true",
        help="--kind recurrent/eagle3 + --self-distill: also train on the data's own answers",
    )
    p.add_argument(
        "--save-dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="dtype of the written heads' weights (bf16 halves the file)",
    )
    p.add_argument(
        "--aux-layers",
        type=int,
        nargs=3,
        default=None,
        metavar="K",
        help="--kind eagle3: the base layers whose outputs the draft fuses (default: the inputs "
        "of layers 2, L/2 and L - 3, as SGLang and vLLM pick)",
    )
    p.add_argument(
        "--features-cache",
        default=None,
        help="--kind recurrent or eagle3: cached base features (default beside --checkpoint)",
    )
    _add_distill_arguments(p)
    _add_config_arguments(p)


def _add_distill_arguments(p: Any) -> None:
    p.add_argument(
        "--self-distill",
        action="store_true",
        help="train on the base model's own answers to the data's prompts",
    )
    p.add_argument(
        "--distill-cache",
        default=None,
        help="folder of the answers (default: one per model, prompts and settings in the user "
        "cache, $MEDUSA_ENGINE_CACHE/self_distill/)",
    )
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
            help_ = (
                "medusa: independent heads; recurrent: heads that read the drafted tokens; "
                "eagle3: one decoder layer over fused base layers (EAGLE-3, exportable)"
            )
            p.add_argument(flag, default=value, choices=list(HEAD_KINDS), help=help_)
        elif name == "steps":
            p.add_argument(flag, type=int, default=value, help="0 = --epochs passes over the data")
        else:
            p.add_argument(flag, type=type(value), default=value)


def config_from_args(args: Any) -> TrainConfig:
    return TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__})


def check_flags(args: Any) -> None:
    """The flags outside `TrainConfig` that are wrong whatever the data (before any work)."""
    if args.extra_distill_temperature and not args.self_distill:
        raise TrainError("--extra-distill-temperature needs --self-distill")
    if args.with_reference_answers and (
        args.kind not in ("recurrent", "eagle3") or not args.self_distill
    ):
        raise TrainError(
            "--with-reference-answers needs --kind recurrent or eagle3 and --self-distill"
        )
    if not 0 < args.eval_fraction < 1:  # 0 would report accuracies on nothing
        raise TrainError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    if args.max_examples < 0:
        raise TrainError(f"--max-examples must be >= 0 (0 = all), got {args.max_examples}")
    if args.self_distill:
        for flag in ("distill_max_new_tokens", "distill_batch_size", "prompt_tokens"):
            if getattr(args, flag) < 1:
                name = "--" + flag.replace("_", "-")
                raise TrainError(f"{name} must be positive, got {getattr(args, flag)}")
        temperatures = [("--distill-temperature", args.distill_temperature)]
        temperatures += [("--extra-distill-temperature", t) for t in args.extra_distill_temperature]
        for flag, t in temperatures:
            if not (t >= 0 and math.isfinite(t)):
                raise TrainError(f"{flag} must be >= 0 and finite, got {t}")


def check_output(args: Any, out: Path, checkpoint: Path) -> None:
    """Nothing already there is lost: heads in `out` are replaced only with --overwrite or
    --resume, and --resume needs its checkpoint."""
    if args.resume and not checkpoint.is_file():
        raise TrainError(f"--resume: no checkpoint at {checkpoint} (start without --resume)")
    present = [name for name in HEADS_FILES if (out / name).exists()]
    if present and not (args.overwrite or args.resume):
        raise TrainError(
            f"{out} already holds heads ({', '.join(present)}); add --overwrite to replace them"
        )


def check_writable(out: Path) -> None:
    """Fail before any work when the heads folder cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise TrainError(f"heads folder {out} is not writable: {err.strerror or err}") from None


def _missing_folders(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for folder in (path, *path.absolute().parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; one that holds anything stays, and so do its parents
        try:
            folder.rmdir()
        except OSError:
            return


def run(args: Any) -> int:
    """`train-heads`: data -> (self-distill) -> train -> held-out accuracy -> heads + metrics."""
    cfg = config_from_args(args)
    check_flags(args)
    out = Path(args.out)
    checkpoint = Path(args.checkpoint) if args.checkpoint else out / CHECKPOINT
    check_output(args, out, checkpoint)
    created = _missing_folders(out)
    check_writable(out)
    from medusa_engine.training import pipeline  # transformers, accelerate: see the docstring

    try:
        return pipeline.train_heads(args, cfg, out, checkpoint)
    except TrainInterrupted as stop:
        print(f"train-heads: {stop}; continue with --resume", file=sys.stderr)
        return 128 + stop.signum
    except BaseException:
        _remove_if_empty(created)  # a failed run leaves no empty --out behind
        raise


def main(argv: list[str] | None = None) -> int:
    """The command on its own: `python -m` / `accelerate launch -m medusa_engine.training.cli`."""
    parser = argparse.ArgumentParser(prog="train-heads", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as err:
        print(f"train-heads: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
