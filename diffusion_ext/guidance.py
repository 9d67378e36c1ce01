"""Denoisers for the samplers: a network under a precision policy, with or without guidance.

Shape legend: B batch, C channels, H/W image size, K classes.

* `model_denoiser`: DenoiseFn of a DiT-like `net(x_BCHW, model_time_B, y_B)`. With a
  `guidance_scale` w it is classifier-free guidance (Ho & Salimans, 2022): the conditional and
  null-class passes run as one batch of 2B, and the output is out_uncond + w (out_cond - out_uncond)
  on all channels, in fp32 whatever the compute dtype. w = 1 is the conditional model.
* `classifier_guided`: classifier guidance (Dhariwal & Nichol, 2021; Song et al., 2021, eq. 14):
  score(x_t | y) = score(x_t) + w grad_x log p(y | x_t, t), i.e. eps_hat <- eps_hat - w sigma grad,
  for an unconditional model and a noise-conditional classifier.
* `clip_denoised`: clamp x0_hat to the data range and recompute eps_hat to match.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from attention.precision import PRECISION_PRESETS, PrecisionPolicy, autocast
from diffusion_ext.samplers import DenoiseFn
from diffusion_ext.schedules import Process, bcast

LogProbFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def model_denoiser(
    net: nn.Module,
    process: Process,
    y_B: torch.Tensor,
    *,
    null_class: int,
    guidance_scale: float | None = None,
    policy: PrecisionPolicy = PRECISION_PRESETS["fp32"],
) -> DenoiseFn:
    """DenoiseFn for labels y_B (use `null_class` everywhere for an unconditional model).

    `guidance_scale=None` runs one conditional pass; a float runs classifier-free guidance.
    """
    if y_B.ndim != 1 or y_B.dtype != torch.long:
        raise ValueError(f"expected int64 labels y_B [B], got {y_B.dtype} {tuple(y_B.shape)}")

    def run(x: torch.Tensor, t_B: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_in = (bcast(process.c_in(t_B), x) * x).float()
        with autocast(policy, x.device):
            out = net(x_in, process.model_time(t_B).float(), y)
        return out.float()

    def denoise(x: torch.Tensor, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] != y_B.shape[0]:
            raise ValueError(f"batch {x.shape[0]} but {y_B.shape[0]} labels")
        if guidance_scale is None:
            return process.to_x0_eps(x, t_B, run(x, t_B, y_B))
        y_null = torch.full_like(y_B, null_class)
        out_2B = run(torch.cat([x, x]), torch.cat([t_B, t_B]), torch.cat([y_B, y_null]))
        cond, uncond = out_2B.chunk(2)
        guided = uncond + guidance_scale * (cond - uncond)  # fp32
        return process.to_x0_eps(x, t_B, guided)

    return denoise


def classifier_guided(
    denoise: DenoiseFn, process: Process, log_prob: LogProbFn, scale: float
) -> DenoiseFn:
    """Add `scale` * grad_x log p(y | x_t, t) to the score of `denoise`.

    `log_prob(x, t_B)` returns log p(y_b | x_b, t_b) per sample ([B]) for the wanted labels; it is
    differentiated with autograd (enabled here even inside `torch.no_grad`).
    """

    def guided(x: torch.Tensor, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0, eps = denoise(x, t_B)
        with torch.enable_grad():
            x_req = x.detach().to(eps.dtype).requires_grad_(True)
            (grad,) = torch.autograd.grad(log_prob(x_req, t_B).sum(), x_req)
        alpha, sigma = (bcast(v.to(eps.dtype), x) for v in process.alpha_sigma(t_B))
        # score = -eps / sigma, so score + w grad  <=>  eps - w sigma grad; x0 moves to keep
        # x = alpha x0 + sigma eps.
        eps_g = eps - scale * sigma * grad
        return x0 + scale * sigma**2 / alpha * grad, eps_g

    return guided


def classifier_log_prob(classifier: nn.Module, process: Process, y_B: torch.Tensor) -> LogProbFn:
    """LogProbFn of a noise-conditional classifier `classifier(c_in x, model_time) -> logits_BK`."""

    def log_prob(x: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        logits_BK = classifier(
            bcast(process.c_in(t_B).to(x.dtype), x) * x, process.model_time(t_B).float()
        )
        logits_BK = logits_BK.to(torch.promote_types(logits_BK.dtype, torch.float32))
        return torch.log_softmax(logits_BK, dim=-1).gather(1, y_B[:, None])[:, 0]

    return log_prob


def clip_denoised(
    denoise: DenoiseFn, process: Process, low: float = -1.0, high: float = 1.0
) -> DenoiseFn:
    """Clamp x0_hat to [low, high]; eps_hat = (x - alpha x0_hat) / sigma where sigma > 0."""

    def clipped(x: torch.Tensor, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0, eps = denoise(x, t_B)
        x0 = x0.clamp(low, high)
        alpha, sigma = (bcast(v.to(x0.dtype), x) for v in process.alpha_sigma(t_B))
        safe = sigma > 0
        eps = torch.where(safe, (x - alpha * x0) / torch.where(safe, sigma, 1.0), eps)
        return x0, eps

    return clipped
