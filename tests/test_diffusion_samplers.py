"""Processes, samplers and guidance, checked against exact Gaussian denoisers.

For data x0 ~ N(mu, s^2) and x_t = alpha x0 + sigma eps, the exact denoiser is
E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu) and
E[eps | x_t] = sigma / (alpha^2 s^2 + sigma^2) (x_t - alpha mu); a correct sampler driven by it
must return samples with mean mu and variance s^2, up to its discretisation error.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from attention.precision import get_policy
from diffusion_ext.config import DIT_PRESETS, PROCESSES, SampleConfig
from diffusion_ext.dit import DiT
from diffusion_ext.guidance import classifier_guided, classifier_log_prob, model_denoiser
from diffusion_ext.samplers import SAMPLERS, ddim, get_sampler, model_calls, sample
from diffusion_ext.schedules import Process, get_process

MU, VAR = 0.3, 0.25

# Steps per sampler: first-order stochastic samplers converge slowly in the variance (DDPM's
# ancestral step with a posterior-mean x0 loses variance O(1/steps)); Heun is second order.
STEPS = {"ddpm": 800, "ddim": 300, "euler": 300, "heun": 40, "euler-maruyama": 600, "rf-euler": 300}


def gaussian_denoiser(process: Process, mu: torch.Tensor | float, var: float):  # type: ignore[no-untyped-def]
    def denoise(x: torch.Tensor, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = (
            v.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1)) for v in process.alpha_sigma(t_B)
        )
        den = alpha**2 * var + sigma**2
        return mu + alpha * var / den * (x - alpha * mu), sigma / den * (x - alpha * mu)

    return denoise


CASES = [(p, s) for p in PROCESSES for s in SAMPLERS if s != "rf-euler" or p == "rf"]


@pytest.mark.parametrize("process_name, sampler", CASES)
def test_sampler_recovers_gaussian_data(process_name: str, sampler: str) -> None:
    process = get_process(process_name)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(10000, 1, generator=g)
    noise = (noise - noise.mean()) / noise.std()  # leave only the sampler's error
    steps = 1000 if (process_name, sampler) == ("ve", "euler") else STEPS[sampler]
    x = sample(sampler, gaussian_denoiser(process, MU, VAR), process, noise, steps, g)
    mean, var = float(x.mean()), float(x.var())
    # Stochastic samplers add Monte-Carlo error ~ sqrt(2/N) = 1.4% on the variance.
    assert abs(var / VAR - 1) < 0.05, f"{process_name}/{sampler}: variance {var:.4f} vs {VAR}"
    assert abs(mean - MU) < 0.02, f"{process_name}/{sampler}: mean {mean:.4f} vs {MU}"


@pytest.mark.parametrize("process_name", PROCESSES)
def test_process_derivatives_and_parameterisation(process_name: str) -> None:
    process = get_process(process_name)
    t = torch.linspace(max(process.t_min, 0.01), process.t_max - 0.01, 7, dtype=torch.float64)
    h = 1e-6
    (a1, s1), (a0, s0) = process.alpha_sigma(t + h), process.alpha_sigma(t - h)
    da, ds = process.d_alpha_sigma(t)
    torch.testing.assert_close(da, (a1 - a0) / (2 * h), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds, (s1 - s0) / (2 * h), rtol=1e-5, atol=1e-6)
    x0, eps = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    x_t = process.add_noise(x0, eps, t)
    x0_hat, eps_hat = process.to_x0_eps(x_t, t, process.target(x0, eps, t))
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_rf_training_times_are_logit_normal() -> None:
    t = get_process("rf").sample_t(20000, torch.Generator().manual_seed(0)).double()
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean())) < 0.03 and abs(float(logit.std()) - 1) < 0.03


def _dit(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(dataclasses.replace(DIT_PRESETS["tiny-digits"], depth=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("sampler", ["ddpm", "heun", "euler-maruyama", "rf-euler"])
def test_batch_of_n_equals_n_single_runs(sampler: str) -> None:
    model, process = _dit(), get_process("rf")
    y = torch.tensor([3, 7, 0])
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def run(rows: slice) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(10 + i) for i in range(3)][rows]
        den = model_denoiser(
            model, process, y[rows], null_class=model.null_class, guidance_scale=2.0
        )
        return sample(sampler, den, process, noise[rows], 4, gens)

    singles = torch.cat([run(slice(i, i + 1)) for i in range(3)])
    torch.testing.assert_close(run(slice(0, 3)), singles, rtol=1e-4, atol=1e-5)


def test_guidance_scale_one_equals_conditional_model() -> None:
    model, process = _dit(), get_process("vp-cosine")
    y = torch.tensor([1, 4, 9, 2])
    x = torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 0.4, dtype=torch.float64)
    kw = {"null_class": model.null_class}
    with torch.no_grad():
        cond = model_denoiser(model, process, y, **kw)(x, t)
        cfg1 = model_denoiser(model, process, y, guidance_scale=1.0, **kw)(x, t)
        cfg3 = model_denoiser(model, process, y, guidance_scale=3.0, **kw)(x, t)
    torch.testing.assert_close(cfg1[1], cond[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cfg3[1], cond[1], atol=1e-3)  # guidance does something


def test_guidance_arithmetic_is_fp32_under_bf16() -> None:
    model, process = _dit(), get_process("rf")
    y = torch.tensor([5, 6])
    den = model_denoiser(
        model,
        process,
        y,
        null_class=model.null_class,
        guidance_scale=4.0,
        policy=get_policy("bf16"),
    )
    with torch.no_grad():
        x0, eps = den(torch.randn(2, 1, 8, 8), torch.full((2,), 0.5, dtype=torch.float64))
    assert x0.dtype is torch.float32 and eps.dtype is torch.float32


def test_classifier_guidance_scale_one_turns_unconditional_into_conditional() -> None:
    """Two classes N(+-m, s^2): exact unconditional denoiser + exact p(y | x_t) at scale 1 must
    give the exact class-conditional denoiser (Bayes: score(x|y) = score(x) + grad log p(y|x))."""
    process, m, s2 = get_process("vp-linear"), 1.0, 0.1
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)[:, None]
    t = torch.full((13,), 0.3, dtype=torch.float64)
    alpha, sigma = process.alpha_sigma(t)
    var_t = (alpha**2 * s2 + sigma**2)[:, None]

    def log_lik(x_: torch.Tensor, mean: float) -> torch.Tensor:
        return (-0.5 * (x_ - alpha[:, None] * mean) ** 2 / var_t).sum(-1)

    def uncond(x_: torch.Tensor, t_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.softmax(torch.stack([log_lik(x_, m), log_lik(x_, -m)], -1), -1)
        parts = [gaussian_denoiser(process, mu, s2)(x_, t_) for mu in (m, -m)]
        return tuple(w[:, 0:1] * a + w[:, 1:2] * b for a, b in zip(*parts, strict=True))  # type: ignore[return-value]

    def log_p_class0(x_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(torch.stack([log_lik(x_, m), log_lik(x_, -m)], -1), -1)[:, 0]

    got = classifier_guided(uncond, process, log_p_class0, 1.0)(x, t)
    want = gaussian_denoiser(process, m, s2)(x, t)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(uncond(x, t)[0], want[0])


class _LinearClassifier(nn.Module):
    """logits = x W^T (time ignored): grad_x log p(y | x) = W_y - softmax(logits) W."""

    def __init__(self, w_KX: torch.Tensor) -> None:
        super().__init__()
        self.w_KX = w_KX

    def forward(self, x: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w_KX.T


def test_classifier_guidance_through_a_network_classifier() -> None:
    process = get_process("vp-cosine")  # c_in = 1
    w_KX = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 2])
    x = torch.randn(2, 4, dtype=torch.float64)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    base = gaussian_denoiser(process, 0.0, 1.0)
    log_prob = classifier_log_prob(_LinearClassifier(w_KX), process, y)
    with torch.no_grad():  # samplers run under no_grad; guidance must still differentiate
        x0_g, eps_g = classifier_guided(base, process, log_prob, 2.0)(x, t)
    grad = w_KX[y] - torch.softmax(x @ w_KX.T, -1) @ w_KX
    alpha, sigma = (v[:, None] for v in process.alpha_sigma(t))
    x0, eps = base(x, t)
    torch.testing.assert_close(eps_g, eps - 2.0 * sigma * grad)
    torch.testing.assert_close(alpha * x0_g + sigma * eps_g, x)  # still on the same x_t


def test_unknown_sampler_and_wrong_process_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown sampler 'plms'; choose one of ddpm, ddim"):
        get_sampler("plms")
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        SampleConfig(sampler="plms")
    with pytest.raises(ValueError, match="unknown process 'edm'"):
        get_process("edm")
    vp = get_process("vp-linear")
    with pytest.raises(ValueError, match="rf-euler needs the rectified-flow process"):
        sample("rf-euler", gaussian_denoiser(vp, MU, VAR), vp, torch.randn(2, 1), 2)


# ---- issue 21: Euler-Maruyama's first and last steps, Heun's call count, DDIM's eta -------------


class Recorder:
    """A DenoiseFn that forwards to `denoise` and keeps every call's (x, t, x0_hat, eps_hat)."""

    def __init__(self, denoise) -> None:  # type: ignore[no-untyped-def]
        self.denoise = denoise
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0, eps = self.denoise(x, t_B)
        self.calls.append((x.clone(), t_B.clone(), x0, eps))
        return x0, eps


