"""Bad input to the diffusion CLIs ends in one line and exit code 2, never a traceback, and loses
no work (issue 22): checkpoints that are garbage or carry a pickle payload, output paths that
cannot be written, non-finite or out-of-range numbers, interrupted training; a seeded fuzz test
over the sampling flags."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_ext import cli
from diffusion_ext import quality as quality_cli
from diffusion_ext import sample as sample_cli
from diffusion_ext import train as train_cli
from diffusion_ext.checkpoint import load_state, read_metadata, save_state
from diffusion_ext.config import MAX_PER_CLASS, MAX_SAMPLE_STEPS, SAMPLER_NAMES, TRAIN_PRESETS
from diffusion_ext.sample import DEFAULT_CHECKPOINT
from diffusion_ext.train import STATE_FILE, TrainingInterrupted, train

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--preset", "digits-smoke", "--steps", "6", "--checkpoint-every", "3", "--no-progress"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default outputs go to a cache folder of the test's own, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def one_line_error(
    capsys: pytest.CaptureFixture[str], main: Callable[[list[str]], int], *argv: str
) -> str:
    """Run a CLI's `main(argv)` in-process; assert exit 2 and one `<prog>: error:` line."""
    code = main(list(argv))
    err = capsys.readouterr().err
    prog = f"python -m {main.__module__}"
    assert code == 2, err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def run_module(module: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def refuse(what: str) -> Callable[..., NoReturn]:
    """A stand-in that fails the test if called: proves a check ran before `what`."""

    def fail(*args: object, **kwargs: object) -> NoReturn:
        pytest.fail(f"{what} started before the bad input was caught")

    return fail


# ---- 1. checkpoints carrying a pickle payload never run it ---------------------------------------


class _Payload:
    """Unpickling this touches `marker`: what a crafted checkpoint would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[Path], None], tuple[Path]]:
        return (Path.touch, (self.marker,))


def write_payload(path: Path, marker: Path) -> None:
    torch.save({"model": {"w": torch.zeros(2)}, "step": 1, "evil": _Payload(marker)}, path)


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Control: the crafted file does run code when unpickled the old way."""
    marker = tmp_path / "ran"
    write_payload(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("name", [STATE_FILE, "state.pt"])
def test_a_pickle_checkpoint_is_refused_and_its_payload_never_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    run_dir.mkdir()
    write_payload(run_dir / name, marker)
    err = one_line_error(capsys, train_cli.main, *SMOKE, "--resume", "--out-dir", str(run_dir))
    assert "pickle" in err and not marker.exists()
    if name == STATE_FILE:
        with pytest.raises(ValueError, match="pickles are never loaded"):
            load_state(run_dir / name)
    err = one_line_error(
        capsys,
        sample_cli.main,
        "--checkpoint",
        str(run_dir / name),
        "--out",
        str(tmp_path / "s.png"),
    )
    assert "is not a safetensors file" in err
    assert not marker.exists() and (run_dir / name).exists()  # refused, not deleted


# ---- 2. sample: garbage checkpoints, bad output paths --------------------------------------------


def garbage_checkpoints(tmp_path: Path) -> dict[str, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    good = DEFAULT_CHECKPOINT.read_bytes()
    (tmp_path / "random.safetensors").write_bytes(random.Random(0).randbytes(4096))
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "folder.safetensors").mkdir()
    meta = read_metadata(DEFAULT_CHECKPOINT)
    tensors = load_file(str(DEFAULT_CHECKPOINT))
    config = json.loads(meta["dit_config"])
    for name, change in {
        "huge": {"hidden_size": 1_000_008, "num_heads": 8},  # 10^12 floats if allocated
        "deep": {"depth": 10**9},
        "typo": {"hidden_sise": 96},
        "nan": {"mlp_ratio": float("nan")},
        "stringy": {"qk_norm": "yes"},
    }.items():
        bad = {**meta, "dit_config": json.dumps({**config, **change})}
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata=bad)
    save_file(tensors, str(tmp_path / "process.safetensors"), metadata={**meta, "process": "edm"})
    return {p.stem: p for p in tmp_path.glob("*.safetensors")} | {"missing": tmp_path / "none"}


def test_sample_refuses_garbage_checkpoints_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sample_cli, "generate", refuse("sampling"))
    out = tmp_path / "out" / "s.png"
    checkpoints = garbage_checkpoints(tmp_path)
    assert len(checkpoints) == 11
    for name, path in checkpoints.items():
        err = one_line_error(capsys, sample_cli.main, "--checkpoint", str(path), "--out", str(out))
        assert str(path) in err, name
        assert not out.exists()


