"""The mixed-precision runtime shared by the LLM engine, the head trainer and the DiT.

Model-agnostic: it knows tensors, modules and optimizers, never a model family (it must not import
`medusa_engine` or `diffusion_ext`).

* `PrecisionPolicy` (frozen; presets in `PRECISION_PRESETS`): the dtype parameters are stored in,
  the dtype matmuls run in under autocast, and whether the loss is scaled (fp16 only).
* `autocast(policy, device)`: `torch.autocast` on CPU or CUDA, a no-op for fp32 compute.
* `norm_fp32`, `rms_norm_fp32`: normalisations whose reductions must run in fp32 whatever the
  input dtype, the result cast back to the input dtype.
* `DynamicLossScaler`: the classic fp16 recipe (Micikevicius et al., 2018, "Mixed Precision
  Training"): multiply the loss by `scale`, unscale the gradients before the optimizer step, skip
  the step and halve `scale` when a gradient is inf/nan, double `scale` after `growth_interval`
  finite steps. Written out rather than wrapping `torch.amp.GradScaler` so that its state is a
  small explicit dataclass-like dict (checkpointed with the model) and every branch is testable
  on CPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class PrecisionPolicy:
    """How a model is stored and run.

    `param_dtype`: dtype of the master parameters (and optimizer state); fp32 for training.
    `compute_dtype`: dtype matmuls and attention run in under `autocast`.
    `loss_scaling`: scale the loss (needed for fp16 compute, whose range underflows gradients).
    """

    param_dtype: str = "fp32"
    compute_dtype: str = "fp32"
    loss_scaling: bool = False

    def __post_init__(self) -> None:
        for field in ("param_dtype", "compute_dtype"):
            value = getattr(self, field)
            if value not in _DTYPES:
                raise ValueError(f"{field} must be one of {', '.join(_DTYPES)}; got {value!r}")
        if self.loss_scaling and self.compute_dtype != "fp16":
            raise ValueError("loss_scaling is only meaningful with compute_dtype='fp16'")

    @property
    def param_torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.param_dtype]

    @property
    def compute_torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.compute_dtype]


PRECISION_PRESETS: dict[str, PrecisionPolicy] = {
    "fp32": PrecisionPolicy("fp32", "fp32", False),
    # bf16 has fp32's exponent range: no loss scaling needed.
    "bf16": PrecisionPolicy("fp32", "bf16", False),
    "fp16": PrecisionPolicy("fp32", "fp16", True),
    # Inference-only: weights stored in the low dtype too.
    "bf16-pure": PrecisionPolicy("bf16", "bf16", False),
    "fp16-pure": PrecisionPolicy("fp16", "fp16", False),
}


def get_policy(name: str) -> PrecisionPolicy:
    """The preset called `name`; a ValueError naming the choices otherwise."""
    if name not in PRECISION_PRESETS:
        raise ValueError(
            f"unknown precision {name!r}; choose one of {', '.join(PRECISION_PRESETS)}"
        )
    return PRECISION_PRESETS[name]


@contextlib.contextmanager
def autocast(policy: PrecisionPolicy, device: torch.device | str) -> Iterator[None]:
    """Autocast to `policy.compute_dtype` on `device` (cpu or cuda); nothing for fp32 compute."""
    device_type = torch.device(device).type
    if policy.compute_dtype == "fp32":
        yield
        return
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"autocast supports cpu and cuda devices, got {device_type!r}")
    with torch.autocast(device_type=device_type, dtype=policy.compute_torch_dtype):
        yield


def norm_fp32(
    x: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor] | torch.nn.Module
) -> torch.Tensor:
    """Apply a normalisation (LayerNorm, RMSNorm, ...) in fp32 outside autocast; x's dtype out.

    The module's parameters (if any) must be fp32; the mean/variance reductions then never run in
    bf16/fp16.
    """
    device_type = x.device.type if x.device.type in ("cpu", "cuda") else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        return norm(x.float()).to(x.dtype)


def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, returned in x's dtype."""
    shape = (x.shape[-1],)
    w = None if weight is None else weight.float()
    return F.rms_norm(x.float(), shape, w, eps).to(x.dtype)


def grads_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    """True when every existing gradient is free of inf and nan."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


class DynamicLossScaler:
    """Dynamic loss scaling for fp16 training.

    Usage per step: `scaler.scale(loss).backward()`, then `scaler.step(optimizer, params)` which
    unscales the gradients in place, steps the optimizer only if they are finite, and updates
    `scale`; it returns whether the step was taken. With `enabled=False` every method is the
    identity and `step` always steps, so callers need no branches.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        min_scale: float = 1.0,
        enabled: bool = True,
    ) -> None:
        if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1):
            raise ValueError("need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self.scale_value = float(init_scale) if enabled else 1.0
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.enabled = enabled
        self.good_steps = 0
        self.skipped_steps = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """loss * scale (the loss itself when disabled)."""
        return loss * self.scale_value if self.enabled else loss

    def unscale_(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Divide gradients by `scale` in place (in fp32); return whether all are finite."""
        params = list(params)
        if self.enabled:
            inv = 1.0 / self.scale_value
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(inv)
        return grads_finite(params)

    def update(self, finite: bool) -> None:
        """Back off on overflow; grow after `growth_interval` consecutive finite steps."""
        if not self.enabled:
            return
        if not finite:
            self.scale_value = max(self.scale_value * self.backoff_factor, self.min_scale)
            self.good_steps = 0
            self.skipped_steps += 1
            logger.debug("loss scale backed off to %g", self.scale_value)
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale_value *= self.growth_factor
            self.good_steps = 0

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter]) -> bool:
        """Unscale, step `optimizer` if the gradients are finite, update the scale; return stepped.

        Gradients are not zeroed here; the caller owns `optimizer.zero_grad()`.
        """
        finite = self.unscale_(params)
        if finite:
            optimizer.step()
        self.update(finite)
        return finite

    def state_dict(self) -> dict[str, float | int]:
        return {
            "scale": self.scale_value,
            "good_steps": self.good_steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale_value = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_steps = int(state["skipped_steps"])
