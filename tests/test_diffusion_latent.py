"""Latent diffusion: training on VQ-VAE latents through train.train, the self-contained export,
the pipeline's sampling contract, the committed model's quality, and the CLI's bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from diffusion_ext import latent as latent_cli
from diffusion_ext import quality
from diffusion_ext.checkpoint import read_metadata
from diffusion_ext.config import TrainConfig
from diffusion_ext.data import load_digits_split
from diffusion_ext.latent import (
    DEFAULT_CHECKPOINT,
    EXPORT_FILE,
    KIND,
    encode_split,
    guidance_rows,
    load_latent_pipeline,
    train_latent,
)
from diffusion_ext.sample import DEFAULT_CHECKPOINT as PIXEL_CHECKPOINT
from diffusion_ext.sample import class_grid
from diffusion_ext.vqvae import VQTrainConfig, VQVAEConfig, train_vqvae

TINY_VQ = VQVAEConfig(hidden=8, code_dim=4, codebook_size=8)
SMOKE = TrainConfig(
    model="latent-digits",
    steps=4,
    batch_size=16,
    checkpoint_every=2,
    warmup_steps=1,
    ema_warmup_steps=1,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step latent DiT on a 4-step VQ-VAE (`vq/vqvae.safetensors`, `latent/`)."""
    root = tmp_path_factory.mktemp("latent")
    train_vqvae(TINY_VQ, VQTrainConfig(steps=4, batch_size=16), root / "vq", progress=False)
    train_latent(SMOKE, root / "vq" / "vqvae.safetensors", root / "latent", progress=False)
    return root


def test_latents_are_standardised_and_decode_back() -> None:
    pipe = load_latent_pipeline(DEFAULT_CHECKPOINT)
    split = load_digits_split(0)
    latents, stats = encode_split(pipe.vqvae, split)
    assert latents.x_train_NCHW.shape == (1617, 4, 4, 4)
    assert float(latents.x_train_NCHW.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(latents.x_train_NCHW.std()) == pytest.approx(1.0, abs=1e-5)
    assert stats.shift == pytest.approx(pipe.stats.shift) and stats.scale == pipe.stats.scale
    z_e = latents.x_test_NCHW * stats.scale + stats.shift
    with torch.no_grad():
        x_hat = pipe.vqvae.decode(z_e)
    assert float(((x_hat - split.x_test_NCHW) ** 2).mean()) <= 0.05


def test_export_is_one_self_contained_file(tiny_run: Path) -> None:
    path = tiny_run / "latent" / EXPORT_FILE
    meta = read_metadata(path)
    assert meta["kind"] == KIND == "latent-dit" and meta["process"] == "rf"
    pipe = load_latent_pipeline(path)
    assert pipe.dit.config.in_channels == TINY_VQ.code_dim and pipe.vqvae.config == TINY_VQ
    y = torch.tensor([0, 3, 9, 10])  # 10: the null class (unconditional)
    a = pipe.sample(y, 3, 1.25, torch.Generator().manual_seed(5))
    b = pipe.sample(y, 3, 1.25, torch.Generator().manual_seed(5))
    c = pipe.sample(y, 3, 1.25, torch.Generator().manual_seed(6))
    assert a.shape == (4, 1, 8, 8) and a.dtype == torch.float32
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_shared_pipeline_loads_the_kind_and_samples_the_same(tiny_run: Path) -> None:
    from diffusion_ext.pipeline import Pipeline

    path = tiny_run / "latent" / EXPORT_FILE
    pipe = Pipeline.from_pretrained(path)
    assert pipe.components.kind == KIND and pipe.components.sample_shape == (4, 4, 4)
    labels = [0, 5, 9]
    got = pipe(labels, steps=3, guidance=1.25, generator=torch.Generator().manual_seed(7))
    ours = load_latent_pipeline(path).sample(
        torch.tensor(labels), 3, 1.25, torch.Generator().manual_seed(7)
    )
    assert torch.equal(got, ours)
    committed = Pipeline.from_pretrained(DEFAULT_CHECKPOINT).components
    x, t = (
        torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0)),
        torch.full((3,), 0.5),
    )
    y = torch.tensor(labels)
    with torch.no_grad():
        x0_uncond, _ = committed.make_denoiser(y, 0.0, None)(x, t)
        x0_null, _ = committed.make_denoiser(torch.full_like(y, 10), 1.25, None)(x, t)
        x0_cond, _ = committed.make_denoiser(y, 1.0, None)(x, t)
    torch.testing.assert_close(x0_uncond, x0_null)  # w = 0: the null-class model
    assert float((x0_cond - x0_uncond).abs().max()) > 0.1