def test_sample_checks_the_output_before_it_loads_or_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sample_cli, "load_dit", refuse("loading the model"))
    (tmp_path / "file").write_text("x")
    cases = {
        str(tmp_path / "x.txt"): "must end in .png",
        str(tmp_path / "noext"): "must end in .png",
        str(tmp_path / "file" / "x.png"): "is a file, not a folder",
        str(tmp_path / "file" / "deeper" / "x.png"): "is not writable",
    }
    (tmp_path / "dir.png").mkdir()
    cases[str(tmp_path / "dir.png")] = "is a folder"
    for out, message in cases.items():
        assert message in one_line_error(capsys, sample_cli.main, "--out", out), out


@pytest.mark.skipif(IS_ROOT, reason="root writes through read-only permissions")
def test_sample_refuses_a_read_only_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sample_cli, "load_dit", refuse("loading the model"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        err = one_line_error(capsys, sample_cli.main, "--out", str(locked / "x.png"))
    finally:
        locked.chmod(0o755)
    assert "is not writable" in err


# ---- 3. non-finite and out-of-range numbers ------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--guidance-scale", "nan"], "guidance_scale must be a finite number"),
        (["--guidance-scale", "inf"], "guidance_scale must be a finite number"),
        (["--guidance-scale=-inf"], "guidance_scale must be a finite number"),
        (["--guidance-scale", "1e400"], "guidance_scale must be a finite number"),
        (["--guidance-scale=-1"], "guidance_scale must be >= 0"),
        (["--steps", "0"], "1 <= steps"),
        (["--steps=-3"], "1 <= steps"),
        (["--steps", str(MAX_SAMPLE_STEPS + 1)], "steps <= "),
        (["--per-class", "0"], "per_class"),
        (["--per-class", str(MAX_PER_CLASS + 1)], "per_class <= "),
        (["--seed=-1"], "seed must be in"),
        (["--seed", str(2**70)], "seed must be in"),
        (["--threads", "0"], "--threads must be in"),
        (["--steps", "abc"], "invalid int value"),
        (["--sampler", "plms"], "unknown sampler"),
        (["--precision", "fp8"], "invalid choice"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_sample_refuses_nonsense_numbers_before_sampling(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    message: str,
) -> None:
    monkeypatch.setattr(sample_cli, "load_dit", refuse("loading the model"))
    out = tmp_path / "s.png"
    assert message in one_line_error(capsys, sample_cli.main, *flags, "--out", str(out))
    assert not out.exists()


def test_a_huge_finite_guidance_scale_is_an_error_not_a_blank_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.png"
    flags = ["--guidance-scale", "1e308", "--per-class", "1", "--steps", "2", "--out", str(out)]
    assert "non-finite values" in one_line_error(capsys, sample_cli.main, *flags)
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_the_real_command_prints_one_line() -> None:
    proc = run_module("diffusion_ext.sample", "--guidance-scale", "nan")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr == (
        "python -m diffusion_ext.sample: error: guidance_scale must be a finite number, got nan\n"
    )


# ---- 4. nothing is written under the current directory -------------------------------------------


def test_sample_writes_to_the_cache_by_default_never_the_cwd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert sample_cli.main(["--per-class", "1", "--steps", "1", "--sampler", "euler"]) == 0
    out = tmp_path / "cache" / "diffusion_ext" / "samples.png"
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    assert out.stat().st_size > 0 and list(cwd.iterdir()) == []
    for module in (train_cli, quality_cli):  # the other CLIs' defaults are not under cwd either
        for action in module.build_parser()._actions:
            default = action.default
            assert not (isinstance(default, Path) and not default.is_absolute()), action.dest


# ---- 5. train: bad numbers, outputs, checkpoints, interruption -----------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "steps, batch_size"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--lr", "inf"], "lr must be a finite number"),
        (["--weight-decay=-1"], "weight_decay >= 0"),
        (["--grad-clip", "0"], "grad_clip > 0"),
        (["--batch-size", str(10**9)], "batch_size must be <="),
        (["--seed=-1"], "seed must be in"),
        (["--threads", "100000"], "threads must be <="),
        (["--ema-decay", "1.5"], "ema_decay < 1"),
        (["--holdout-fraction", "nan"], "holdout_fraction must be a finite number"),
        (["--lr", "abc"], "invalid float value"),
        (["--stop-after", "0"], "stop_after must be >= 1"),
        (["--process", "edm"], "unknown process"),
    ],
)
def test_train_refuses_nonsense_numbers_before_training(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    message: str,
) -> None:
    monkeypatch.setattr(train_cli.TrainRun, "create", refuse("training"))
    err = one_line_error(capsys, train_cli.main, *SMOKE, "--out-dir", str(tmp_path), *flags)
    assert message in err


