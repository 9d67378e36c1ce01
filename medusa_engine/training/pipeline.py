"""The steps of `train-heads`: records -> (self-distillation) -> examples -> training of either
heads kind -> held-out accuracy (+ confidence temperatures) -> heads folder + metrics.json.

Progress bars and the printed report live here, at the command's edge. `metrics.json` records
the command, the data and the model with paths relative to the repository root when they lie
inside it (the model by its alias when it was given one), so a committed file reads the same
whatever machine trained it. It describes the whole run, however many times it was resumed:
steps, training time, loss curve and the steps it was resumed from (the history travels in the
checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import Accelerator
from tqdm import tqdm

from attention.precision import autocast, get_policy
from attention.state_files import atomic_write
from medusa_engine.eagle3 import Eagle3Heads, default_aux_layers
from medusa_engine.heads import MedusaHeads
from medusa_engine.heads_io import save_heads
from medusa_engine.hf_adapter import HFModel, quiet_transformers
from medusa_engine.models import cache_dir
from medusa_engine.recurrent_heads import RecurrentHeads
from medusa_engine.training import eagle3, medusa, recurrent
from medusa_engine.training import features as feats
from medusa_engine.training.config import TrainConfig, TrainError, TrainResult
from medusa_engine.training.data import (
    Example,
    encode_dataset,
    load_records,
    prompt_ids,
    prompt_messages,
    record_kind,
    split_eval,
)
from medusa_engine.training.distill import DistillConfig, self_distill, settings_key
from medusa_engine.training.loop import OnStep

ROOT = Path(__file__).resolve().parents[2]  # the repository root (site-packages if installed)
CURVE_POINTS = 50  # metrics.json's loss curve: windows of steps, at most this many


class Progress:
    """A tqdm bar that appears at its first update, so that an error before any progress stays
    the only line on stderr."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.bar: Any = None

    def get(self) -> Any:
        if self.bar is None:
            self.bar = tqdm(**self.kwargs)
        return self.bar

    def update(self, n: int) -> None:
        self.get().update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def quiet_datasets() -> None:
    """Silence `datasets`' progress bars and INFO logs (for the CLI, like `quiet_transformers`):
    one "Generating train split" bar per data file and one per self-distillation shard is noise,
    and would come before a one-line error."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def portable(value: str) -> str:
    """`value` relative to `ROOT` when it is an absolute path inside it (also `--flag=PATH`)."""
    if value.startswith("--") and "=" in value:
        flag, _, rest = value.partition("=")
        return f"{flag}={portable(rest)}"
    if not os.path.isabs(value):
        return value
    for path in (Path(os.path.normpath(value)), Path(value).resolve()):
        if path.is_relative_to(ROOT):
            return path.relative_to(ROOT).as_posix()
    return value


def _distilled(model: Any, records: Any, args: Any, acc: Any, extra: int = -1) -> Any:
    """The base model's answers to the records' prompts (cached); `extra` = i selects the i-th
    `--extra-distill-temperature` pass instead of the main one."""
    kind, tok = record_kind(records.column_names), model.tokenizer
    if kind == "text":
        prompts = [list(tok(r["text"])["input_ids"])[: args.prompt_tokens] for r in records]
    else:
        prompts = [prompt_ids(tok, prompt_messages(r, kind)) for r in records]
    temperature, seed = args.distill_temperature, args.seed
    if extra >= 0:
        temperature, seed = args.extra_distill_temperature[extra], args.seed + extra + 1
    cfg = DistillConfig(args.distill_max_new_tokens, temperature, args.distill_batch_size, seed)
    if args.distill_cache:  # as given; an extra pass beside it
        cache = args.distill_cache + (f"-t{temperature:g}-s{seed}" if extra >= 0 else "")
    else:  # the user cache, one folder per model, prompts and settings (never the cwd)
        name = f"{Path(model.name).name}-{Path(args.data).stem}-"
        cache = str(cache_dir() / "self_distill" / (name + settings_key(model.name, prompts, cfg)))
    bar = Progress(total=len(prompts), desc="self-distill", disable=not acc.is_main_process)
    if acc.is_main_process:  # one process generates; the others then read its cache
        data, stats = self_distill(model, prompts, cache, cfg, progress=bar.update)
        if stats.new_tokens:
            print(
                f"self-distill: {stats.prompts_done} prompts, {stats.new_tokens} tokens in "
                f"{stats.seconds:.1f} s = {stats.tokens_per_s:.1f} tok/s"
            )
    acc.wait_for_everyone()
    if not acc.is_main_process:
        data, _ = self_distill(model, prompts, cache, cfg)
    bar.close()
    return data


def _reference_examples(
    model: Any, records: Any, eval_ex: list[Example], args: Any, cfg: TrainConfig
) -> list[Example]:
    """The records' own answers (prompts of held-out examples excluded), for `--kind recurrent`:
    its targets are the base model's choices, so any answer text is valid training context."""
    if record_kind(records.column_names) == "text":
        raise TrainError("--with-reference-answers needs instruction records (they have answers)")
    held_out = {e.record for e in eval_ex}
    keep = [i for i in range(len(records)) if i not in held_out]
    return encode_dataset(model.tokenizer, records.select(keep), cfg.max_length)


