"""`diffusion_ext.pipeline`: loading by kind, the call's contract, the plug-in table, the
committed mmdit and controlnet checkpoints through it (bit-identical to their own pipelines), the
CLI on top of it (attention backends, progress callback, every kind)."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusion_ext import pipeline as pl
from diffusion_ext.checkpoint import export_ema, load_dit
from diffusion_ext.config import DIT_PRESETS
from diffusion_ext.dit import DiT
from diffusion_ext.guidance import clip_denoised, model_denoiser
from diffusion_ext.pipeline import Components, LoadOptions, Pipeline
from diffusion_ext.sample import DEFAULT_CHECKPOINT
from diffusion_ext.samplers import sample
from diffusion_ext.schedules import get_process

ASSETS = Path(__file__).parents[1] / "diffusion_ext" / "assets"
MMDIT = ASSETS / "mmdit_digits.safetensors"
CONTROLNET = ASSETS / "controlnet_digits.safetensors"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-block digits DiT exported like the committed one (no `kind`: class-dit)."""
    torch.manual_seed(0)
    model = DiT(dataclasses.replace(DIT_PRESETS["tiny-digits"], depth=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    export_ema(model.eval(), model.config, "rf", path)
    return path


def test_class_dit_pipeline_is_the_hand_built_sampler(tiny_checkpoint: Path) -> None:
    """Same noise, denoiser, clipping and sampler as wiring them by hand: bit-identical."""
    pipe = Pipeline.from_pretrained(tiny_checkpoint)
    assert pipe.components.kind == "class-dit" and pipe.components.sample_shape == (1, 8, 8)
    y = torch.tensor([3, 7, 0])
    got = pipe(y.tolist(), steps=3, guidance=2.0, generator=torch.Generator().manual_seed(4))
    model = load_dit(tiny_checkpoint)[0]
    process = get_process("rf")
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(3, 1, 8, 8, generator=g)
    den = model_denoiser(model, process, y, null_class=model.null_class, guidance_scale=2.0)
    want = sample("heun", clip_denoised(den, process), process, noise, 3, g).clamp(-1, 1)
    assert got.shape == (3, 1, 8, 8) and got.dtype == torch.float32
    assert torch.equal(got, want)


def test_pipeline_is_deterministic_given_the_generator(tiny_checkpoint: Path) -> None:
    pipe = Pipeline.from_pretrained(tiny_checkpoint)

    def run(seed: int) -> torch.Tensor:
        return pipe([1, 2], steps=2, sampler="ddpm", generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    assert pipe(5, steps=1).shape == (1, 1, 8, 8)  # one int label
    assert float(run(0).abs().max()) <= 1.0


def test_callback_runs_once_per_model_call(tiny_checkpoint: Path) -> None:
    pipe = Pipeline.from_pretrained(tiny_checkpoint)
    calls: list[str] = []
    for sampler, steps in [("heun", 4), ("euler-maruyama", 3), ("ddim", 2)]:
        calls.clear()
        pipe([0, 9], steps=steps, sampler=sampler, callback=lambda: calls.append("call"))
        assert len(calls) == pipe.model_calls(sampler, steps) == (7 if sampler == "heun" else steps)


def test_attention_backends_agree_and_bad_ones_are_clear_errors(tiny_checkpoint: Path) -> None:
    def run(backend: str) -> torch.Tensor:
        pipe = Pipeline.from_pretrained(tiny_checkpoint, attention=backend)
        return pipe([2, 4], steps=2, guidance=1.5, generator=torch.Generator().manual_seed(0))

    sdpa, ref = run("sdpa"), run("reference")
    torch.testing.assert_close(ref, sdpa, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        Pipeline.from_pretrained(tiny_checkpoint, attention="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="triton backend needs"):
            Pipeline.from_pretrained(tiny_checkpoint, attention="triton")


def test_bad_calls_are_one_line_value_errors(tiny_checkpoint: Path) -> None:
    pipe = Pipeline.from_pretrained(tiny_checkpoint)
    cases = {
        "labels must be in": lambda: pipe([3, 10], steps=1),
        "takes class labels, not prompts": lambda: pipe("a bold seven", steps=1),
        "takes no control": lambda: pipe([1], steps=1, control=torch.zeros(1, 1, 8, 8)),
        "guidance_scale must be a finite": lambda: pipe([1], steps=1, guidance=float("nan")),
        "1 <= steps": lambda: pipe([1], steps=0),
        "unknown sampler": lambda: pipe([1], sampler="plms"),
        "eta is DDIM's parameter": lambda: pipe([1], steps=1, eta=0.5),
        "needs a noise-aware classifier": lambda: pipe([1], steps=1, classifier_guidance=2.0),
        "non-empty list of int labels": lambda: pipe([], steps=1),
        "non-finite values": lambda: pipe([1], steps=2, guidance=1e308),  # clipping would hide it
    }
    for message, call in cases.items():
        with pytest.raises(ValueError, match=message):
            call()


def test_missing_and_foreign_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        Pipeline.from_pretrained(tmp_path / "none.safetensors")
    with pytest.raises(FileNotFoundError, match="without pipeline.json"):
        Pipeline.from_pretrained(tmp_path)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no kind in its metadata"):
        Pipeline.from_pretrained(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "odd.safetensors"), metadata={"kind": "gan"})
    with pytest.raises(ValueError, match="unknown checkpoint kind 'gan'"):
        Pipeline.from_pretrained(tmp_path / "odd.safetensors")
    with pytest.raises(ValueError, match="unknown precision"):
        Pipeline.from_pretrained(DEFAULT_CHECKPOINT, precision="fp8")


# ---- the committed kinds through the pipeline ---------------------------------------------------


def _generators(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(10 + i) for i in range(n)]


def test_mmdit_through_the_pipeline_is_its_own_pipeline() -> None:
    from diffusion_ext.mmdit import load_mmdit_pipeline

    pipe = Pipeline.from_pretrained(MMDIT)
    c = pipe.components
    assert (c.kind, c.conditioning, c.default_guidance) == ("mmdit", "prompts", 1.0)
    prompts = ["a bold seven slanted left", "a thin one"]
    got = {}
    for guidance in (None, 2.0):  # None: the kind's default, 1.0
        got[guidance] = pipe(prompts, steps=2, guidance=guidance, generator=_generators(2))
        want = load_mmdit_pipeline(MMDIT).sample(prompts, 2, guidance or 1.0, _generators(2))
        assert torch.equal(got[guidance], want), guidance
    ref = Pipeline.from_pretrained(MMDIT, attention="reference")
    assert ref.components.kind == "mmdit"
    got_ref = ref(prompts, steps=2, generator=_generators(2))
    torch.testing.assert_close(got_ref, got[None], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="takes prompts"):
        pipe([7], steps=1)
    with pytest.raises(ValueError, match="unknown word 'purple'"):
        pipe("a purple seven", steps=1)


def test_controlnet_through_the_pipeline_is_its_own_pipeline() -> None:
    from diffusion_ext.controlnet import load_controlnet_pipeline, sobel_edges
    from diffusion_ext.data import load_digits_split

    pipe = Pipeline.from_pretrained(CONTROLNET)
    c = pipe.components
    assert (c.kind, c.takes_control, c.default_guidance) == ("controlnet", True, 1.25)
    split = load_digits_split()
    labels, control = split.y_test_N[:2], sobel_edges(split.x_test_NCHW[:2])
    got = pipe(labels.tolist(), steps=2, control=control, generator=_generators(2))
    want = load_controlnet_pipeline(CONTROLNET).sample(labels, control, 2, 1.25, _generators(2))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="needs a control map") as err:
        pipe(labels.tolist(), steps=2)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="control has"):
        pipe(labels.tolist(), steps=2, control=control[:, :, :4])


# ---- the plug-in contract, with a toy kind ---------------------------------------------------


def load_toy(path: Path, options: LoadOptions) -> Components:
    """A prompt-conditioned, controlled, latent kind: latents [B, 2, 2, 2] -> images by a fixed
    upsampling; the exact Gaussian denoiser N(mu, 0.1) with mu from the prompt's length."""
    meta = json.loads((path / pl.PIPELINE_INDEX).read_text()) if path.is_dir() else {}
    process = get_process("rf")
    seen: dict[str, object] = {}

    def make_denoiser(conditions, guidance, control):  # type: ignore[no-untyped-def]
        seen.update(conditions=conditions, guidance=guidance, control=control)
        mu = torch.tensor([len(p) / 20 for p in conditions])[:, None, None, None]

        def denoise(x: torch.Tensor, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            alpha, sigma = (v.float()[:, None, None, None] for v in process.alpha_sigma(t_B))
            den = alpha**2 * 0.1 + sigma**2
            return mu + alpha * 0.1 / den * (x - alpha * mu), sigma / den * (x - alpha * mu)

        return denoise

    def decode(z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(z[:, :1], scale_factor=4)

    return Components(
        kind="toy",
        process_name="rf",
        sample_shape=(2, 2, 2),
        make_denoiser=make_denoiser,
        conditioning="prompts",
        default_guidance=float(meta.get("guidance", 3.0)),
        takes_control=True,
        decode=decode,
        x0_range=None,
        metadata={"seen": seen},  # type: ignore[dict-item]
    )


def test_a_new_kind_plugs_in_through_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(pl.KIND_LOADERS, "toy", f"{__name__}:load_toy")
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / pl.PIPELINE_INDEX).write_text(json.dumps({"kind": "toy", "guidance": 4.5}))
    pipe = Pipeline.from_pretrained(folder)
    control = torch.ones(2, 1, 8, 8)
    images = pipe(["a seven", "a bold seven slanted left"], steps=4, control=control)
    seen = pipe.components.metadata["seen"]
    assert seen["conditions"] == ["a seven", "a bold seven slanted left"]  # type: ignore[index]
    assert seen["guidance"] == 4.5  # the kind's default  # type: ignore[index]
    assert torch.equal(seen["control"], control)  # type: ignore[index]
    assert images.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="takes prompts"):
        pipe([1, 2], steps=1)
    # A file recording the kind works the same; a kind whose module lacks the loader is named.
    save_file({"w": torch.zeros(1)}, str(tmp_path / "toy.safetensors"), metadata={"kind": "toy"})
    assert Pipeline.from_pretrained(tmp_path / "toy.safetensors").components.kind == "toy"
    monkeypatch.setitem(pl.KIND_LOADERS, "toy", f"{__name__}:no_such_loader")
    with pytest.raises(ValueError, match="kind 'toy' is not wired"):
        Pipeline.from_pretrained(folder)


def test_grid_image_layout() -> None:
    x = -torch.ones(6, 1, 8, 8)
    x[4] = 1.0  # row 1, column 1 is all ink
    canvas = pl.grid_image(x, rows=2, upscale=1)
    assert canvas.shape == (2 * 9 + 1, 3 * 9 + 1)
    assert canvas[10:18, 10:18].min() == 1.0 and canvas[1:9, 1:9].max() == 0.0
    with pytest.raises(ValueError, match="full rows"):
        pl.grid_image(x, rows=4)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_sample_cli_progress_bar_counts_model_calls_on_a_terminal_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffusion_ext import sample as sample_cli

    argv = ["--per-class", "1", "--steps", "3", "--out", str(tmp_path / "s.png")]
    assert sample_cli.main(argv) == 0  # stderr captured by pytest: not a terminal, no bar
    assert capsys.readouterr().err == ""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert sample_cli.main(argv) == 0
    assert "sample: 100%" in terminal.getvalue() and "5/5" in terminal.getvalue()  # Heun: 2N - 1
    terminal.truncate(0)
    assert sample_cli.main([*argv, "--no-progress"]) == 0
    assert terminal.getvalue().strip("\x00") == ""


def test_sample_cli_dispatches_every_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m diffusion_ext.sample --checkpoint X` for the prompt and the control kinds:
    rows of prompts / of held-out edge maps, the kind's own default guidance."""
    from diffusion_ext import sample as sample_cli

    flags = ["--per-class", "1", "--steps", "1", "--no-progress"]
    for asset, guidance in ((MMDIT, 1.0), (CONTROLNET, 1.25)):
        out = tmp_path / f"{asset.stem}.png"
        assert sample_cli.main(["--checkpoint", str(asset), "--out", str(out), *flags]) == 0
        result = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert out.is_file() and result["guidance_scale"] == guidance, result
    prompts = ["--prompts", "a thin one;a bold eight"]
    assert sample_cli.main(["--checkpoint", str(MMDIT), "--out", str(out), *prompts, *flags]) == 0
