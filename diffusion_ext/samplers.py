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
* `ddim`: DDIM (Song, Meng & Ermon, 2021, eq. 12) with its eta in [0, 1] as a keyword (default 0,
  deterministic; 1 is `ddpm`); `sample(..., eta=...)` passes it.
* `euler`, `heun`: the probability-flow ODE dx/dt = alpha' x0_hat + sigma' eps_hat (Euler; Heun's
  2nd-order trapezoid as in Karras et al., 2022, Alg. 1, whose last step is a plain Euler step:
  2 N - 1 model calls for N steps).
* `euler-maruyama`: the reverse-time SDE dx = [f x - g^2 score] dt + g dw_bar (Song et al., 2021,
  eq. 6), score = -eps_hat / sigma, with g^2 capped where an explicit step would be stiff (see
  `euler_maruyama`); the last step is the deterministic denoising step.
* `rf-euler`: rectified-flow Euler x_s = x_t + (s - t) v_hat with v_hat = eps_hat - x0_hat (only
  for the `rf` process).

`heun` and `euler-maruyama` end with `_final_step`, x = alpha(t_min) x0_hat + sigma(t_min) eps_hat
from the last model call: Karras et al.'s last Euler step to sigma = 0 in their coordinates
(x / alpha against sigma / alpha, where DDIM is the Euler method, Sec. 4), i.e. x0_hat for RF.
`model_calls(name, steps)` is the number of denoiser evaluations of a run (for progress bars).
"""

from __future__ import annotations

import functools
import math
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


def check_eta(eta: float) -> float:
    """DDIM's eta as a float in [0, 1]; ValueError otherwise."""
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not math.isfinite(eta):
        raise ValueError(f"eta must be a finite number in [0, 1], got {eta!r}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM), got {eta}")
    return float(eta)


def ddim(
    denoise: DenoiseFn,
    process: Process,
    x: torch.Tensor,
    steps: int,
    generator: Generators = None,
    *,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM with posterior noise eta * (the DDPM posterior std); eta = 0 is deterministic (then
    `generator` is unused), eta = 1 is `ddpm`."""
    return _posterior(denoise, process, x, steps, generator, eta=check_eta(eta))


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


def _final_step(
    process: Process, x0: torch.Tensor, eps: torch.Tensor, s_B: torch.Tensor
) -> torch.Tensor:
    """The last, deterministic step to s = t_min: alpha_s x0_hat + sigma_s eps_hat (= x0_hat when
    sigma(t_min) = 0, as for RF)."""
    alpha_s, sigma_s = _coef(process.alpha_sigma, s_B, x0)
    return alpha_s * x0 + sigma_s * eps


def heun(
    denoise: DenoiseFn, process: Process, x: torch.Tensor, steps: int, generator: Generators = None
) -> torch.Tensor:
    """Heun (explicit trapezoid) on the probability-flow ODE: 2 N - 1 evaluations for N steps.

    Karras et al. (2022), Alg. 1: the 2nd-order correction is skipped on the last step, which
    ends at the data (their sigma = 0, where the correction would evaluate the model at noise 0):
    that step is `_final_step`.
    """
    grid = process.time_grid(steps, device=x.device)
    for i in range(steps):
        t_B, s_B = _times(x, grid[i]), _times(x, grid[i + 1])
        if i == steps - 1:
            return _final_step(process, *denoise(x, t_B), s_B)
        h = float(grid[i + 1] - grid[i])
        v_t = _ode_velocity(denoise, process, x, t_B)
        x_euler = x + h * v_t
        v_s = _ode_velocity(denoise, process, x_euler, s_B)
        x = x + h * 0.5 * (v_t + v_s)
    return x


def euler_maruyama(
    denoise: DenoiseFn, process: Process, x: torch.Tensor, steps: int, generator: Generators = None
) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time SDE, stepping dt = -h < 0; N model calls.

    Every reverse SDE dx = [v_ode - (w / 2) score] dt + sqrt(w) dw_bar, w(t) >= 0, has the
    marginals of the probability-flow ODE (Karras et al., 2022, eq. 6; Song et al. take w = g^2).
    For RF g^2 = 2t / (1 - t) is ~2000 at t_max = 0.999 (VP-cosine: ~400): one explicit step
    there injects g^2 h >> sigma^2 of variance that its own drift must take out again, so x jumps
    to |x| ~ 30 and the next call sees an input far off the path. As Karras et al. (Alg. 2) bound
    the noise added per step (gamma <= sqrt(2) - 1: the state's noise variance at most doubles),
    we cap w h <= sigma^2; where g^2 h is smaller this is Song et al.'s sampler unchanged (at 32
    steps the cap acts on RF at t = 0.999, 0.968, 0.937, 0.062, on VP-cosine at 0.995, 0.964,
    never on VP-linear or VE). The last step is `_final_step`, the deterministic denoising step
    (Song et al. end on the noise-free mean; Jolicoeur-Martineau et al., 2021, on Tweedie's
    x0_hat), which on RF returns x0_hat instead of leaving ~1/N of noise.
    """
    grid = process.time_grid(steps, device=x.device)
    for i in range(steps):
        t_B, s_B = _times(x, grid[i]), _times(x, grid[i + 1])
        x0, eps = denoise(x, t_B)
        if i == steps - 1:
            return _final_step(process, x0, eps, s_B)
        h = float(grid[i] - grid[i + 1])
        d_alpha, d_sigma = _coef(process.d_alpha_sigma, t_B, x)
        _, sigma = _coef(process.alpha_sigma, t_B, x)
        _, g2 = _coef(process.sde_coefficients, t_B, x)
        w = torch.minimum(g2, sigma**2 / h)  # Karras et al.'s per-step noise bound (above)
        # Reverse drift v_ode - (w / 2) score = v_ode + w eps / (2 sigma); with w = g^2 this is
        # Song et al.'s f x - g^2 score.
        drift = d_alpha * x0 + d_sigma * eps + 0.5 * w * eps / sigma
        x = x - h * drift + torch.sqrt(w * h) * randn_like(x, generator)
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


def get_sampler(name: str, eta: float | None = None) -> Sampler:
    """The sampler called `name` (with DDIM's `eta` when given); a ValueError naming the choices
    otherwise, or if `eta` is given for another sampler or is outside [0, 1]."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if eta is None:
        return SAMPLERS[name]
    if name != "ddim":
        raise ValueError(f"eta is DDIM's parameter; sampler {name!r} takes none (use ddim)")
    return functools.partial(ddim, eta=check_eta(eta))


def model_calls(name: str, steps: int) -> int:
    """How many times sampler `name` calls the denoiser in `steps` steps."""
    get_sampler(name)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return 2 * steps - 1 if name == "heun" else steps


def sample(
    name: str,
    denoise: DenoiseFn,
    process: Process,
    noise: torch.Tensor,
    steps: int,
    generator: Generators = None,
    eta: float | None = None,
) -> torch.Tensor:
    """Run sampler `name` from x_T = process.prior_std() * noise (noise ~ N(0, I), fp32);
    `eta` only for `ddim` (None: its default, 0)."""
    sampler = get_sampler(name, eta)
    x_T = process.prior_std() * noise.float()
    with torch.no_grad():
        return sampler(denoise, process, x_T, steps, generator)