def build_examples(
    model: Any, records: Any, args: Any, cfg: TrainConfig, acc: Any
) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples: the records' (or the base model's) answers, then the extra
    sampled passes and the reference answers, none from a held-out prompt (the flags'
    combinations are checked in `cli.check_flags`)."""
    answers = _distilled(model, records, args, acc) if args.self_distill else records
    train_ex, eval_ex = split_eval(
        encode_dataset(model.tokenizer, answers, cfg.max_length), args.eval_fraction
    )
    held_out = {e.record for e in eval_ex}
    for i in range(len(args.extra_distill_temperature)):
        sampled = _distilled(model, records, args, acc, i)
        encoded = encode_dataset(model.tokenizer, sampled, cfg.max_length)
        train_ex += [e for e in encoded if e.record not in held_out]
    if args.with_reference_answers:
        train_ex += _reference_examples(model, records, eval_ex, args, cfg)
    return train_ex, eval_ex


def _train_recurrent(
    model: Any,
    train_ex: list[Example],
    eval_ex: list[Example],
    cfg: TrainConfig,
    checkpoint: Path,
    args: Any,
    acc: Any,
    on_step: OnStep,
) -> tuple[TrainResult, dict[str, Any]]:
    """Features (cached) -> `recurrent.train` -> held-out accuracy and confidence temperatures."""
    every = train_ex + eval_ex
    path = Path(args.features_cache or checkpoint.with_name("features.safetensors"))
    key = feats.features_key(model.name, every)
    features = feats.load_features(path, key)
    if features is None:
        bar = Progress(total=len(every), desc="features", disable=not acc.is_main_process)
        with torch.no_grad(), autocast(get_policy(cfg.precision), model.device):
            features = feats.compute_features(model, every, cfg.num_heads, 8, bar.update)
        bar.close()
        if acc.is_main_process:
            feats.save_features(path, features, key)
    train_pos = features.select(torch.arange(len(train_ex)))
    eval_pos = features.select(torch.arange(len(train_ex), len(every)))
    result = recurrent.train(model, features, train_pos, cfg, checkpoint, args.resume, acc, on_step)
    heads = cast(RecurrentHeads, result.heads)
    metrics = recurrent.evaluate(model, heads, features, eval_pos)
    calibration = recurrent.fit_confidence_temperatures(model, heads, features, eval_pos)
    temps = tuple(row["temperature"] for row in calibration)
    heads.config = replace(heads.config, confidence_temperature=temps)
    return result, {**metrics, "calibration": calibration}


def _train_eagle3(
    model: Any,
    train_ex: list[Example],
    eval_ex: list[Example],
    cfg: TrainConfig,
    checkpoint: Path,
    args: Any,
    acc: Any,
    on_step: OnStep,
) -> tuple[TrainResult, dict[str, Any]]:
    """Features (cached) -> `eagle3.train` -> held-out accuracy per depth and confidence
    temperatures."""
    aux = tuple(args.aux_layers or ()) or default_aux_layers(
        int(model.text_config.num_hidden_layers)
    )
    every = train_ex + eval_ex
    path = Path(args.features_cache or checkpoint.with_name("eagle3_features.safetensors"))
    key = feats.features_key(f"{model.name}|aux layers {list(aux)}", every)
    features = eagle3.load_features(path, key)
    if features is None:
        bar = Progress(total=len(every), desc="features", disable=not acc.is_main_process)
        with torch.no_grad(), autocast(get_policy(cfg.precision), model.device):
            features = eagle3.compute_features(model, every, aux, 8, bar.update)
        bar.close()
        if acc.is_main_process:
            eagle3.save_features(path, features, key)
    result = eagle3.train(
        model,
        train_ex,
        cfg,
        checkpoint,
        args.resume,
        acc,
        on_step,
        aux,
        features.part(0, len(train_ex)),
    )
    heads = cast(Eagle3Heads, result.heads)
    metrics = eagle3.evaluate(
        model,
        heads,
        eval_ex,
        cfg.batch_size,
        cfg.precision,
        features.part(len(train_ex), len(every)),
    )
    temps = tuple(row["temperature"] for row in metrics["calibration"])
    heads.config = replace(heads.config, confidence_temperature=temps)
    return result, metrics


def loss_curve(losses: list[float], first_step: int = 0) -> list[list[float]]:
    """[step, mean loss] over consecutive windows of steps, at most `CURVE_POINTS` of them:
    the loss curve of a run of any length in a metrics.json a person can read."""
    every = max(1, math.ceil(len(losses) / CURVE_POINTS))
    return [
        [
            first_step + min(i + every, len(losses)),
            round(statistics.fmean(losses[i : i + every]), 4),
        ]
        for i in range(0, len(losses), every)
    ]


def _summary(
    model: Any,
    args: Any,
    cfg: TrainConfig,
    sizes: tuple[int, int],
    result: TrainResult,
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """metrics.json: what was trained on, how it went over the whole run (every resumed part),
    the held-out metrics, the config."""
    losses, first = result.run_losses, result.run_losses_from
    history = {"losses_from_step": first} if first else {}  # a checkpoint without the history
    return {
        "model": portable(model.name),
        "data": portable(args.data),
        "train_examples": sizes[0],
        "eval_examples": sizes[1],
        "steps": result.step,
        "wall_s": round(result.run_wall_s, 1),
        "resumed_from": result.resumed_from,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_last10_mean": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        **history,
        "loss_curve": loss_curve(losses, first),
        **metrics,
        "config": asdict(cfg),
        "command": " ".join(portable(a) for a in sys.argv),
    }


def metrics_text(summary: dict[str, Any]) -> str:
    """`summary` as indented JSON, each [step, loss] pair of the loss curve on one line."""
    text = json.dumps(summary, indent=2)
    return re.sub(r"\[\s+([^\s,\[\]]+),\s+([^\s,\[\]]+)\s+\]", r"[\1, \2]", text) + "\n"


def _report(summary: dict[str, Any]) -> None:
    """The held-out accuracies, then the summary as one JSON line."""
    print(
        f"base LM top-1 {summary['base_top1']:.3f} on {summary['eval_examples']} held-out examples"
    )
    for h in summary["heads"]:
        top1, top5, tokens = h["top1"], h["top5"], h["tokens"]
        print(f"head {h['head']}: top-1 {top1:.3f}  top-5 {top5:.3f}  ({tokens} tokens)")
    for c in summary.get("calibration", []):
        print(
            f"depth {c['depth']}: confidence temperature {c['temperature']:.3f}  top-1 "
            f"{c['top1']:.3f}  mean top-1 probability {c['confidence']:.3f} -> "
            f"{c['calibrated_confidence']:.3f}"
        )
    skip = ("config", "command", "loss_curve")
    print(json.dumps({k: v for k, v in summary.items() if k not in skip}))


def load_examples(
    args: Any, cfg: TrainConfig, acc: Any
) -> tuple[HFModel, list[Example], list[Example]]:
    """The base model and the (train, held-out) examples that `train-heads` flags `args` name
    (also `eval.drafter_fit`, which scores a trained drafter on both)."""
    quiet_datasets()
    records = load_records(args.data, args.split)
    if args.max_examples > 0:
        records = records.select(range(min(args.max_examples, len(records))))
    quiet_transformers()
    model = HFModel.load(args.model, dtype=args.dtype, device=args.device or acc.device)
    train_ex, eval_ex = build_examples(model, records, args, cfg, acc)
    return model, train_ex, eval_ex


def train_heads(args: Any, cfg: TrainConfig, out: Path, checkpoint: Path) -> int:
    """The whole command once `cli.run` has parsed the flags and checked `out`."""
    acc = Accelerator(cpu=args.device == "cpu")
    model, train_ex, eval_ex = load_examples(args, cfg, acc)
    total = cfg.steps or None
    bar = Progress(
        total=total, desc="train-heads", disable=not acc.is_main_process, dynamic_ncols=True
    )

    def on_step(step: int, loss: float, top1: list[float]) -> None:
        bar.update(step - bar.get().n)
        bar.get().set_postfix(loss=f"{loss:.3f}", top1="/".join(f"{a:.2f}" for a in top1))

    try:
        if cfg.kind == "recurrent":
            result, metrics = _train_recurrent(
                model, train_ex, eval_ex, cfg, checkpoint, args, acc, on_step
            )
        elif cfg.kind == "eagle3":
            result, metrics = _train_eagle3(
                model, train_ex, eval_ex, cfg, checkpoint, args, acc, on_step
            )
        else:
            result = medusa.train(model, train_ex, cfg, checkpoint, args.resume, acc, on_step)
            heads = cast(MedusaHeads, result.heads)
            metrics = medusa.evaluate(model, heads, eval_ex, cfg.batch_size, cfg.precision)
    finally:
        bar.close()
    if not acc.is_main_process:
        return 0
    summary = _summary(model, args, cfg, (len(train_ex), len(eval_ex)), result, metrics)
    save_heads(result.heads, out, {"bf16": torch.bfloat16, "fp32": None}[args.save_dtype])
    text = metrics_text(summary)
    atomic_write(out / "metrics.json", lambda p: p.write_text(text))
    _report(summary)
    return 0
