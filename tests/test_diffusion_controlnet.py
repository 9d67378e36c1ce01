"""ControlNet: bit-identical to the base at init, the base frozen through training, the DiT's
`block_residuals` hook, Sobel edges and edge IoU, checkpoints tied to their base, and (slow) the
committed checkpoint's edge-IoU bars."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from diffusion_ext.config import DIT_PRESETS
from diffusion_ext.controlnet import (
    ControlledDiT,
    ControlNet,
    edge_iou,
    export_controlnet,
    load_controlnet,
    load_controlnet_pipeline,
    load_frozen_base,
    sobel_edges,
    weights_hash,
)
from diffusion_ext.dit import DiT

ASSETS = Path(__file__).parents[1] / "diffusion_ext" / "assets"
BASE = ASSETS / "dit_digits_ema.safetensors"
ASSET = ASSETS / "controlnet_digits.safetensors"


def _inputs(b: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 8, 8, generator=g)
    t = torch.rand(b, generator=g) * 1000
    y = torch.randint(0, 11, (b,), generator=g)
    control = (torch.rand(b, 1, 8, 8, generator=g) < 0.2).float()
    return x, t, y, control


def test_output_is_bit_identical_to_the_base_at_init() -> None:
    base = load_frozen_base(BASE)
    controlled = ControlledDiT(base, ControlNet(base, 2)).eval()
    x, t, y, control = _inputs()
    with torch.no_grad():
        expected = base(x, t, y)
        assert torch.equal(controlled(x, t, y, control), expected)
        # The check can fail: once a zero projection is trained, the control changes the output.
        controlled.controlnet.control_in.weight.normal_(std=0.1)
        controlled.controlnet.zero_out[1].weight.normal_(std=0.1)
        assert not torch.equal(controlled(x, t, y, control), expected)


def test_block_residuals_hook() -> None:
    torch.manual_seed(0)
    model = DiT(dataclasses.replace(DIT_PRESETS["tiny-digits"], depth=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, y, _ = _inputs()
    with torch.no_grad():
        plain = model(x, t, y)
        zeros = [torch.zeros(4, 16, 96)] * 2
        assert torch.equal(model(x, t, y, block_residuals=None), plain)
        assert torch.equal(model(x, t, y, block_residuals=zeros), plain)
        assert not torch.equal(model(x, t, y, block_residuals=[torch.ones(4, 16, 96)]), plain)
        with pytest.raises(ValueError, match="3 block residuals for 2 blocks"):
            model(x, t, y, block_residuals=zeros + zeros[:1])


def test_training_leaves_the_base_unchanged_and_trains_the_controlnet() -> None:
    from diffusion_ext.train_cond import TRAIN_PRESETS, CondRun

    run = CondRun.create(TRAIN_PRESETS["controlnet-smoke"])
    base = run.task.frozen
    assert base is not None
    before = weights_hash(base)
    assert before == weights_hash(load_frozen_base(BASE))
    cn_before = weights_hash(run.task.module)
    for _ in range(3):
        run.train_step()
    assert weights_hash(base) == before
    assert weights_hash(run.task.module) != cn_before
    assert all(not p.requires_grad for p in base.parameters())
    assert run.task.check()["base_sha256_after"] == before


def test_sobel_edges_and_edge_iou() -> None:
    img = -torch.ones(1, 1, 8, 8)
    img[0, 0, 2:6, 2:6] = 1.0  # a filled square: edges on its border, none inside or far away
    e = sobel_edges(img)
    assert set(e.unique().tolist()) <= {0.0, 1.0}
    assert e[0, 0, 3:5, 3:5].sum() == 0 and e[0, 0, 0, :].sum() == 0 and e.sum() > 0
    assert edge_iou(img, e) == 1.0
    assert edge_iou(-torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)) == 1.0  # both empty
    assert edge_iou(-torch.ones(1, 1, 8, 8), e) == 0.0
    half = e.clone()
    on = half.flatten().nonzero()[:, 0]
    half.view(-1)[on[: len(on) // 2]] = 0.0
    assert edge_iou(img, half) == pytest.approx((len(on) - len(on) // 2) / len(on))


def test_checkpoint_is_tied_to_its_base(tmp_path: Path) -> None:
    base = load_frozen_base(BASE)
    cn = ControlNet(base, 2)
    with torch.no_grad():
        cn.zero_out[0].weight.normal_(std=0.05)
    path = tmp_path / "cn.safetensors"
    export_controlnet(cn, path, BASE, weights_hash(base))
    controlled, meta = load_controlnet(path)  # base found in assets/ by name
    assert meta["kind"] == "controlnet"
    x, t, y, control = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            controlled(x, t, y, control), ControlledDiT(base, cn)(x, t, y, control)
        )
    export_controlnet(cn, path, BASE, "0" * 64)
    with pytest.raises(ValueError, match="not the ones it was trained on"):
        load_controlnet(path)
    with pytest.raises(ValueError, match="not a diffusion_ext controlnet export"):
        load_controlnet(BASE)


@pytest.mark.skipif(not ASSET.is_file(), reason="no committed ControlNet checkpoint")
def test_committed_pipeline_follows_its_inputs() -> None:
    pipe = load_controlnet_pipeline(ASSET)
    from diffusion_ext.data import load_digits_split

    split = load_digits_split()
    control = sobel_edges(split.x_test_NCHW[:2])
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x = pipe.sample(split.y_test_N[:2], control, steps=4, guidance=1.25, generator=gens)
    assert x.shape == (2, 1, 8, 8) and float(x.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="need labels"):
        pipe.sample([1, 2], control[:1], steps=2)


@pytest.mark.slow
@pytest.mark.skipif(not ASSET.is_file(), reason="no committed ControlNet checkpoint")
def test_committed_checkpoint_meets_the_edge_iou_bars(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusion_ext.sample_cond",
            "--checkpoint",
            str(ASSET),
            "--out",
            str(tmp_path / "g.png"),
            "--evaluate",
            "--per-row",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["edge_iou_with"] >= 0.6 and r["edge_iou_without"] <= 0.3, r