def test_pipeline_rejects_bad_arguments(tiny_run: Path) -> None:
    pipe = load_latent_pipeline(tiny_run / "latent" / EXPORT_FILE)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="int64 labels"):
        pipe.sample(torch.tensor([1.0]), 2, 1.0, gen)
    with pytest.raises(ValueError, match="labels must be in"):
        pipe.sample(torch.tensor([11]), 2, 1.0, gen)
    with pytest.raises(ValueError, match="finite"):
        pipe.sample(torch.tensor([1]), 2, float("nan"), gen)
    with pytest.raises(ValueError, match="steps"):
        pipe.sample(torch.tensor([1]), 0, 1.0, gen)


def test_resume_refuses_latents_of_another_vqvae(tiny_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "vq2"
    train_vqvae(TINY_VQ, VQTrainConfig(steps=2, batch_size=16, seed=1), other, progress=False)
    with pytest.raises(ValueError, match="another VQ-VAE"):
        train_latent(SMOKE, other / "vqvae.safetensors", tiny_run / "latent", resume=True)
    with pytest.raises(FileExistsError):
        train_latent(SMOKE, tiny_run / "vq" / "vqvae.safetensors", tiny_run / "latent")
    wide = dataclasses.replace(TINY_VQ, code_dim=3)
    train_vqvae(wide, VQTrainConfig(steps=1, batch_size=16), tmp_path / "vq3", progress=False)
    with pytest.raises(ValueError, match="4x4 latents"):
        train_latent(SMOKE, tmp_path / "vq3" / "vqvae.safetensors", tmp_path / "run")


def test_loader_refuses_foreign_files(tiny_run: Path) -> None:
    with pytest.raises(ValueError, match="not a latent-DiT export"):
        load_latent_pipeline(PIXEL_CHECKPOINT)
    with pytest.raises(ValueError, match="not a latent-DiT export"):
        load_latent_pipeline(tiny_run / "vq" / "vqvae.safetensors")
    with pytest.raises(FileNotFoundError):
        load_latent_pipeline(tiny_run / "missing.safetensors")


def test_committed_latent_model_draws_the_requested_digits() -> None:
    """A quick version of the gate (10 per class); the full one is the slow test below."""
    pipe = load_latent_pipeline(DEFAULT_CHECKPOINT)
    classifier = quality.load_classifier(quality.DEFAULT_CLASSIFIER)
    y = class_grid(10, 10)
    x = pipe.sample(y, 16, 1.25, torch.Generator().manual_seed(1))
    assert quality.accuracy(classifier, x, y) >= 0.9


@pytest.mark.slow
def test_committed_latent_model_passes_the_quality_gate() -> None:
    pipe = load_latent_pipeline(DEFAULT_CHECKPOINT)
    classifier = quality.load_classifier(quality.DEFAULT_CLASSIFIER)
    split = load_digits_split(0)
    floor = quality.frechet_distance(
        quality.features(classifier, split.x_train_NCHW),
        quality.features(classifier, split.x_test_NCHW),
    )
    (row,) = guidance_rows(pipe, classifier, split, [1.25], per_class=100, steps=16, seed=0)
    assert row["accuracy"] >= 0.9, row
    assert row["fd"] <= 3 * floor, (row, floor)


def test_sample_cli_writes_a_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "grid.png"
    argv = ["sample", "--out", str(out), "--per-class", "2", "--steps", "2"]
    assert latent_cli.main(argv) == 0
    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.shape[:2] == (4 * (10 * 9 + 1), 4 * (2 * 9 + 1))  # 10 rows of 2, 4x upscaled
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sample", "--out", "x.jpg"], "must end in .png"),
        (["sample", "--guidance-scale", "nan"], "finite"),
        (["sample", "--steps", "0"], "steps"),
        (["sample", "--sampler", "nope"], "unknown sampler"),
        (["sample", "--checkpoint", "missing.safetensors"], "no latent-DiT checkpoint"),
        (["quality", "--checkpoint", str(PIXEL_CHECKPOINT)], "not a latent-DiT export"),
        (["quality", "--scales", "1,x"], "not a number"),
        (["train", "--steps", "0"], "steps"),
        (["train", "--vqvae", str(PIXEL_CHECKPOINT)], "not a diffusion_ext VQ-VAE"),
        (["train", "--export", "x.pt"], "must end in .safetensors"),
        (["bogus"], "invalid choice"),
    ],
)
def test_cli_bad_input_is_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code = latent_cli.main([*argv, "--no-progress"] if argv[0] == "train" else argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert err.startswith("python -m diffusion_ext.latent: error: ")
