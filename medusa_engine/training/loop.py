"""The one training loop of every heads kind: AdamW with a warm-up + cosine schedule, mixed
precision with loss scaling (`attention.precision`), gradient clipping, `accelerate`, progress
callbacks, atomic checkpoints, bit-exact resume, and a checkpoint on SIGINT / SIGTERM.

Shape legend (ARCHITECTURE.md): J = draft heads / depths.

A heads kind brings its trainable module (heads + loss: what DDP wraps) and a
`batch_loss(rows, wrapped_module) -> (loss, hits_J, counts_J)`; the loop owns the rest. The data
order is ours, not a sampler's: a seeded permutation per epoch (`batch_order`), each process a
slice of the global batch, so a checkpoint's data position is just the step number and a resumed
run sees the batches an uninterrupted one would. Master weights and optimizer state stay fp32.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from attention.precision import DynamicLossScaler, autocast, get_policy, grads_finite
from medusa_engine.heads_io import AnyHeads
from medusa_engine.training.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from medusa_engine.training.config import TrainConfig, TrainError, TrainInterrupted, TrainResult

log = logging.getLogger(__name__)

OnStep = Callable[[int, float, list[float]], None]  # (step, loss, top-1 per head)
BatchLoss = Callable[[list[int], Any], Any]  # (rows, wrapped module) -> (loss, hits_J, counts_J)


def setup(model: Any, cfg: TrainConfig, accelerator: Any = None) -> Any:
    """The accelerator (a CPU one for a CPU model unless given); freezes the base, seeds RNGs."""
    acc = accelerator or Accelerator(cpu=model.device.type == "cpu")
    model.model.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    return acc


def batch_order(n: int, batch: int, epoch: int, seed: int) -> list[list[int]]:
    """The epoch's global batches (full ones only): a seeded permutation of range(n)."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i : i + batch] for i in range(0, n - batch + 1, batch)]


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then a cosine decay to 0 at step `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


class _State:
    """Everything a checkpoint holds besides the step: heads, optimizer, schedule, loss scale,
    and the run's history so far (losses, training time, resumes: what metrics.json reports)."""

    def __init__(self, heads: AnyHeads, cfg: TrainConfig, total: int) -> None:
        self.heads, self.cfg = heads, cfg
        self.params = [p for p in heads.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        schedule = lr_lambda(cfg.warmup_steps, total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = DynamicLossScaler(enabled=get_policy(cfg.precision).loss_scaling)

    def save(self, acc: Any, path: Path, step: int, result: TrainResult) -> None:
        acc.wait_for_everyone()
        if acc.is_main_process:
            history = {
                "losses": torch.tensor(result.run_losses, dtype=torch.float64),
                "losses_from": result.run_losses_from,
                "wall_s": result.run_wall_s,
                "resumed_from": list(result.resumed_from),
            }
            state = {
                "heads": self.heads.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(),
                "step": step,
                "config": asdict(self.cfg),
                "history": history,
            }
            save_checkpoint(path, state)

    def load(self, path: Path, result: TrainResult) -> int:
        """Restore the state saved at `path` (written with this config) and the run's history
        into `result`; returns its step."""
        if not path.is_file():
            raise TrainError(f"cannot resume: no checkpoint at {path}")
        state = load_checkpoint(path)
        if not isinstance(state.get("config"), dict):
            raise TrainError(f"checkpoint {path} holds no training config; it cannot be resumed")
        config = asdict(self.cfg)
        if state["config"] != config:
            diff = sorted(k for k, v in config.items() if state["config"].get(k) != v)
            raise TrainError(f"{path} was written with other settings: {diff}")
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step = int(state["step"])
        history = state.get("history")
        if isinstance(history, dict):
            result.run_losses = history["losses"].tolist()
            result.run_losses_from = int(history["losses_from"])
            result.run_wall_s = float(history["wall_s"])
            result.resumed_from = [int(s) for s in history["resumed_from"]]
        else:  # written before checkpoints kept the history: it starts here
            result.run_losses_from = step
        result.resumed_from.append(step)
        return step

    def update(self, acc: Any, loss: torch.Tensor) -> None:
        """Backward through the scaled loss, clip, step (unless inf/nan) and zero the grads."""
        acc.backward(self.scaler.scale(loss))
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.params)  # clip the true gradients; then the scaler sees 1
            acc.clip_grad_norm_(self.params, self.cfg.grad_clip)
            finite = grads_finite(self.params)
            if finite:
                self.optimizer.step()
            self.scaler.update(finite)
            stepped = finite
        else:
            stepped = self.scaler.step(self.optimizer, self.params)
        self.optimizer.zero_grad(set_to_none=True)
        if stepped:
            self.scheduler.step()


@contextmanager
def deferred_signals(enabled: bool = True) -> Iterator[list[int]]:
    """While open, SIGINT and SIGTERM are appended to the yielded list instead of stopping the
    process in the middle of a step (half an optimizer update is no state to save): the loop
    finishes the step, saves a checkpoint and raises `TrainInterrupted`. A second SIGINT
    interrupts at once. Handlers go in only in the main thread (the only one Python runs them
    in); a signal set to be ignored stays ignored; the previous handlers come back on exit."""
    received: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and signal.SIGINT in received:
            raise KeyboardInterrupt
        received.append(signum)
        name = signal.Signals(signum).name
        log.warning("%s: saving a checkpoint after this step, then stopping", name)

    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) not in (signal.SIG_IGN, None):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stop_signal(acc: Any, received: list[int]) -> int:
    """The signal that stops training after this step (0: none), the same on every process, so
    all of them save and leave after the same step."""
    signum = received[0] if received else 0
    if acc.num_processes > 1:
        signum = int(acc.gather(torch.tensor([signum], device=acc.device)).max())
    return signum


def optimize(
    heads: AnyHeads,
    module: nn.Module,
    batch_loss: BatchLoss,
    cfg: TrainConfig,
    num_items: int,
    acc: Any,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    on_step: OnStep | None = None,
    items: str = "examples",
) -> TrainResult:
    """Train `heads` (inside `module`) on `num_items` items (`items` names them in errors).

    `batch_loss(rows, wrapped_module)` -> (loss, hits_J, counts_J) for the items `rows` (indices
    into the training items: this process's share of the global batch). With `resume`, starts
    from `checkpoint_path` (it must exist and hold this config). A checkpoint is written every
    `cfg.checkpoint_every` steps and at the end; `on_step(step, loss, top1_per_head)` runs after
    each step, after that step's checkpoint. With a `checkpoint_path`, SIGINT / SIGTERM end the
    run after the step in progress with a checkpoint of it (`TrainInterrupted`).
    """
    global_batch = cfg.batch_size * acc.num_processes
    per_epoch = num_items // global_batch
    if per_epoch == 0:
        raise TrainError(f"{num_items} {items} are fewer than one batch of {global_batch}")
    total = cfg.steps or cfg.epochs * per_epoch
    state, step, result = _State(heads, cfg, total), 0, TrainResult(heads)
    if resume:
        if checkpoint_path is None:
            raise TrainError("cannot resume without a checkpoint path")
        step = state.load(checkpoint_path, result)
        log.info("resumed from %s at step %d", checkpoint_path, step)
    module, state.optimizer = acc.prepare(module, state.optimizer)
    policy, start, run_wall_s = get_policy(cfg.precision), time.perf_counter(), result.run_wall_s
    epoch, order = -1, []
    with deferred_signals(checkpoint_path is not None) as received:
        while step < total:
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                order = batch_order(num_items, global_batch, epoch, cfg.seed)
            rows = order[step % per_epoch][acc.process_index :: acc.num_processes]
            with autocast(policy, acc.device):
                loss, hits_J, counts_J = batch_loss(rows, module)
            state.update(acc, loss)
            step += 1
            result.losses.append(float(loss.detach()))
            result.run_losses.append(result.losses[-1])
            result.run_wall_s = run_wall_s + time.perf_counter() - start
            saved = step % cfg.checkpoint_every == 0 or step == total
            if checkpoint_path is not None and saved:
                state.save(acc, checkpoint_path, step, result)
            if on_step is not None:
                on_step(step, result.losses[-1], (hits_J.float() / counts_J.clamp(min=1)).tolist())
            signum = _stop_signal(acc, received) if checkpoint_path is not None else 0
            if signum:
                assert checkpoint_path is not None
                if not saved:
                    state.save(acc, checkpoint_path, step, result)
                raise TrainInterrupted(signum, step, checkpoint_path)
    result.step, result.wall_s = step, time.perf_counter() - start
    result.run_wall_s = run_wall_s + result.wall_s
    return result