@pytest.mark.parametrize("process_name", PROCESSES)
def test_euler_maruyama_recovers_gaussian_data_at_32_steps(process_name: str) -> None:
    """The exact-Gaussian tolerance (5% on the variance, 0.02 on the mean) at 32 steps. 10^5
    samples: the systematic error (up to 4.2%, VP-linear) is what is measured, the Monte-Carlo
    error on the variance (sqrt(2/N) = 0.45%) stays small beside it."""
    process = get_process(process_name)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(100_000, 1, generator=g)
    x = sample("euler-maruyama", gaussian_denoiser(process, MU, VAR), process, noise, 32, g)
    mean, var = float(x.mean()), float(x.var())
    assert abs(var / VAR - 1) < 0.05, f"{process_name}: variance {var:.4f} vs {VAR}"
    assert abs(mean - MU) < 0.02, f"{process_name}: mean {mean:.4f} vs {MU}"


@pytest.mark.parametrize("process_name", PROCESSES)
def test_euler_maruyama_queries_the_model_on_the_path(process_name: str) -> None:
    """At 32 steps every state the denoiser sees has about the marginal variance
    alpha^2 s^2 + sigma^2 of x_t (within 2x): no stiff first step throwing x far off the path
    (RF used to query x with 1000x that variance, |x| ~ 30; VP-cosine 40x). Fewer steps on VE
    overshoot in the ODE drift itself (uniform t against an exponential sigma), any sampler."""
    process = get_process(process_name)
    g = torch.Generator().manual_seed(0)
    rec = Recorder(gaussian_denoiser(process, MU, VAR))
    sample("euler-maruyama", rec, process, torch.randn(20_000, 1, generator=g), 32, g)
    for x, t_B, _, _ in rec.calls:
        alpha, sigma = process.alpha_sigma(t_B[:1])
        want = float(alpha**2 * VAR + sigma**2)
        ratio = float(x.var()) / want
        assert 0.5 < ratio < 2.0, f"t={float(t_B[0]):.3f}: variance {ratio:.2f}x the marginal"


