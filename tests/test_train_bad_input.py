"""`train-heads` on bad input (issue 22): one `medusa-engine: error:` line, exit code 2, no
traceback, nothing lost. Heads already in --out, --resume without its checkpoint, nonsense numbers,
a failed data load, a foreign checkpoint; Ctrl-C / SIGTERM save a checkpoint that resumes bit for
bit, and metrics.json describes the whole run; files get the usual permissions; the
self-distillation cache stays out of the current directory. stories260k, tiny data, a few steps.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from attention.state_files import atomic_write
from medusa_engine.cli import main
from medusa_engine.training import checkpoint, medusa, pipeline
from medusa_engine.training.config import TrainConfig, TrainInterrupted
from medusa_engine.training.data import encode_dataset, load_records

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / "data" / "train" / "tinystories_train_sample_2MiB.txt"
HEADS_FILES = ("config.json", "heads.safetensors", "metrics.json")


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> Path:
    """The first 40 TinyStories of the bundled sample, as a small .txt file."""
    docs = STORIES.read_text("utf-8").split("<|endoftext|>")[:40]
    path = tmp_path_factory.mktemp("data") / "stories.txt"
    path.write_text("<|endoftext|>".join(docs))
    return path


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train-heads", "--model", "stories260k", "--data", str(data), "--out", str(out),
            "--steps", "2", "--batch-size", "4", "--max-length", "48", "--num-heads", "2",
            "--precision", "fp32", "--eval-fraction", "0.1", *extra]  # fmt: skip


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the command in-process; assert exit 2 and one `medusa-engine: error:` line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("medusa-engine: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def succeeds(capsys, argv: list[str]) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_heads_in_out_are_replaced_only_with_overwrite_or_resume(stories, tmp_path, capsys):
    out = tmp_path / "heads"
    succeeds(capsys, train_argv(stories, out))
    before = snapshot(out)
    assert set(HEADS_FILES) <= set(before)
    err = one_line_error(capsys, train_argv(stories, out, "--seed", "1"))
    assert "already holds heads" in err and "--overwrite" in err
    assert snapshot(out) == before  # not a byte changed
    # Resuming into it (its checkpoint is there) continues that run: the same heads.
    succeeds(capsys, train_argv(stories, out, "--resume"))
    assert snapshot(out)["heads.safetensors"] == before["heads.safetensors"]
    succeeds(capsys, train_argv(stories, out, "--seed", "1", "--overwrite"))
    assert snapshot(out)["heads.safetensors"] != before["heads.safetensors"]


def test_resume_without_a_checkpoint_is_an_error_naming_it(stories, tmp_path, capsys):
    out = tmp_path / "new" / "heads"
    err = one_line_error(capsys, train_argv(stories, out, "--resume"))
    assert "no checkpoint" in err and str(out / "train_state.safetensors") in err
    assert not (tmp_path / "new").exists()
    elsewhere = tmp_path / "run" / "state.safetensors"
    err = one_line_error(
        capsys, train_argv(stories, out, "--resume", "--checkpoint", str(elsewhere))
    )
    assert str(elsewhere) in err


NONSENSE = [
    ("--steps", "-5"),
    ("--epochs", "0"),
    ("--lr", "0"),
    ("--lr", "-0.001"),
    ("--lr", "nan"),
    ("--lr", "inf"),
    ("--batch-size", "0"),
    ("--max-length", "2"),
    ("--num-heads", "0"),
    ("--num-layers", "-1"),
    ("--decay", "0"),
    ("--decay", "1.5"),
    ("--distill-weight", "-0.1"),
    ("--weight-decay", "-1"),
    ("--warmup-steps", "-1"),
    ("--grad-clip", "-1"),
    ("--loss-chunk", "0"),
    ("--checkpoint-every", "0"),
    ("--ffn-size", "0"),
    ("--draft-vocab", "-1"),
    ("--feature-weight", "nan"),
    ("--eval-fraction", "0"),
    ("--eval-fraction", "1"),
    ("--eval-fraction", "-0.1"),
    ("--max-examples", "-1"),
    ("--self-distill", "--distill-max-new-tokens", "0"),
    ("--self-distill", "--distill-batch-size", "0"),
    ("--self-distill", "--distill-temperature", "-1"),
    ("--self-distill", "--extra-distill-temperature", "nan"),
    ("--self-distill", "--prompt-tokens", "0"),
    ("--extra-distill-temperature", "0.7"),  # without --self-distill
    ("--self-distill", "--with-reference-answers"),  # without --kind recurrent
]


@pytest.mark.parametrize("flags", NONSENSE, ids=" ".join)
def test_nonsense_numbers_fail_before_any_work(stories, tmp_path, capsys, monkeypatch, flags):
    def no_work(*args):
        raise AssertionError("the run started")

    monkeypatch.setattr(pipeline, "train_heads", no_work)
    out = tmp_path / "heads"
    err = one_line_error(capsys, train_argv(stories, out, *flags))
    assert [f for f in flags if f.startswith("--")][-1] in err, err  # names the flag
    assert not out.exists()


def test_a_failed_data_load_leaves_no_empty_out_folder(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "Say hi.", "output": ')  # cut off
    for data, message in [(tmp_path / "missing.txt", "data file not found"), (bad, "cannot read")]:
        out = tmp_path / "runs" / "a" / "heads"
        assert message in one_line_error(capsys, train_argv(data, out))
        assert not (tmp_path / "runs").exists()
    existing = tmp_path / "mine"  # a folder that was there before stays
    existing.mkdir()
    one_line_error(capsys, train_argv(tmp_path / "missing.txt", existing))
    assert existing.is_dir()


def test_a_checkpoint_without_its_config_or_with_a_pickle_is_a_one_line_error(
    stories, tmp_path, capsys
):
    out = tmp_path / "heads"
    ckpt = out / "train_state.safetensors"
    checkpoint.save_checkpoint(ckpt, {"step": 3, "heads": {}})
    before = ckpt.read_bytes()
    assert "holds no training config" in one_line_error(
        capsys, train_argv(stories, out, "--resume")
    )
    assert ckpt.read_bytes() == before

    marker = tmp_path / "ran"

    class Payload:  # unpickling runs code: it writes `marker`
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    older = io.BytesIO()  # what older versions wrote: a torch.save pickle
    torch.save({"step": 1, "x": Payload()}, older)
    for payload in (older.getvalue(), pickle.dumps(Payload())):
        ckpt.write_bytes(payload)
        err = one_line_error(capsys, train_argv(stories, out, "--resume"))
        assert "not a train-heads checkpoint" in err
        assert not marker.exists() and ckpt.read_bytes() == payload


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_written_files_get_the_permissions_open_would_give(stories, tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.safetensors", lambda p: save_file({"x": torch.ones(2)}, str(p)))
        atomic_write(tmp_path / "b.json", lambda p: p.write_text("{}"))
        with open(tmp_path / "plain", "w"):
            pass
        out = tmp_path / "heads"
        succeeds(capsys, train_argv(stories, out))
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert (tmp_path / "plain").stat().st_mode & 0o777 == want
    files = [tmp_path / "a.safetensors", tmp_path / "b.json"]
    files += [out / name for name in (*HEADS_FILES, "train_state.safetensors")]
    for path in files:
        assert path.stat().st_mode & 0o777 == want, (path.name, oct(path.stat().st_mode))


def test_the_default_distill_cache_is_the_user_cache_not_the_cwd(tmp_path, capsys, monkeypatch):
    records = [{"instruction": f"Tell a story about a {w}.", "input": "", "output": "Once."}
               for w in ["cat", "dog", "bird", "fish", "frog", "bear", "duck", "cow", "pig", "fox"]]  # fmt: skip
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records))
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MEDUSA_ENGINE_CACHE", str(cache))
    argv = ["train-heads", "--model", "stories260k", "--data", str(data), "--self-distill",
            "--distill-max-new-tokens", "6", "--steps", "1", "--batch-size", "4",
            "--max-length", "48", "--num-heads", "2", "--precision", "fp32",
            "--eval-fraction", "0.2"]  # fmt: skip
    succeeds(capsys, [*argv, "--out", str(tmp_path / "h1")])
    assert list(cwd.iterdir()) == []
    (made,) = (cache / "self_distill").iterdir()
    assert made.name.startswith("stories260k-alpaca-") and (made / "meta.json").is_file()
    stamp = (made / "meta.json").stat().st_mtime_ns
    succeeds(capsys, [*argv, "--out", str(tmp_path / "h2")])  # the same settings: reused
    assert [made] == list((cache / "self_distill").iterdir())
    assert (made / "meta.json").stat().st_mtime_ns == stamp
    # Other settings get their own default cache instead of an error.
    succeeds(capsys, [*argv, "--out", str(tmp_path / "h3"), "--distill-max-new-tokens", "5"])
    assert len(list((cache / "self_distill").iterdir())) == 2
    # An explicit --distill-cache is used as given, relative to the cwd.
    succeeds(capsys, [*argv, "--out", str(tmp_path / "h4"), "--distill-cache", "mine"])
    assert [p.name for p in cwd.iterdir()] == ["mine"] and (cwd / "mine" / "meta.json").is_file()


def test_sigterm_saves_the_step_reached_and_resume_is_bit_exact(stories260k, stories, tmp_path):
    """In-process, through the library: the handler defers the signal to the end of the step."""
    examples = encode_dataset(stories260k.tokenizer, load_records(str(stories)), max_length=48)
    c = TrainConfig(num_heads=2, batch_size=4, max_length=48, precision="fp32", lr=1e-2, steps=8,
                    checkpoint_every=100)  # fmt: skip
    full = medusa.train(stories260k, examples, c, checkpoint_path=tmp_path / "a.safetensors")

    def terminate(step, loss, top1):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    ckpt = tmp_path / "b.safetensors"
    with pytest.raises(TrainInterrupted) as stop:
        medusa.train(stories260k, examples, c, checkpoint_path=ckpt, on_step=terminate)
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is gone again
    assert (stop.value.signum, stop.value.step) == (signal.SIGTERM, 3)
    assert checkpoint.load_checkpoint(ckpt)["step"] == 3  # not a multiple of checkpoint_every
    resumed = medusa.train(stories260k, examples, c, checkpoint_path=ckpt, resume=True)
    assert resumed.losses == full.losses[3:] and resumed.run_losses == full.losses
    assert resumed.resumed_from == [3] and resumed.run_wall_s > resumed.wall_s
    for (name, a), b in zip(full.heads.state_dict().items(), resumed.heads.state_dict().values()):
        assert torch.equal(a, b), name


def _progress(buffer: bytearray, total: int) -> int:
    steps = re.findall(rb"(\d+)/%d \[" % total, bytes(buffer))
    return int(steps[-1]) if steps else 0


def test_ctrl_c_saves_a_checkpoint_that_resumes_to_the_same_heads(stories, tmp_path, capsys):
    """The real command in a subprocess, interrupted a few steps in; then resumed to the end
    in-process; heads and metrics equal an uninterrupted run's."""
    total = 600  # ~4 s of training: the interrupt lands well before the end
    argv = [*train_argv(stories, tmp_path / "a"), "--steps", str(total), "--checkpoint-every",
            "100000", "--lr", "1e-2"]  # fmt: skip
    # Same intra-op thread count as this process (conftest: 1), so the sums are the same.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medusa_engine.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
        # Ctrl-C as in a terminal, even where this process was started with SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    err = bytearray()
    reader = threading.Thread(target=lambda: [err.extend(b) for b in iter(proc.stderr.read1, b"")])
    reader.start()
    deadline = time.monotonic() + 120
    while _progress(err, total) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=120)
    reader.join(timeout=10)
    text = err.decode(errors="replace")
    assert rc == 130, text
    assert "Traceback" not in text
    step = checkpoint.load_checkpoint(tmp_path / "a" / "train_state.safetensors")["step"]
    assert 3 <= step < total, text
    assert f"interrupted at step {step}" in text.splitlines()[-1]
    assert not (tmp_path / "a" / "heads.safetensors").exists()

    succeeds(capsys, [*argv, "--resume"])
    reference = [*train_argv(stories, tmp_path / "b"), "--steps", str(total), "--checkpoint-every",
                 "100000", "--lr", "1e-2"]  # fmt: skip
    succeeds(capsys, reference)
    got, want = (load_file(str(tmp_path / d / "heads.safetensors")) for d in ("a", "b"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    resumed, whole = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert resumed["resumed_from"] == [step] and whole["resumed_from"] == []
    assert resumed["steps"] == whole["steps"] == total
    for key in ("loss_first", "loss_last", "loss_last10_mean", "loss_curve", "heads"):
        assert resumed[key] == whole[key], key
    assert resumed["loss_curve"][-1][0] == total and len(resumed["loss_curve"]) <= 50
    assert resumed["wall_s"] > 0