def test_train_checks_its_output_folder_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train_cli.TrainRun, "create", refuse("training"))
    (tmp_path / "file").write_text("x")
    for out_dir, message in {
        tmp_path / "file": "is a file, not a folder",
        tmp_path / "file" / "run": "is not writable",
    }.items():
        err = one_line_error(capsys, train_cli.main, *SMOKE, "--out-dir", str(out_dir))
        assert message in err
    if not IS_ROOT:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            err = one_line_error(capsys, train_cli.main, *SMOKE, "--out-dir", str(locked / "run"))
        finally:
            locked.chmod(0o755)
        assert "is not writable" in err


def test_train_resume_refuses_missing_and_garbage_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resume = [*SMOKE, "--resume", "--out-dir"]
    assert "no checkpoint at" in one_line_error(capsys, train_cli.main, *resume, str(tmp_path))
    for name, path in garbage_checkpoints(tmp_path / "g").items():
        if not path.is_file():
            continue
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / STATE_FILE).write_bytes(path.read_bytes())
        err = one_line_error(capsys, train_cli.main, *resume, str(run_dir))
        assert "cannot read training checkpoint" in err, name
        assert (run_dir / STATE_FILE).read_bytes() == path.read_bytes()  # left as it was


def test_train_never_overwrites_a_run_and_resume_checks_the_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert train_cli.main([*SMOKE, "--stop-after", "3", "--out-dir", str(run_dir)]) == 0
    capsys.readouterr()
    before = (run_dir / STATE_FILE).read_bytes()
    err = one_line_error(capsys, train_cli.main, *SMOKE, "--out-dir", str(run_dir))
    assert "pass --resume" in err and (run_dir / STATE_FILE).read_bytes() == before
    resume = [*SMOKE, "--resume", "--out-dir"]
    err = one_line_error(capsys, train_cli.main, "--lr", "0.5", *resume, str(run_dir))
    assert "different training config" in err
    # Well-formed files of this format whose contents do not fit the run: refused in one line.
    breakages: dict[str, Callable[[dict], None]] = {
        "no model": lambda s: s.update(model={}),
        "step": lambda s: s.update(step="3"),
        "step range": lambda s: s.update(step=10**6),
        "moment shape": lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)),
        "generator": lambda s: s.update(generator=torch.zeros(3)),
        "scaler": lambda s: s.update(scaler=None),
    }
    for name, breakage in breakages.items():
        state = load_state(run_dir / STATE_FILE)
        breakage(state)
        save_state(state, tmp_path / name / STATE_FILE)
        err = one_line_error(capsys, train_cli.main, *resume, str(tmp_path / name))
        assert "does not fit this run" in err, name


def test_a_stop_request_checkpoints_that_step_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    config = dataclasses.replace(TRAIN_PRESETS["digits-smoke"], steps=6, checkpoint_every=100)
    train(config, tmp_path / "straight", progress=False)
    asked = iter(range(100))
    with pytest.raises(TrainingInterrupted) as info:
        train(config, tmp_path / "split", progress=False, stop=lambda: next(asked) >= 2)
    assert info.value.step == 3 and load_state(tmp_path / "split" / STATE_FILE)["step"] == 3
    train(config, tmp_path / "split", resume=True, progress=False)
    a = load_state(tmp_path / "straight" / STATE_FILE)
    b = load_state(tmp_path / "split" / STATE_FILE)
    assert b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key


