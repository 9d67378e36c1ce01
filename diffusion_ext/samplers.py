"""Stateless samplers sharing one signature, for every process in `schedules`.

Shape legend: B batch, X trailing data dims. Times are python floats / float64 tensors t_B.

Signature (k-diffusion style): `sampler(denoise, process, x_T, steps, generator) -> x`, where
`denoise(x, t_B) -> (x0_hat, eps_hat)` (a `DenoiseFn`, built in `guidance`), `x_T` is the starting
point at `process.t_max` (e.g. `process.prior_std() * randn`), and `steps` uniform steps in t run
from `t_max` to `t_min`; the returned x is the state at `t_min` (sigma(t_min) is 0 for RF and
0.01 for VP/VE, invisible in [-1, 1] images). `generator` is one `torch.Generator`, or a list of
B of them (one per sample) so that a batch of N equals N single runs, stochastic samplers included.

* `ddpm`: ancestral sampling from the DDPM posterior q(x_s | x_t, x0_hat) (Ho et al., 2020), in
  the alpha/sigma form that covers VE and RF too; = DDIM with eta = 1.
* `ddim`: DDIM, eta = 0 (Song, Meng & Ermon, 2021, eq. 12).
* `euler`, `heun`: the probability-flow ODE dx/dt = alpha' x0_hat + sigma' eps_hat (Euler; Heun's
  2nd-order trapezoid as in Karras et al., 2022, Alg. 1).
* `euler-maruyama`: the reverse-time SDE dx = [f x - g^2 score] dt + g dw_bar (Song et al., 2021,
  eq. 6), score = -eps_hat / sigma; no noise on the last step.
* `rf-euler`: rectified-flow Euler x_s = x_t + (s - t) v_hat with v_hat = eps_hat - x0_hat (only
  for the `rf` process).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from diffusion_ext.config import SAMPLER_NAMES
from diffusion_ext.schedules import Process, RectifiedFlow, bcast

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Generators = torch.Generator | Sequence[torch.Generator] | None
Sampler = Callable[[DenoiseFn, Process, torch.Tensor, int, Generators], torch.Tensor]


def randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like x; one generator per row when a list is given."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    rows = [
        torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device) for g in generator
    ]
    return torch.stack(rows)


def _times(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t.expand(x.shape[0]).to(torch.float64)


def _coef(
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    t_B: torch.Tensor,
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(t_B) as two [B, 1, ...] tensors in x's dtype."""
    a, b = fn(t_B)
    return bcast(a.to(x.dtype), x), bcast(b.to(x.dtype), x)


def _ode_velocity(
    denoise: DenoiseFn, process: Process, x: torch.Tensor, t_B: torch.Tensor
) -> torch.Tensor:
    """Probability-flow ODE drift dx/dt = alpha' x0_hat + sigma' eps_hat."""
    x0, eps = denoise(x, t_B)
    d_alpha, d_sigma = _coef(process.d_alpha_sigma, t_B, x)
    return d_alpha * x0 + d_sigma * eps


def _posterior(
    denoise: DenoiseFn,
    process: Process,
    x: torch.Tensor,
    steps: int,
    generator: Generators,
    eta: float,
) -> torch.Tensor:
    grid = process.time_grid(steps, device=x.device)
    for i in range(steps):
        t_B, s_B = _times(x, grid[i]), _times(x, grid[i + 1])
        x0, eps = denoise(x, t_B)
        alpha_t, sigma_t = _coef(process.alpha_sigma, t_B, x)
        alpha_s, sigma_s = _coef(process.alpha_sigma, s_B, x)
        # Posterior std c = eta * sigma_s * sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2).
        ratio = (alpha_t * sigma_s) / (alpha_s * sigma_t)
        c = eta * sigma_s * torch.sqrt((1 - ratio**2).clamp_min(0.0))
        x = alpha_s * x0 + torch.sqrt((sigma_s**2 - c**2).clamp_min(0.0)) * eps
        if eta > 0 and i < steps - 1:
            x = x + c * randn_like(x, generator)
    return x


