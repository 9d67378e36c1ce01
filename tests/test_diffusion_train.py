"""Training loop (precision, EMA, atomic checkpoints, resume), CLIs, and the committed model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from diffusion_ext import sample as sample_cli
from diffusion_ext import train as train_cli
from diffusion_ext.checkpoint import load_dit, load_state
from diffusion_ext.config import TRAIN_PRESETS, SampleConfig, TrainConfig
from diffusion_ext.data import load_digits_split
from diffusion_ext.quality import DEFAULT_CLASSIFIER, accuracy, load_classifier
from diffusion_ext.sample import DEFAULT_CHECKPOINT, class_grid, generate
from diffusion_ext.train import STATE_FILE, ema_decay_at, lr_at, train

SMOKE = dataclasses.replace(
    TRAIN_PRESETS["digits-smoke"], steps=8, checkpoint_every=4, ema_warmup_steps=2
)


def test_split_is_fixed_stratified_and_scaled() -> None:
    split = load_digits_split(0)
    assert split.x_test_NCHW.shape == (180, 1, 8, 8) and split.x_train_NCHW.shape == (1617, 1, 8, 8)
    assert float(split.x_train_NCHW.min()) == -1.0 and float(split.x_train_NCHW.max()) == 1.0
    assert torch.equal(split.y_test_N, load_digits_split(0).y_test_N)
    assert torch.bincount(split.y_test_N).min() >= 17  # stratified: every class held out


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_steps_checkpoint_and_export(tmp_path: Path, precision: str) -> None:
    config = dataclasses.replace(SMOKE, precision=precision)
    summary = train(config, tmp_path, progress=False)
    assert summary["steps"] == 8 and torch.isfinite(torch.tensor(summary["final_loss_ema"]))
    state = load_state(tmp_path / STATE_FILE)
    assert state["step"] == 8 and not list(tmp_path.glob(".*.tmp"))  # no stray temporary files
    if precision == "fp16":
        assert state["scaler"]["scale"] > 1.0
    model, process = load_dit(tmp_path / "ema.safetensors")
    assert process == config.process
    ema_w = model.final.linear.weight
    assert torch.equal(ema_w, state["ema"]["final.linear.weight"])
    assert not torch.equal(
        state["ema"]["final.linear.weight"], state["model"]["final.linear.weight"]
    )


def test_resume_continues_bit_for_bit(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(SMOKE, straight, progress=False)
    train(SMOKE, split, progress=False, stop_after=4)  # "preempted" after its step-4 checkpoint
    assert load_state(split / STATE_FILE)["step"] == 4
    assert not (split / "ema.safetensors").exists()
    train(SMOKE, split, resume=True, progress=False)
    a, b = load_state(straight / STATE_FILE), load_state(split / STATE_FILE)
    assert b["step"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    assert torch.equal(a["generator"], b["generator"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]  # tuples survive JSON
    for i, moments in a["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, b["optimizer"]["state"][i][name]), (i, name)
    with pytest.raises(ValueError, match="different training config"):
        train(dataclasses.replace(SMOKE, lr=0.5), split, resume=True, progress=False)


def test_schedules() -> None:
    config = TrainConfig(steps=1000, warmup_steps=100, lr=1e-3, ema_warmup_steps=50, ema_decay=0.99)
    assert lr_at(0, config) == pytest.approx(1e-5) and lr_at(99, config) == pytest.approx(1e-3)
    assert lr_at(1000, config) == pytest.approx(1e-4)
    assert ema_decay_at(10, config) == 0.0
    assert 0 < ema_decay_at(60, config) < 0.99 and ema_decay_at(2000, config) == 0.99


def test_clis_reject_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_cli.main(["--steps", "0", "--out-dir", str(tmp_path), "--no-progress"]) == 2
    assert "error: steps, batch_size" in capsys.readouterr().err
    assert train_cli.main(["--resume", "--out-dir", str(tmp_path / "none"), "--no-progress"]) == 2
    assert sample_cli.main(["--sampler", "plms", "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown sampler 'plms'" in capsys.readouterr().err
    missing = str(tmp_path / "missing.safetensors")
    assert sample_cli.main(["--checkpoint", missing, "--out", str(tmp_path / "x.png")]) == 2
    with pytest.raises(ValueError, match="unknown process"):
        TrainConfig(process="edm")


def test_committed_checkpoint_is_small_and_samples_the_right_digits(tmp_path: Path) -> None:
    assert DEFAULT_CHECKPOINT.stat().st_size < 2 * 2**20
    model, process = load_dit(DEFAULT_CHECKPOINT)
    classifier = load_classifier(DEFAULT_CLASSIFIER)
    y = class_grid(10, 4)
    config = SampleConfig(
        sampler="rf-euler" if process == "rf" else "ddim", steps=12, guidance_scale=2.0
    )
    with torch.no_grad():
        x = generate(model, process, y, config)
    acc = accuracy(classifier, x, y)
    assert acc >= 0.9, f"guided sample accuracy {acc:.3f}"
    assert (
        sample_cli.main(["--per-class", "2", "--steps", "4", "--out", str(tmp_path / "g.png")]) == 0
    )
    assert (tmp_path / "g.png").stat().st_size > 0


@pytest.mark.slow
def test_quality_gate_at_guidance_1_25() -> None:
    """The README's bar: accuracy >= 0.95 and FD within 2x of the train-vs-held-out floor."""
    from diffusion_ext.quality import features, frechet_distance, guidance_sweep

    split = load_digits_split(0)
    classifier = load_classifier(DEFAULT_CLASSIFIER)
    model, process = load_dit(DEFAULT_CHECKPOINT)
    floor = frechet_distance(
        features(classifier, split.x_train_NCHW), features(classifier, split.x_test_NCHW)
    )
    base = SampleConfig(sampler="heun", steps=16, per_class=100, seed=0)
    (row,) = guidance_sweep(model, process, classifier, split, [1.25], base)
    assert row["accuracy"] >= 0.95 and row["fd"] <= 2 * floor, (row, floor)
