"""Diffusion processes as affine Gaussian paths x_t = alpha(t) x_0 + sigma(t) eps, t in [0, 1].

Shape legend: B batch, X any trailing data dims (C, H, W for images).

Every process here is one of these paths, which is what lets one set of samplers serve them all
(Kingma et al., 2021, "Variational Diffusion Models"; Karras et al., 2022, EDM):

* `vp-linear`: VP SDE with the DDPM linear schedule in continuous time (Song et al., 2021, eq. 33):
  beta(t) = beta_min + t (beta_max - beta_min), alpha = exp(-1/2 int beta), sigma^2 = 1 - alpha^2.
* `vp-cosine`: VP with Nichol & Dhariwal's (2021) cosine alpha_bar(t) = f(t)/f(0),
  f(t) = cos^2((t + s)/(1 + s) * pi/2).
* `ve`: VE SDE (Song et al., 2021, eq. 30): alpha = 1, sigma = sigma_min (sigma_max/sigma_min)^t.
* `rf`: rectified flow (Liu et al., 2022; Esser et al., 2024): alpha = 1 - t, sigma = t; the
  network predicts the velocity eps - x_0; training times are logit-normal (SD3, Sec. 3.1).

For every path the probability-flow ODE drift is E[dx_t/dt | x_t] = alpha' x0_hat + sigma' eps_hat
and the forward SDE is dx = f x dt + g dw with f = alpha'/alpha, g^2 = 2 sigma sigma' - 2 f sigma^2.

The network sees c_in(t) * x with c_in = 1/sqrt(alpha^2 + sigma^2) (unit input scale for unit-
variance data; matters for VE) and model time 1000 t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffusion_ext.config import PROCESSES


def bcast(v_B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] to broadcast against a [B, X...] tensor."""
    return v_B.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class Process:
    """An affine Gaussian path. `prediction` is what the network outputs: "eps" or "velocity".

    Subclasses define `alpha_sigma(t)` and its time derivative; all methods take t_B float tensors.
    """

    t_min: float = 1e-3
    t_max: float = 1.0
    prediction: str = "eps"

    def __post_init__(self) -> None:
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        if self.prediction not in ("eps", "velocity"):
            raise ValueError(f"prediction must be 'eps' or 'velocity', got {self.prediction!r}")

    # -- the path -------------------------------------------------------------------------------
    def alpha_sigma(self, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def d_alpha_sigma(self, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d alpha/dt, d sigma/dt)."""
        raise NotImplementedError

    def sde_coefficients(self, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward SDE dx = f x dt + g dw: returns (f, g^2)."""
        alpha, sigma = self.alpha_sigma(t_B)
        d_alpha, d_sigma = self.d_alpha_sigma(t_B)
        f = d_alpha / alpha
        return f, (2 * sigma * d_sigma - 2 * f * sigma**2).clamp_min(0.0)

    def prior_std(self) -> float:
        """Std of x at t_max for unit-variance data: start samplers from N(0, prior_std^2)."""
        alpha, sigma = self.alpha_sigma(torch.tensor([self.t_max], dtype=torch.float64))
        return float(torch.sqrt(alpha**2 + sigma**2))

    def time_grid(self, steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        """steps + 1 times from t_max down to t_min, uniform in t, float64."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return torch.linspace(self.t_max, self.t_min, steps + 1, dtype=torch.float64, device=device)

    # -- training ---------------------------------------------------------------------------------
    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times t_B, uniform on [t_min, t_max]."""
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return (self.t_min + (self.t_max - self.t_min) * u).float()

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t_B)
        return bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """What the network should output at (x_t, t) for this draw of (x_0, eps)."""
        if self.prediction == "eps":
            return eps
        d_alpha, d_sigma = self.d_alpha_sigma(t_B)
        return bcast(d_alpha, x0) * x0 + bcast(d_sigma, x0) * eps

    # -- network interface ----------------------------------------------------------------------
    def c_in(self, t_B: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t_B)
        return torch.rsqrt(alpha**2 + sigma**2)

    def model_time(self, t_B: torch.Tensor) -> torch.Tensor:
        return 1000.0 * t_B

    def to_x0_eps(
        self, x: torch.Tensor, t_B: torch.Tensor, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output -> (x0_hat, eps_hat), in fp32 at least."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x, out = x.to(dtype), out.to(dtype)
        alpha, sigma = (bcast(v.to(dtype), x) for v in self.alpha_sigma(t_B))
        if self.prediction == "eps":
            return (x - sigma * out) / alpha, out
        d_alpha, d_sigma = (bcast(v.to(dtype), x) for v in self.d_alpha_sigma(t_B))
        det = alpha * d_sigma - sigma * d_alpha
        return (d_sigma * x - sigma * out) / det, (alpha * out - d_alpha * x) / det


@dataclass(frozen=True)
class VPLinear(Process):
    beta_min: float = 0.1
    beta_max: float = 20.0

    def _beta_int(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        beta = self.beta_min + t * (self.beta_max - self.beta_min)
        integral = self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2
        return beta, integral

    def alpha_sigma(self, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, integral = self._beta_int(t_B)
        return torch.exp(-0.5 * integral), torch.sqrt(-torch.expm1(-integral))

    def d_alpha_sigma(self, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        beta, _ = self._beta_int(t_B)
        alpha, sigma = self.alpha_sigma(t_B)
        return -0.5 * beta * alpha, 0.5 * beta * alpha**2 / sigma


@dataclass(frozen=True)
class VPCosine(Process):
    s: float = 0.008

    def _angle(self, t: torch.Tensor) -> torch.Tensor:
        return (t + self.s) / (1 + self.s) * (math.pi / 2)

    def alpha_sigma(self, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = torch.cos(self._angle(t_B)) / math.cos(self.s / (1 + self.s) * math.pi / 2)
        alpha = ratio.clamp(max=1.0)
        return alpha, torch.sqrt((1 - alpha**2).clamp_min(0.0))

    def d_alpha_sigma(self, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = self.alpha_sigma(t_B)
        d_angle = math.pi / 2 / (1 + self.s)
        d_alpha = (
            -torch.sin(self._angle(t_B)) * d_angle / math.cos(self.s / (1 + self.s) * math.pi / 2)
        )
        return d_alpha, -alpha * d_alpha / sigma


@dataclass(frozen=True)
class VE(Process):
    sigma_min: float = 0.01
    sigma_max: float = 20.0

    def alpha_sigma(self, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** t_B
        return torch.ones_like(sigma), sigma

    def d_alpha_sigma(self, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, sigma = self.alpha_sigma(t_B)
        return torch.zeros_like(sigma), sigma * math.log(self.sigma_max / self.sigma_min)


@dataclass(frozen=True)
class RectifiedFlow(Process):
    """alpha = 1 - t, sigma = t; `logit_mean`, `logit_std` of the logit-normal training times."""

    logit_mean: float = 0.0
    logit_std: float = 1.0

    def alpha_sigma(self, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 1 - t_B, t_B

    def d_alpha_sigma(self, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return -torch.ones_like(t_B), torch.ones_like(t_B)

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logit-normal times: t = sigmoid(m + s * z), z ~ N(0, 1) (SD3, eq. 19)."""
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        t = torch.sigmoid(self.logit_mean + self.logit_std * z)
        return t.clamp(self.t_min, self.t_max).float()


def get_process(name: str) -> Process:
    """A process by name (`PROCESSES`). RF keeps t_max < 1 so its SDE's g^2 = 2t/(1-t) is finite."""
    if name == "vp-linear":
        return VPLinear(t_min=1e-3, t_max=1.0)
    if name == "vp-cosine":
        return VPCosine(t_min=1e-3, t_max=0.995)
    if name == "ve":
        return VE(t_min=0.0, t_max=1.0)
    if name == "rf":
        return RectifiedFlow(t_min=0.0, t_max=0.999, prediction="velocity")
    raise ValueError(f"unknown process {name!r}; choose one of {', '.join(PROCESSES)}")