def ddpm(
    denoise: DenoiseFn, process: Process, x: torch.Tensor, steps: int, generator: Generators = None
) -> torch.Tensor:
    """Ancestral DDPM sampling (DDIM with eta = 1)."""
    return _posterior(denoise, process, x, steps, generator, eta=1.0)


def ddim(
    denoise: DenoiseFn, process: Process, x: torch.Tensor, steps: int, generator: Generators = None
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0); `generator` is unused."""
    return _posterior(denoise, process, x, steps, generator, eta=0.0)


def euler(
    denoise: DenoiseFn, process: Process, x: torch.Tensor, steps: int, generator: Generators = None
) -> torch.Tensor:
    """Euler on the probability-flow ODE; `generator` is unused."""
    grid = process.time_grid(steps, device=x.device)
    for i in range(steps):
        t_B = _times(x, grid[i])
        h = float(grid[i + 1] - grid[i])
        x = x + h * _ode_velocity(denoise, process, x, t_B)
    return x


def heun(
    denoise: DenoiseFn, process: Process, x: torch.Tensor, steps: int, generator: Generators = None
) -> torch.Tensor:
    """Heun (explicit trapezoid) on the probability-flow ODE; 2 evaluations per step."""
    grid = process.time_grid(steps, device=x.device)
    for i in range(steps):
        t_B, s_B = _times(x, grid[i]), _times(x, grid[i + 1])
        h = float(grid[i + 1] - grid[i])
        v_t = _ode_velocity(denoise, process, x, t_B)
        x_euler = x + h * v_t
        v_s = _ode_velocity(denoise, process, x_euler, s_B)
        x = x + h * 0.5 * (v_t + v_s)
    return x


def euler_maruyama(
    denoise: DenoiseFn, process: Process, x: torch.Tensor, steps: int, generator: Generators = None
) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time SDE, stepping dt = -h < 0."""
    grid = process.time_grid(steps, device=x.device)
    for i in range(steps):
        t_B = _times(x, grid[i])
        h = float(grid[i] - grid[i + 1])
        x0, eps = denoise(x, t_B)
        d_alpha, d_sigma = _coef(process.d_alpha_sigma, t_B, x)
        _, sigma = _coef(process.alpha_sigma, t_B, x)
        _, g2 = _coef(process.sde_coefficients, t_B, x)
        # f x - g^2 score = v_ode - g^2 score / 2 = v_ode + g^2 eps / (2 sigma).
        drift = d_alpha * x0 + d_sigma * eps + 0.5 * g2 * eps / sigma
        x = x - h * drift
        if i < steps - 1:
            x = x + torch.sqrt(g2 * h) * randn_like(x, generator)
    return x


def rf_euler(
    denoise: DenoiseFn, process: Process, x: torch.Tensor, steps: int, generator: Generators = None
) -> torch.Tensor:
    """Rectified-flow Euler: x_s = x_t + (s - t) (eps_hat - x0_hat)."""
    if not isinstance(process, RectifiedFlow):
        raise ValueError(f"rf-euler needs the rectified-flow process, got {type(process).__name__}")
    grid = process.time_grid(steps, device=x.device)
    for i in range(steps):
        x0, eps = denoise(x, _times(x, grid[i]))
        x = x + float(grid[i + 1] - grid[i]) * (eps - x0)
    return x


SAMPLERS: dict[str, Sampler] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "euler-maruyama": euler_maruyama,
    "rf-euler": rf_euler,
}
assert tuple(SAMPLERS) == SAMPLER_NAMES


def get_sampler(name: str) -> Sampler:
    """The sampler called `name`; a ValueError naming the choices otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample(
    name: str,
    denoise: DenoiseFn,
    process: Process,
    noise: torch.Tensor,
    steps: int,
    generator: Generators = None,
) -> torch.Tensor:
    """Run sampler `name` from x_T = process.prior_std() * noise (noise ~ N(0, I), fp32)."""
    sampler = get_sampler(name)
    x_T = process.prior_std() * noise.float()
    with torch.no_grad():
        return sampler(denoise, process, x_T, steps, generator)
