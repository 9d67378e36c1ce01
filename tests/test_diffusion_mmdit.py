"""MM-DiT and its text side: joint attention against the reference, adaLN-Zero identity at init,
the text stream reaching the image, captions computed from images, the tokenizer, checkpoints,
resumable training, and (slow) the committed checkpoint's quality bars."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from diffusion_ext.mmdit import (
    MMDiT,
    MMDiTConfig,
    export_mmdit,
    joint_attention,
    load_mmdit,
    load_mmdit_pipeline,
)
from diffusion_ext.text import (
    MAX_TOKENS,
    attributes,
    caption,
    ink_mass,
    shear,
    tokenize,
    training_captions,
)

TINY = MMDiTConfig(hidden_size=32, depth=2, num_heads=4, text_width=32, text_depth=1)
ASSET = Path(__file__).parents[1] / "diffusion_ext" / "assets" / "mmdit_digits.safetensors"


def _randomized(config: MMDiTConfig, seed: int = 0) -> MMDiT:
    """An MM-DiT whose zero-initialised layers are random too (outputs are not trivially 0)."""
    torch.manual_seed(seed)
    model = MMDiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _inputs(b: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prompts = ["a bold seven slanted left", "an eight", ""][:b]
    return (
        torch.randn(b, 1, 8, 8, generator=g),
        torch.rand(b, generator=g) * 1000,
        tokenize(prompts),
    )


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_joint_attention_backend_matches_reference(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    ctx = [torch.randn(2, 4, 8, 16, generator=g) for _ in range(3)]
    img = [torch.randn(2, 4, 16, 16, generator=g) for _ in range(3)]
    ref_c, ref_x = joint_attention(*ctx, *img, backend="reference")
    out_c, out_x = joint_attention(*ctx, *img, backend=backend)
    # The spec, written out: softmax over the concatenated keys of both streams.
    q, k, v = (torch.cat([c, x], 2).double() for c, x in zip(ctx, img, strict=True))
    spec = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
    torch.testing.assert_close(torch.cat([ref_c, ref_x], 2).double(), spec)
    err = (torch.cat([out_c, out_x], 2).double() - spec).abs().max().item()
    assert err < 1e-5, f"{backend} max error {err:.2e} vs the float64 spec"


def test_model_with_reference_backend_equals_sdpa() -> None:
    sdpa = _randomized(TINY)
    ref = MMDiT(dataclasses.replace(TINY, attn_backend="reference")).eval()
    ref.load_state_dict(sdpa.state_dict())
    x, t, ids = _inputs()
    with torch.no_grad():
        a, b = sdpa(x, t, ids), ref(x, t, ids)
    assert a.abs().max() > 1e-3  # randomized: not trivially zero
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_every_block_is_identity_at_init_and_output_is_zero() -> None:
    model = MMDiT(TINY).eval()
    x, t, ids = _inputs()
    ctx = model.ctx_embed(model.text(ids)[0])
    tokens = model.patch_embed(torch.randn(3, 16, 4))
    c = model.t_embed(t)
    for block in model.blocks:
        out_ctx, out_x = block(ctx, tokens, c)
        assert torch.equal(out_ctx, ctx) and torch.equal(out_x, tokens)
    assert torch.equal(model(x, t, ids), torch.zeros_like(x))


def test_text_tokens_reach_the_image_through_joint_attention() -> None:
    model = _randomized(TINY)
    with torch.no_grad():  # cut the pooled path: only the text tokens in attention remain
        for p in model.pooled_embed.parameters():
            p.zero_()
    x, t, _ = _inputs(2)
    x, t = x[:1].repeat(2, 1, 1, 1), t[:1].repeat(2)
    ids = tokenize(["a bold seven", "a thin one"])
    with torch.no_grad():
        out = model(x, t, ids)
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_batch_rows_are_independent() -> None:
    model = _randomized(TINY)
    x, t, ids = _inputs()
    with torch.no_grad():
        full = model(x, t, ids)
        single = torch.cat([model(x[i : i + 1], t[i : i + 1], ids[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(full, single, rtol=1e-5, atol=1e-5)


def test_captions_and_attributes_follow_the_images() -> None:
    assert caption(7, 2, 0) == "a bold seven slanted left"
    assert caption(8, 1, 1) == "an eight upright"
    assert caption(1) == "a one" and caption(8, 0) == "a thin eight"
    img = -torch.ones(2, 1, 8, 8)
    for r in range(8):  # a stroke leaning right (top to the right) and its mirror image
        img[0, 0, r, 7 - r] = 1.0
        img[1, 0, r, r] = 1.0
    s = shear(img)
    assert s[0] > 0.5 and s[1] < -0.5, s
    from diffusion_ext.data import load_digits_split

    split = load_digits_split()
    x, y = split.x_train_NCHW, split.y_train_N
    attrs = attributes(x, y)
    ink = ink_mass(x)
    for k in range(10):
        sel = y == k
        assert ink[sel & (attrs.ink_N == 2)].min() > ink[sel & (attrs.ink_N == 0)].max()
        for level in range(3):  # tertiles: each bin holds about a third of the class
            frac = float((attrs.slant_N[sel] == level).float().mean())
            assert 0.25 < frac < 0.42, (k, level, frac)
    sub = dataclasses.replace(attrs, ink_N=attrs.ink_N[:64], slant_N=attrs.slant_N[:64])
    prompts = training_captions(y[:64], sub, 0.5, torch.Generator().manual_seed(0))
    assert any("bold" in p or "thin" in p for p in prompts)
    assert any(p.split()[1] in ("zero", "one", "two", "three", "four") for p in prompts)
    tokenize(prompts)


def test_tokenizer() -> None:
    ids = tokenize(["A Bold  seven", ""])
    assert ids.shape == (2, MAX_TOKENS) and ids.dtype == torch.long
    assert bool((ids[1] == 0).all()) and int((ids[0] != 0).sum()) == 3
    with pytest.raises(ValueError, match="unknown word 'purple'"):
        tokenize(["a purple seven"])
    with pytest.raises(ValueError, match="at most"):
        tokenize(["a " * 9])


def test_export_load_round_trip_and_foreign_files(tmp_path: Path) -> None:
    model = _randomized(TINY)
    path = tmp_path / "m.safetensors"
    export_mmdit(model, path, command="test")
    loaded, meta = load_mmdit(path)
    assert meta["kind"] == "mmdit" and meta["command"] == "test"
    x, t, ids = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, ids), model(x, t, ids))
    dit = Path(__file__).parents[1] / "diffusion_ext" / "assets" / "dit_digits_ema.safetensors"
    with pytest.raises(ValueError, match="not a diffusion_ext mmdit export"):
        load_mmdit(dit)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"not a file at all")
    with pytest.raises(ValueError):
        load_mmdit(garbage)


def test_training_resumes_bit_for_bit(tmp_path: Path) -> None:
    from diffusion_ext.train_cond import TRAIN_PRESETS, train

    config = TRAIN_PRESETS["mmdit-smoke"]
    train(config, tmp_path / "a", progress=False)
    train(config, tmp_path / "b", progress=False, stop_after=3)
    assert not (tmp_path / "b" / "mmdit.safetensors").exists()
    train(config, tmp_path / "b", resume=True, progress=False)
    a, _ = load_mmdit(tmp_path / "a" / "mmdit.safetensors")
    b, _ = load_mmdit(tmp_path / "b" / "mmdit.safetensors")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    with pytest.raises(FileExistsError):
        train(config, tmp_path / "a", progress=False)


@pytest.mark.skipif(not ASSET.is_file(), reason="no committed MM-DiT checkpoint")
def test_committed_pipeline_samples_deterministically() -> None:
    pipe = load_mmdit_pipeline(ASSET)
    prompts = ["a bold seven slanted left", "a thin one"]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x = pipe.sample(prompts, steps=2, guidance=2.0, generator=gens)
    assert x.shape == (2, 1, 8, 8) and float(x.abs().max()) <= 1.0
    gens = [torch.Generator().manual_seed(1)]
    torch.testing.assert_close(pipe.sample(prompts[1:], 2, 2.0, gens), x[1:])


@pytest.mark.slow
@pytest.mark.skipif(not ASSET.is_file(), reason="no committed MM-DiT checkpoint")
def test_committed_checkpoint_meets_the_bars(tmp_path: Path) -> None:
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
    assert r["accuracy"] >= 0.95, r
    assert r["fd"] <= 2 * r["fd_floor"], r
    assert r["bold_gt_thin_classes"] >= 9, r
