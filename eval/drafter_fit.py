"""Does a trained drafter underfit or lack data? Its per-depth accuracy on examples it trained on
against the held-out ones, both built exactly as `train-heads` builds them.

    python -m eval.drafter_fit --heads medusa_engine/assets/heads/smollm2-135m-instruct-eagle3 \
        --train-sample 100 -- <the train-heads flags the drafter was trained with>

The flags after `--` are `train-heads`'s own (model, data, self-distillation cache, split,
max length, kind); the drafter's training examples are rebuilt from them (cached
self-distillation is read, not regenerated). `--train-sample N` scores the first N training
examples (the main answers, the held-out ones' kin). A large train-minus-held-out gap says more
data; a small gap with low accuracy says more steps or capacity. Prints a table, then one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

from eval.timing import environment


def score(model: Any, heads: Any, kind: str, examples: list[Any], cfg: Any) -> list[float]:
    """Per-depth top-1 of `heads` on `examples`, with the evaluation `train-heads` reports."""
    from medusa_engine.training import eagle3, medusa, recurrent
    from medusa_engine.training import features as feats

    if kind == "eagle3":
        metrics = eagle3.evaluate(model, heads, examples, cfg.batch_size, cfg.precision)
    elif kind == "recurrent":
        features = feats.compute_features(model, examples, heads.num_heads, cfg.batch_size)
        positions = features.select(torch.arange(len(examples)))
        metrics = recurrent.evaluate(model, heads, features, positions, precision=cfg.precision)
    else:
        metrics = medusa.evaluate(model, heads, examples, cfg.batch_size, cfg.precision)
    return [round(float(h["top1"]), 4) for h in metrics["heads"]]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m eval.drafter_fit", description=__doc__)
    parser.add_argument("--heads", required=True, help="the trained drafter's folder")
    parser.add_argument("--train-sample", type=int, default=100, help="training examples scored")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv[:split])
    if args.train_sample < 1:
        parser.error("--train-sample must be >= 1")

    from accelerate import Accelerator

    from medusa_engine.heads_io import load_heads
    from medusa_engine.training import cli, pipeline

    train_parser = argparse.ArgumentParser(prog="train-heads flags")
    cli.add_arguments(train_parser)
    # train-heads requires --out; nothing is written here
    flags = [*argv[split + 1 :], *([] if "--out" in argv[split + 1 :] else ["--out", "unused"])]
    train_args = train_parser.parse_args(flags)
    cfg = cli.config_from_args(train_args)
    cli.check_flags(train_args)
    if args.threads:
        torch.set_num_threads(args.threads)
    heads = load_heads(args.heads)
    kind = heads.config.kind
    if kind != cfg.kind:
        parser.error(f"--heads {args.heads} is a {kind} drafter; the flags say --kind {cfg.kind}")

    acc = Accelerator(cpu=train_args.device == "cpu")
    model, train_ex, eval_ex = pipeline.load_examples(train_args, cfg, acc)
    sample = train_ex[: args.train_sample]
    rows = {
        f"train (first {len(sample)})": score(model, heads, kind, sample, cfg),
        f"held-out ({len(eval_ex)})": score(model, heads, kind, eval_ex, cfg),
    }
    print(f"{'examples':<22} top-1 per depth")
    for name, top1 in rows.items():
        print(f"{name:<22} " + " ".join(f"{a:.3f}" for a in top1))
    stamp = environment(model.device, model.dtype)
    print(json.dumps({"benchmark": "drafter_fit", "heads": args.heads, "kind": kind, **stamp,
                      "top1": rows}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
