"""The shared mixed-precision runtime: policies, autocast, fp32 helpers and the loss scaler."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attention.precision import (
    PRECISION_PRESETS,
    DynamicLossScaler,
    PrecisionPolicy,
    autocast,
    get_policy,
    norm_fp32,
    rms_norm_fp32,
)


def test_presets_and_validation() -> None:
    assert get_policy("bf16").compute_torch_dtype is torch.bfloat16
    assert get_policy("fp16").loss_scaling
    assert all(p.param_dtype in ("fp32", "bf16", "fp16") for p in PRECISION_PRESETS.values())
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        PrecisionPolicy(compute_dtype="fp8")
    with pytest.raises(ValueError, match="only meaningful"):
        PrecisionPolicy(compute_dtype="bf16", loss_scaling=True)
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        get_policy("int4")


@pytest.mark.parametrize(
    "name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_autocast_runs_matmuls_in_compute_dtype_on_cpu(name: str, dtype: torch.dtype) -> None:
    layer = nn.Linear(8, 8)
    with autocast(get_policy(name), "cpu"):
        out = layer(torch.randn(2, 8))
    assert out.dtype is dtype
    assert layer.weight.dtype is torch.float32  # master weights untouched


def test_fp32_helpers_return_input_dtype_with_fp32_accuracy() -> None:
    x = (torch.randn(4, 64) * 8).to(torch.bfloat16)
    ln = nn.LayerNorm(64)
    with autocast(get_policy("bf16"), "cpu"):
        y = norm_fp32(x, ln)
    assert y.dtype is torch.bfloat16
    torch.testing.assert_close(y, ln(x.float()).to(torch.bfloat16), rtol=0, atol=0)
    w = torch.rand(64) + 0.5
    r = rms_norm_fp32(x, w)
    ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(r.float(), ref.to(torch.bfloat16).float(), rtol=0.01, atol=0.01)


def _param_with_grad(value: float) -> nn.Parameter:
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), value)
    return p


def test_scaler_skips_step_and_backs_off_on_overflow() -> None:
    scaler = DynamicLossScaler(init_scale=1024.0, growth_interval=3)
    p = _param_with_grad(float("inf"))
    opt = torch.optim.SGD([p], lr=0.1)
    assert not scaler.step(opt, [p])
    torch.testing.assert_close(p.detach(), torch.ones(3))  # untouched
    assert scaler.scale_value == 512.0 and scaler.skipped_steps == 1
    p.grad = torch.full((3,), float("nan"))
    assert not scaler.step(opt, [p])
    assert scaler.scale_value == 256.0


def test_scaler_unscales_and_grows_after_interval() -> None:
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=2)
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=1.0)
    for step in range(2):
        opt.zero_grad()
        scaler.scale((p - 1.0).pow(2).sum()).backward()  # true grad = 2 (p - 1)
        expected = p.detach() - 2 * (p.detach() - 1.0)
        assert scaler.step(opt, [p])
        torch.testing.assert_close(p.detach(), expected)
        assert scaler.scale_value == (8.0 if step == 0 else 16.0)
    state = scaler.state_dict()
    other = DynamicLossScaler()
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_disabled_scaler_is_identity() -> None:
    scaler = DynamicLossScaler(enabled=False)
    loss = torch.tensor(3.0)
    assert scaler.scale(loss) is loss
    p = _param_with_grad(2.0)
    assert scaler.unscale_([p]) and float(p.grad[0]) == 2.0  # type: ignore[index]


def test_fp16_training_with_loss_scaling_converges_on_cpu() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) * 1e-3  # tiny targets: fp16 gradients underflow
    model = nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # 2^40 overflows fp16 in backward: the scaler must skip and back off until it fits.
    scaler = DynamicLossScaler(init_scale=2.0**40, growth_interval=50)
    policy = get_policy("fp16")
    for _ in range(200):
        opt.zero_grad()
        with autocast(policy, "cpu"):
            loss = (model(x).float().squeeze(-1) - y).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt, list(model.parameters()))
    assert float(loss.detach()) < 1e-6, float(loss.detach())
    assert scaler.skipped_steps >= 10 and scaler.scale_value < 2.0**30
