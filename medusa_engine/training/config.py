"""What a training run is: its frozen config, its error type and its result."""

from __future__ import annotations

from dataclasses import dataclass, field

from attention.precision import get_policy
from medusa_engine.config import HEAD_KINDS
from medusa_engine.heads_io import AnyHeads


class TrainError(ValueError):
    """A training run that cannot start or resume; one line for the CLI."""


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
    grad_clip: float = 1.0
    loss_chunk: int = 4096
    checkpoint_every: int = 100
    seed: int = 0
    kind: str = "medusa"  # or "recurrent" (recurrent.py: cached features, one transition)
    ffn_size: int = 2048  # recurrent: transition width
    draft_vocab: int = 8192  # recurrent: tokens the heads score (0 = all)
    feature_weight: float = 1.0  # recurrent: β, weight of the hidden-state regression

    def __post_init__(self) -> None:
        get_policy(self.precision)
        if not 0 < self.decay <= 1 or not 0 <= self.distill_weight <= 1:
            raise TrainError("decay must be in (0, 1] and distill_weight in [0, 1]")
        if self.kind not in HEAD_KINDS:
            raise TrainError(f"unknown heads kind {self.kind!r}; choose {' or '.join(HEAD_KINDS)}")
        names = (
            "num_heads",
            "batch_size",
            "max_length",
            "loss_chunk",
            "epochs",
            "checkpoint_every",
        )
        for name in names:
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise TrainError(f"{name} ({flag}) must be positive, got {getattr(self, name)}")


@dataclass
class TrainResult:
    heads: AnyHeads
    losses: list[float] = field(default_factory=list)  # per step, of the steps run in this call
    step: int = 0
    wall_s: float = 0.0
