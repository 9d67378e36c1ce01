"""Classifier guidance from the CLI (issue 21): the committed noise-aware classifier, its
training command, and the bar: guidance raises the unconditional model's class accuracy, as
judged by the quality gate's separately trained classifier (>= 0.9 in the slow test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusion_ext import noisy_classifier as nc_cli
from diffusion_ext import sample as sample_cli
from diffusion_ext.data import load_digits_split
from diffusion_ext.noisy_classifier import (
    DEFAULT_NOISY_CLASSIFIER,
    held_out_accuracy,
    load_noisy_classifier,
)
from diffusion_ext.pipeline import Pipeline
from diffusion_ext.quality import DEFAULT_CLASSIFIER, accuracy, load_classifier
from diffusion_ext.sample import DEFAULT_CHECKPOINT, class_grid
from diffusion_ext.schedules import get_process
from tests.test_diffusion_bad_input import one_line_error

# The README's classifier-guidance setting (diffusion_ext/README.md, "Classifier guidance").
README_SCALE = 32.0
README_STEPS = 32


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_the_committed_classifier_reads_noisy_digits() -> None:
    """Held-out digits (never trained on): near-perfect when clean, still informative when the
    noise is as large as the signal (RF t = 0.5), near chance when it is pure noise."""
    model, process_name = load_noisy_classifier(DEFAULT_NOISY_CLASSIFIER)
    process, split = get_process(process_name), load_digits_split(0)
    acc = {t: held_out_accuracy(model, process, split, t) for t in (0.0, 0.5, 0.95)}
    assert acc[0.0] >= 0.95 and acc[0.5] >= 0.5 and acc[0.95] <= 0.4, acc
    from diffusion_ext.checkpoint import read_metadata

    assert read_metadata(DEFAULT_NOISY_CLASSIFIER)["command"].startswith(
        "python -m diffusion_ext.noisy_classifier"
    )


def test_guidance_raises_the_unconditional_models_accuracy() -> None:
    """A quick version of the bar: 8 per class, 8 steps, judged by the gate's classifier."""
    pipe = Pipeline.from_pretrained(DEFAULT_CHECKPOINT, classifier=DEFAULT_NOISY_CLASSIFIER)
    judge = load_classifier(DEFAULT_CLASSIFIER)
    y = class_grid(10, 8)

    def acc(**kw: float) -> float:
        x = pipe(y, steps=8, generator=torch.Generator().manual_seed(0), **kw)
        return accuracy(judge, x, y)

    unguided, guided = acc(guidance=0.0), acc(classifier_guidance=README_SCALE)
    assert unguided < 0.3 and guided >= unguided + 0.4, (unguided, guided)


def test_sample_cli_classifier_guidance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cg.png"
    argv = ["--classifier-guidance", "2", "--per-class", "1", "--steps", "2", "--out", str(out)]
    assert sample_cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["classifier_guidance"] == 2.0 and printed["guidance_scale"] == 0.0
    assert out.stat().st_size > 0
    # Combined with classifier-free guidance when both are given.
    assert sample_cli.main([*argv, "--guidance-scale", "1.25"]) == 0
    assert json.loads(capsys.readouterr().out)["guidance_scale"] == 1.25


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--classifier-guidance", "nan"], "classifier_guidance must be a finite number"),
        (["--classifier-guidance=-1"], "classifier_guidance must be >= 0"),
        (["--classifier-guidance", "2", "--classifier", "/nonexistent.safetensors"], "no noise"),
        (["--eta", "0.5"], "eta is DDIM's parameter"),
        (["--sampler", "ddim", "--eta", "1.5"], "eta must be in [0, 1]"),
        (["--attention", "triton"], "triton backend needs"),
        (["--attention", "fast"], "unknown attention backend 'fast'"),
    ],
)
def test_sample_cli_new_flags_refuse_bad_input(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    message: str,
) -> None:
    if "triton" in flags and torch.cuda.is_available():
        pytest.skip("triton can run here")

    def refuse(*args: object) -> None:
        pytest.fail("the model loaded before the bad input was caught")

    monkeypatch.setattr(sample_cli, "load_dit", refuse)
    err = one_line_error(capsys, sample_cli.main, *flags, "--out", str(tmp_path / "s.png"))
    assert message in err


def test_sample_cli_refuses_a_garbage_classifier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    flags = [
        "--classifier-guidance",
        "2",
        "--classifier",
        str(bad),
        "--out",
        str(tmp_path / "s.png"),
    ]
    assert str(bad) in one_line_error(capsys, sample_cli.main, *flags)
    err = one_line_error(
        capsys, sample_cli.main, *flags[:2], "--classifier", str(DEFAULT_CLASSIFIER), *flags[4:]
    )
    assert "is not a noise-aware classifier" in err


def test_noisy_classifier_cli_trains_a_loadable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nc.safetensors"
    assert nc_cli.main(["--steps", "3", "--batch-size", "8", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and set(summary["held_out_accuracy"]) >= {"0", "0.5"}
    model, process = load_noisy_classifier(out)
    assert process == "rf" and model(torch.zeros(2, 1, 8, 8), torch.zeros(2)).shape == (2, 10)
    for flags, message in [
        (["--steps", "0"], "1 <= steps"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--process", "edm"], "unknown process"),
        (["--out", str(tmp_path / "x.txt")], "must end in .safetensors"),
    ]:
        assert message in one_line_error(capsys, nc_cli.main, *flags)


@pytest.mark.slow
def test_classifier_guidance_from_the_cli_meets_the_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's command and figure: the unconditional DiT with classifier guidance, 100
    samples per class, judged by the quality gate's classifier: accuracy >= 0.9."""
    captured: dict[str, torch.Tensor] = {}
    real_save = sample_cli.save_grid

    def keep(x: torch.Tensor, rows: int, path: Path) -> None:
        captured["x"] = x
        real_save(x, rows, path)

    monkeypatch.setattr(sample_cli, "save_grid", keep)
    argv = ["--classifier-guidance", str(README_SCALE), "--steps", str(README_STEPS)]
    assert sample_cli.main([*argv, "--per-class", "100", "--out", str(tmp_path / "s.png")]) == 0
    y = class_grid(10, 100)
    acc = accuracy(load_classifier(DEFAULT_CLASSIFIER), captured["x"], y)
    assert acc >= 0.9, acc


def test_shift_ensemble_averages_log_probs_over_shifts() -> None:
    from diffusion_ext.noisy_classifier import NoisyDigitClassifier, ShiftEnsemble

    torch.manual_seed(0)
    base = NoisyDigitClassifier().eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.0, 300.0, 900.0])
    got = ShiftEnsemble(base)(x, t)
    rolls = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]
    want = torch.stack(
        [torch.log_softmax(base(torch.roll(x, s, dims=(2, 3)), t), -1) for s in rolls]
    ).mean(0)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, torch.log_softmax(base(x, t), -1))  # not the plain network