def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    flags = ["--preset", "digits-smoke", "--steps", "100000", "--checkpoint-every", "100000"]
    command = [sys.executable, "-m", "diffusion_ext.train", *flags, "--no-progress"]
    proc = subprocess.Popen(
        [*command, "--out-dir", str(run_dir)],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:  # wait until the loop runs: the handler is installed by then
        lines.append(line)
        if "training steps" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    stderr = "".join(lines) + rest
    assert proc.returncode == cli.EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("python -m diffusion_ext.train: interrupted: stopped at step "), stderr
    step = load_state(run_dir / STATE_FILE)["step"]
    assert f"step {step} of 100000" in last and step >= 1
    resume = [*flags, "--no-progress", "--resume", "--stop-after", str(step + 2)]
    assert train_cli.main([*resume, "--out-dir", str(run_dir)]) == 0
    assert load_state(run_dir / STATE_FILE)["step"] == step + 2


# ---- 5. quality ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--scales", "1,abc"], "'abc' is not a number"),
        (["--scales", ""], "'' is not a number"),
        (["--scales", "1,nan"], "finite and >= 0"),
        (["--scales", "-1"], "finite and >= 0"),
        (["--steps", "0"], "1 <= steps"),
        (["--per-class", "0"], "per_class"),
        (["--threads", "0"], "--threads must be in"),
        (["--data-seed=-1"], "--data-seed must be in"),
        (["--sampler", "plms"], "unknown sampler"),
        (["--seed", str(2**64)], "seed must be in"),
    ],
)
def test_quality_refuses_nonsense_numbers(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    message: str,
) -> None:
    monkeypatch.setattr(quality_cli, "load_dit", refuse("loading the model"))
    assert message in one_line_error(capsys, quality_cli.main, *flags)


def test_quality_refuses_garbage_files_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quality_cli, "load_digits_split", refuse("loading the data"))
    monkeypatch.setattr(quality_cli, "train_classifier", refuse("training the classifier"))
    garbage = garbage_checkpoints(tmp_path / "g")
    for name in ("random", "truncated", "missing", "huge"):
        err = one_line_error(capsys, quality_cli.main, "--checkpoint", str(garbage[name]))
        assert str(garbage[name]) in err
    for name in ("random", "truncated", "missing"):
        err = one_line_error(capsys, quality_cli.main, "--classifier", str(garbage[name]))
        assert str(garbage[name]) in err
    err = one_line_error(capsys, quality_cli.main, "--classifier", str(DEFAULT_CHECKPOINT))
    assert "not a digit classifier" in err
    (tmp_path / "file").write_text("x")
    for path, message in {
        tmp_path / "file" / "c.safetensors": "is a file, not a folder",
        tmp_path / "c.pt": "must end in .safetensors",
    }.items():
        flags = ["--train-classifier", "--classifier", str(path)]
        assert message in one_line_error(capsys, quality_cli.main, *flags)


# ---- fuzz ----------------------------------------------------------------------------------------

FLAG_VALUES = {
    "--sampler": [*SAMPLER_NAMES, "plms", "", "HEUN", "heun ", "1"],
    "--steps": ["1", "2", "32", "0", "-1", "10000", "10001", "1e3", "abc", "", " 3", "1_0"],
    "--guidance-scale": [
        "0",
        "1",
        "1.25",
        "-0.0",
        "-1",
        "nan",
        "inf",
        "-inf",
        "1e308",
        "1e400",
        "0x1p3",
        "abc",
        "",
        "1e-300",
    ],  # fmt: skip
    "--per-class": ["1", "10", "1000", "1001", "0", "-5", "1.5", "nan"],
    "--seed": ["0", "-1", str(2**63 - 1), str(2**63), str(2**80), "x"],
    "--precision": ["fp32", "bf16", "fp16", "fp8", ""],
    "--threads": ["1", "2", "0", "-1", "257", "abc"],
}


def test_fuzz_sampling_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seeded random flags through the real `main`: one clean error line, or a valid config
    (the stand-in for loading the model then stops it with a known line)."""

    def stop_here(path: Path) -> None:
        raise cli.UserError("config accepted (fuzz)")

    monkeypatch.setattr(sample_cli, "load_dit", stop_here)
    rng = random.Random(0)
    threads = torch.get_num_threads()
    accepted = 0
    try:
        for _ in range(200):
            argv = []
            for flag in rng.sample(sorted(FLAG_VALUES), rng.randint(1, 4)):
                argv.append(f"{flag}={rng.choice(FLAG_VALUES[flag])}")
            if rng.random() < 0.2:
                argv.append(rng.choice(["--clip-denoised", "--no-clip-denoised"]))
            err = one_line_error(capsys, sample_cli.main, *argv, "--out", str(tmp_path / "f.png"))
            if "config accepted (fuzz)" in err:
                accepted += 1
                config = sample_cli.config_from_args(sample_cli.build_parser().parse_args(argv))
                assert config.sampler in SAMPLER_NAMES and 1 <= config.steps <= MAX_SAMPLE_STEPS
                assert 0 <= config.guidance_scale < float("inf") and 0 <= config.seed < 2**63
    finally:
        torch.set_num_threads(threads)
    assert 20 <= accepted <= 180  # both sides were exercised
