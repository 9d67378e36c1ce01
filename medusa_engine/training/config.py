"""What a training run is: its frozen config, its error types and its result."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from attention.precision import get_policy
from medusa_engine.config import HEAD_KINDS
from medusa_engine.heads_io import AnyHeads


class TrainError(ValueError):
    """A training run that cannot start or resume; one line for the CLI."""


class TrainInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training between two steps; `checkpoint` holds step `step`.

    A `KeyboardInterrupt`, so code that handles Ctrl-C handles it too; the CLI exits with
    128 + `signum` (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved in {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def _flag(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


@dataclass(frozen=True)
class TrainConfig:
    """One training run; the CLI flags map one-to-one onto these fields."""

    num_heads: int = 4
    num_layers: int = 1
    shared_lm_head: bool = True
    out_map: bool = True  # HeadsConfig.out_map: lets shared-LM-head heads cancel the hidden state
    decay: float = 0.8  # λ: head k's loss weight is λ^k
    distill_weight: float = 0.0  # w: weight of the KL to the base model's distribution
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    steps: int = 0  # 0 = `epochs` passes over the data
    epochs: int = 1
    batch_size: int = 8
    max_length: int = 512
    precision: str = "bf16"
    grad_clip: float = 1.0  # 0 = no clipping
    loss_chunk: int = 4096
    checkpoint_every: int = 100
    seed: int = 0
    kind: str = "medusa"  # or "recurrent" (recurrent.py: cached features, one transition)
    ffn_size: int = 2048  # recurrent: transition width
    draft_vocab: int = 8192  # recurrent: tokens the heads score (0 = all)
    feature_weight: float = 1.0  # recurrent: β, weight of the hidden-state regression

    def __post_init__(self) -> None:
        """Every field checked here, so a bad flag fails before any data or model loads."""
        get_policy(self.precision)
        if self.kind not in HEAD_KINDS:
            raise TrainError(f"unknown heads kind {self.kind!r}; choose {' or '.join(HEAD_KINDS)}")
        for name, low in (("decay", 0.0), ("lr", 0.0)):  # (low, ...]: also refuses NaN
            value = getattr(self, name)
            if not (value > low and math.isfinite(value)):
                raise TrainError(f"{_flag(name)} must be positive and finite, got {value}")
        if not self.decay <= 1:
            raise TrainError(f"{_flag('decay')} must be in (0, 1], got {self.decay}")
        if not 0 <= self.distill_weight <= 1:
            raise TrainError(
                f"{_flag('distill_weight')} must be in [0, 1], got {self.distill_weight}"
            )
        for name in ("weight_decay", "grad_clip", "feature_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise TrainError(f"{_flag(name)} must be >= 0 and finite, got {value}")
        minimum = {
            "num_heads": 1,
            "num_layers": 0,
            "batch_size": 1,
            "max_length": 3,  # head 0 at position t predicts t + 2: 3 tokens give one target
            "loss_chunk": 1,
            "epochs": 1,
            "checkpoint_every": 1,
            "steps": 0,  # 0 = `epochs` passes
            "warmup_steps": 0,
            "ffn_size": 1,
            "draft_vocab": 0,  # 0 = the whole vocabulary
        }
        for name, low in minimum.items():
            if getattr(self, name) < low:
                what = "positive" if low == 1 else f">= {low}"
                raise TrainError(f"{_flag(name)} must be {what}, got {getattr(self, name)}")


@dataclass
class TrainResult:
    """What `loop.optimize` returns. `losses` and `wall_s` cover this call; the `run_` fields the
    whole run, the parts before a resume included (they travel in the checkpoint)."""

    heads: AnyHeads
    losses: list[float] = field(default_factory=list)  # per step, of the steps run in this call
    step: int = 0
    wall_s: float = 0.0
    run_losses: list[float] = field(default_factory=list)  # steps run_losses_from+1 .. step
    run_losses_from: int = 0  # > 0 only after resuming a checkpoint without a loss history
    run_wall_s: float = 0.0  # training time of every part of the run
    resumed_from: list[int] = field(default_factory=list)  # each resumed part's first step - 1