@pytest.mark.parametrize("process_name", PROCESSES)
@pytest.mark.parametrize("sampler", ["heun", "euler-maruyama"])
def test_last_step_is_the_deterministic_denoising_step(process_name: str, sampler: str) -> None:
    """The result is alpha(t_min) x0_hat + sigma(t_min) eps_hat of the last model call (x0_hat
    itself on RF, where sigma(t_min) = 0), not an Euler step that leaves ~1/steps of noise."""
    process = get_process(process_name)
    g = torch.Generator().manual_seed(0)
    rec = Recorder(gaussian_denoiser(process, MU, VAR))
    x = sample(sampler, rec, process, torch.randn(500, 1, generator=g), 16, g)
    _, _, x0, eps = rec.calls[-1]
    t_min = torch.tensor([process.t_min], dtype=torch.float64)
    alpha, sigma = (float(v) for v in process.alpha_sigma(t_min))
    torch.testing.assert_close(x, alpha * x0 + sigma * eps)
    if process_name == "rf":
        torch.testing.assert_close(x, x0)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 16])
def test_model_call_counts(sampler: str, steps: int) -> None:
    """Heun makes 2 N - 1 calls (Karras et al., 2022, Alg. 1), the others N; `model_calls`
    (the progress bar's total) says the same."""
    process = get_process("rf")
    rec = Recorder(gaussian_denoiser(process, MU, VAR))
    sample(sampler, rec, process, torch.randn(4, 1), steps, torch.Generator().manual_seed(0))
    want = 2 * steps - 1 if sampler == "heun" else steps
    assert len(rec.calls) == want == model_calls(sampler, steps)


