"""Class-conditional DiT training on scikit-learn digits: `python -m diffusion_ext.train`.

Shape legend: B batch, C channels, H/W image size.

Recipe: AdamW with linear warm-up then cosine decay to 10%; labels dropped to the null class with
probability `class_dropout` (for classifier-free guidance); loss = MSE between the network output
and `process.target` (eps for VP/VE, velocity for RF), in fp32; compute under the shared precision
runtime (bf16 autocast, or fp16 autocast with dynamic loss scaling); EMA of the weights with a
warm-up (a plain copy for `ema_warmup_steps`, then decay min(ema_decay, (1+k)/(10+k))).
Checkpoints (`state.safetensors`: model, EMA, optimizer, scaler, step, RNG; safetensors + JSON,
never a pickle) are written atomically every `checkpoint_every` steps; `--resume` continues from
one bit-for-bit in the data order. The EMA weights alone are exported as `ema.safetensors` at the
end. Work is never thrown away: the output folder is checked before the first step, an existing
checkpoint is only continued (`--resume`), never overwritten, and Ctrl-C or SIGTERM stops at the
next step boundary with a checkpoint of that step (a second signal stops at once; the last
periodic checkpoint is intact, since writes are atomic).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attention.precision import DynamicLossScaler, autocast, get_policy
from attention.state_files import atomic_write
from diffusion_ext import cli
from diffusion_ext.checkpoint import export_ema, load_state, save_state
from diffusion_ext.config import DIT_PRESETS, TRAIN_PRESETS, TrainConfig
from diffusion_ext.data import DigitsSplit, load_digits_split
from diffusion_ext.dit import DiT
from diffusion_ext.schedules import Process, bcast, get_process

logger = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
LEGACY_STATE_FILE = "state.pt"  # a torch.save pickle from older versions: never loaded


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on request at a step boundary, after writing a checkpoint of that step."""

    def __init__(self, step: int, total: int, state_path: Path) -> None:
        super().__init__(f"stopped at step {step} of {total}; checkpoint {state_path}")
        self.step, self.total, self.state_path = step, total, state_path


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to 0.1 * lr at `steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def ema_decay_at(step: int, config: TrainConfig) -> float:
    if step < config.ema_warmup_steps:
        return 0.0
    k = step - config.ema_warmup_steps
    return min(config.ema_decay, (1 + k) / (10 + k))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (parameters and buffers); mutates `ema`."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
        if e.dtype.is_floating_point:
            e.lerp_(m, 1.0 - decay)
        else:
            e.copy_(m)


def diffusion_loss(
    model: DiT,
    process: Process,
    x0_BCHW: torch.Tensor,
    y_B: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """E_t,eps || net(c_in x_t, 1000 t, y) - target ||^2, fp32 scalar (runs under the caller's
    autocast)."""
    t_B = process.sample_t(x0_BCHW.shape[0], generator)
    eps = torch.randn(x0_BCHW.shape, generator=generator)
    x_t = process.add_noise(x0_BCHW, eps, t_B)
    out = model(bcast(process.c_in(t_B), x_t) * x_t, process.model_time(t_B), y_B)
    return F.mse_loss(out.float(), process.target(x0_BCHW, eps, t_B).float())


@dataclass
class TrainRun:
    """Everything a checkpoint holds; mutable, owned by `train`."""

    config: TrainConfig
    model: DiT
    ema: DiT
    optimizer: torch.optim.Optimizer
    scaler: DynamicLossScaler
    generator: torch.Generator
    step: int = 0
    elapsed_s: float = 0.0

    @classmethod
    def create(cls, config: TrainConfig) -> TrainRun:
        torch.manual_seed(config.seed)
        model = DiT(DIT_PRESETS[config.model])
        ema = copy.deepcopy(model).requires_grad_(False)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        scaler = DynamicLossScaler(enabled=get_policy(config.precision).loss_scaling)
        return cls(
            config, model, ema, optimizer, scaler, torch.Generator().manual_seed(config.seed)
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "elapsed_s": self.elapsed_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a `state_dict()`; ValueError if `state` is not one of this run's config (the run
        may then be half-loaded: discard it)."""
        if state.get("config") != dataclasses.asdict(self.config):
            raise ValueError("the checkpoint was written with a different training config")
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.generator.set_state(state["generator"])
            step, elapsed_s = state["step"], state["elapsed_s"]
            if not (isinstance(step, int) and 0 <= step <= self.config.steps):
                raise ValueError(f"step {step!r} is not in [0, {self.config.steps}]")
            for p in self.model.parameters():  # load_state_dict does not check moment shapes
                for name, value in self.optimizer.state.get(p, {}).items():
                    if value.ndim and value.shape != p.shape:
                        raise ValueError(f"optimizer {name} of shape {tuple(value.shape)}")
        except (KeyError, TypeError, RuntimeError, ValueError, AttributeError) as err:
            message = cli.one_line(err)
            raise ValueError(f"the checkpoint does not fit this run: {message}") from None
        self.step, self.elapsed_s = step, float(elapsed_s)


def train_step(run: TrainRun, process: Process, x_NCHW: torch.Tensor, y_N: torch.Tensor) -> float:
    """One optimizer step on a random batch of (x_NCHW, y_N); updates `run` in place; the loss."""
    config, model = run.config, run.model
    params = [p for p in model.parameters() if p.requires_grad]
    idx_B = torch.randint(0, x_NCHW.shape[0], (config.batch_size,), generator=run.generator)
    y_B = model.y_embed.drop(y_N[idx_B], config.class_dropout, run.generator)
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run.step, config)
    with autocast(get_policy(config.precision), "cpu"):
        loss = diffusion_loss(model, process, x_NCHW[idx_B], y_B, run.generator)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    finite = run.scaler.unscale_(params)
    if finite:  # fp16 overflow: skip the step, the scaler backs off
        nn.utils.clip_grad_norm_(params, config.grad_clip)
        run.optimizer.step()
    run.scaler.update(finite)
    ema_update(run.ema, model, ema_decay_at(run.step, config))
    run.step += 1
    return loss.item()


def train(
    config: TrainConfig,
    out_dir: Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    stop: Callable[[], bool] | None = None,
    data: DigitsSplit | None = None,
) -> dict[str, Any]:
    """Train, checkpoint to `out_dir/state.safetensors`, export `out_dir/ema.safetensors`; return
    a summary.

    `data` replaces the digits split (seed and holdout fraction of `config`) as the training set:
    e.g. the VQ-VAE latents of that split (`diffusion_ext.latent`); its x must have the model's
    input shape, and a resumed run must be given the same data (the caller's business).

    `stop_after` ends this run (with a checkpoint, without the export) once that many steps are
    done in total, as a preempted job would; `resume=True` continues it. `stop()` is asked after
    every step; when it says True, the run writes a checkpoint and raises `TrainingInterrupted`.
    Without `resume`, an `out_dir` that already holds a checkpoint is refused (FileExistsError)
    rather than overwritten. `out_dir` is created and checked before anything else. Sets torch's
    intra-op thread count to `config.threads` when non-zero (a process-wide setting).
    """
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1, got {stop_after}")
    state_path, legacy_path = out_dir / STATE_FILE, out_dir / LEGACY_STATE_FILE
    _check_out_dir(out_dir, resume, state_path, legacy_path)
    if config.threads:
        torch.set_num_threads(config.threads)
    process = get_process(config.process)
    run = TrainRun.create(config)
    if resume:
        run.load_state_dict(load_state(state_path))
        logger.info("resumed from %s at step %d", state_path, run.step)
    if data is None:
        data = load_digits_split(config.seed, config.holdout_fraction)

    last = config.steps if stop_after is None else min(stop_after, config.steps)
    logger.info("training steps %d..%d of %d in %s", run.step, last, config.steps, out_dir)
    loss_avg = _run_steps(run, process, data, last, state_path, stop, progress)
    summary = {
        "steps": run.step,
        "wall_s": round(run.elapsed_s, 1),
        "final_loss_ema": round(loss_avg, 5),
    }
    if run.step < config.steps:
        logger.info("stopped at step %d of %d; continue with --resume", run.step, config.steps)
        return summary
    export_ema(run.ema, DIT_PRESETS[config.model], config.process, out_dir / "ema.safetensors")
    text = json.dumps({"config": dataclasses.asdict(config), **summary}, indent=2) + "\n"
    atomic_write(out_dir / "train_summary.json", lambda tmp: tmp.write_text(text))
    logger.info("trained %d steps in %.1f s; loss %.4f", run.step, run.elapsed_s, loss_avg)
    return summary


def _run_steps(
    run: TrainRun,
    process: Process,
    data: DigitsSplit,
    last: int,
    state_path: Path,
    stop: Callable[[], bool] | None,
    progress: bool,
) -> float:
    """Steps up to `last`, checkpointing as configured; the smoothed loss. On `stop()`: a
    checkpoint of the step just done, then `TrainingInterrupted`."""
    config = run.config
    bar = _progress(config.steps, run.step, progress)
    run.model.train()
    start, loss_avg = time.perf_counter() - run.elapsed_s, float("nan")
    try:
        while run.step < last:
            loss = train_step(run, process, data.x_train_NCHW, data.y_train_N)
            loss_avg = loss if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.4f}", refresh=False)
            run.elapsed_s = time.perf_counter() - start
            stopping = stop is not None and stop()
            if run.step % config.checkpoint_every == 0 or run.step == last or stopping:
                save_state(run.state_dict(), state_path)
            if stopping and run.step < config.steps:
                raise TrainingInterrupted(run.step, config.steps, state_path)
    finally:
        bar.close()
    return loss_avg


def _check_out_dir(out_dir: Path, resume: bool, state_path: Path, legacy_path: Path) -> None:
    """Before any work: `out_dir` can be written, and holds a checkpoint iff `resume`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir):  # PermissionError now, not after the first steps
        pass
    if resume and not state_path.is_file():
        if legacy_path.is_file():
            raise ValueError(
                f"{legacy_path} is a pickle checkpoint from an older version, never loaded "
                "(unpickling can run code): start a new run in another folder"
            )
        raise FileNotFoundError(f"--resume given but no checkpoint at {state_path}")
    if not resume and (state_path.exists() or legacy_path.exists()):
        found = state_path if state_path.exists() else legacy_path
        raise FileExistsError(
            f"{found} exists: pass --resume to continue that run, or choose another --out-dir "
            "(it is never overwritten)"
        )


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="python -m diffusion_ext.train", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="digits", choices=sorted(TRAIN_PRESETS))
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="default: $XDG_CACHE_HOME/diffusion_ext/runs/PRESET (~/.cache if unset)",
    )
    parser.add_argument("--resume", action="store_true", help=f"continue from OUT_DIR/{STATE_FILE}")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--stop-after", type=int, default=None, help="end this run after N steps")
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument(
            "--" + field.name.replace("_", "-"), type=type(field.default), default=None
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return cli.run(parser, lambda args: _main(parser.prog, args), argv)


def _main(prog: str, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name) is not None
    }
    config = dataclasses.replace(TRAIN_PRESETS[args.preset], **overrides)
    out_dir = args.out_dir or cli.cache_dir() / "runs" / args.preset
    cli.check_out_dir(out_dir, "--out-dir")
    with cli.stop_requests() as stop:
        try:
            summary = train(
                config, out_dir, args.resume, not args.no_progress, args.stop_after, stop
            )
        except TrainingInterrupted as err:
            return cli.interrupted(prog, f"{err}; continue with --resume --out-dir {out_dir}")
        except KeyboardInterrupt:  # a second signal, or one before the first step
            return cli.interrupted(prog, f"the last periodic checkpoint is in {out_dir}")
    print(json.dumps({"out_dir": str(out_dir), **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