@pytest.mark.parametrize("process_name", ["vp-linear", "rf"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_any_eta_recovers_gaussian_data(process_name: str, eta: float) -> None:
    """DDIM's eta interpolates between the deterministic sampler and DDPM: every eta keeps the
    marginals (at DDPM's step count, within the exact-Gaussian tolerance)."""
    process = get_process(process_name)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(10000, 1, generator=g)
    noise = (noise - noise.mean()) / noise.std()
    x = sample("ddim", gaussian_denoiser(process, MU, VAR), process, noise, STEPS["ddpm"], g, eta)
    mean, var = float(x.mean()), float(x.var())
    assert abs(var / VAR - 1) < 0.05, f"{process_name}/eta={eta}: variance {var:.4f} vs {VAR}"
    assert abs(mean - MU) < 0.02, f"{process_name}/eta={eta}: mean {mean:.4f} vs {MU}"


def test_ddim_eta_zero_is_deterministic_and_eta_one_is_ddpm() -> None:
    process = get_process("vp-cosine")
    den = gaussian_denoiser(process, MU, VAR)
    noise = torch.randn(64, 1, generator=torch.Generator().manual_seed(3))

    def run(name: str, seed: int, eta: float | None = None) -> torch.Tensor:
        return sample(name, den, process, noise, 20, torch.Generator().manual_seed(seed), eta)

    assert torch.equal(run("ddim", 0, 0.0), run("ddim", 1, 0.0))
    assert torch.equal(run("ddim", 0), run("ddim", 1, 0.0))  # the default is eta = 0
    assert torch.equal(run("ddim", 5, 1.0), run("ddpm", 5))
    half_a, half_b = run("ddim", 0, 0.5), run("ddim", 1, 0.5)
    assert not torch.allclose(half_a, half_b)  # eta > 0 draws noise
    # The injected noise grows with eta: distance from the deterministic path, per sample.
    dist = [float((run("ddim", 7, e) - run("ddim", 7, 0.0)).pow(2).mean()) for e in (0.25, 1)]
    assert 0 < dist[0] < dist[1], dist


@pytest.mark.parametrize("eta", [-0.1, 1.5, math.nan, math.inf, True, "0.5"])
def test_ddim_eta_is_validated(eta: object) -> None:
    process = get_process("rf")
    den = gaussian_denoiser(process, MU, VAR)
    with pytest.raises(ValueError, match="eta must be"):
        ddim(den, process, torch.randn(2, 1), 2, eta=eta)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eta must be"):
        get_sampler("ddim", eta)  # type: ignore[arg-type]


def test_eta_belongs_to_ddim_only() -> None:
    with pytest.raises(ValueError, match="eta is DDIM's parameter; sampler 'heun'"):
        get_sampler("heun", 0.5)
    with pytest.raises(ValueError, match="eta"):
        SampleConfig(sampler="heun", eta=0.5)
    with pytest.raises(ValueError, match="eta must be in"):
        SampleConfig(sampler="ddim", eta=2.0)
    assert SampleConfig(sampler="ddim", eta=0.3).eta == 0.3
