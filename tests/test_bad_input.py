"""Bad input ends in one line and exit code 2, never a traceback, and loses nothing (issue 22):
the engine's commands, heads folders, tree specs and sampling flags, with a seeded fuzz test."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from medusa_engine import models, tune
from medusa_engine.cli import main
from medusa_engine.config import EngineConfig, HeadsConfig, HeadsError, SamplingConfig
from medusa_engine.heads import MedusaHeads
from medusa_engine.heads_io import load_heads, save_heads
from medusa_engine.tree import InvalidTreeError
from medusa_engine.tree_spec import parse_tree

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(capsys, *argv: str) -> str:
    """Run the command in-process; assert exit 2 and one `medusa-engine: error:` line."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("medusa-engine: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def run_cli(*argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medusa_engine.cli", *argv],
        input=stdin,
        capture_output=True,
        timeout=300,
        cwd=ROOT,
    )


# ---- heads folders ------------------------------------------------------------------------------


def test_a_huge_heads_config_is_refused_before_anything_is_allocated(tmp_path):
    save_heads(MedusaHeads(HeadsConfig(2, 1, 64, 512)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(hidden_size=200_000, vocab_size=49_152)  # 2 x 200k x 200k floats: 320 GB
    (tmp_path / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(HeadsError, match="config says"):
        load_heads(tmp_path)
    assert time.perf_counter() - start < 5


def test_published_heads_without_their_layer_count_load(tmp_path):
    state = {
        f"{k}.{j}.{part}": torch.randn(64, 64) if part.endswith("weight") else torch.randn(64)
        for k in range(2)
        for j in range(1)
        for part in ("linear.weight", "linear.bias")
    }
    state |= {f"{k}.1.weight": torch.randn(512, 64) for k in range(2)}
    save_file(state, str(tmp_path / "medusa_lm_head.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2}))  # no num_layers
    heads = load_heads(tmp_path)
    assert heads.config.num_layers == 1 and heads.config.num_heads == 2


def test_trees_wider_than_the_heads_vocabulary_are_one_line_errors(capsys):
    wide = json.dumps([[r] for r in range(10_000)])
    err = one_line_error(
        capsys, "generate", "--model", "stories260k", "--prompt", "hi", "--tree", wide
    )
    assert "the heads score 512 tokens" in err
    err = one_line_error(
        capsys, "generate", "--model", "stories260k", "--prompt", "hi", "--tree", "dynamic:600:600"
    )
    assert "top 600 drafts" in err


# ---- flags --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "nan"], "temperature must be a finite"),
        (["--temperature", "inf"], "temperature must be a finite"),
        (["--top-p", "nan"], "top_p must be in"),
        (["--lookup", "100000"], "--lookup must be in [0, 256]"),
        (["--tree", "[[true]]"], "not an integer"),
        (["--tree", "[[0], [0, 0"], "not valid JSON"),
    ],
)
def test_nonsense_flags_are_refused(capsys, flags, message):
    err = one_line_error(capsys, "generate", "--model", "stories260k", "--prompt", "hi", *flags)
    assert message in err


def test_tune_tree_checks_its_arguments_before_tuning(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "tune", lambda *a, **k: pytest.fail("tuning started"))
    base = ["tune-tree", "--model", "stories260k"]
    assert "drop --tree" in one_line_error(capsys, *base, "--tree", "garbage")
    err = one_line_error(capsys, *base, "--calibration-tokens", "-5")
    assert "--calibration-tokens must be positive" in err
    assert "is a folder" in one_line_error(capsys, *base, "--out", str(tmp_path))
    err = one_line_error(capsys, *base, "--out", str(tmp_path / "missing" / "t.json"))
    assert "no such folder" in err


def test_a_prompt_that_is_not_utf8_is_one_line():
    proc = run_cli("generate", "--model", "stories260k", "--prompt", "a\udcffb")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "--prompt is not valid UTF-8 text" in err


def test_chat_goes_on_after_bytes_that_are_not_text():
    script = b"Once upon a time\n\xff\xfe not text\nThe dog\n/stats\n/quit\n"
    proc = run_cli("chat", "--model", "stories260k", "--max-new-tokens", "8", stdin=script)
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "not valid UTF-8 text" in out
    assert "2 replies" in out  # the turn after the bad line was answered in the same chat


def test_a_bad_tuned_tree_cache_entry_is_tuned_again(tmp_path, monkeypatch, stories260k):
    from medusa_engine.engine import build_engine
    from tests.helpers import random_heads

    monkeypatch.setenv("MEDUSA_ENGINE_CACHE", str(tmp_path))
    engine = build_engine(stories260k, random_heads(stories260k), "plain")
    calls: list[int] = []

    def fake_tune(eng, progress=None, **kw):
        calls.append(1)
        return tune.TunedTree([[0]], 1.5, 2.0, {1: 1.0}, 10), None

    monkeypatch.setattr(tune, "tune", fake_tune)
    tune.auto_tree(engine, None, lambda message: None)
    (entry,) = (tmp_path / "trees").glob("*.json")
    for bad in ('{"paths": [[0]], "unknown_key": 1}', '{"paths": [[0]], "pred'):
        entry.write_text(bad)
        assert tune.auto_tree(engine, None, lambda message: None).paths == [[0]]
        json.loads(entry.read_text())  # rewritten whole
    assert len(calls) == 3


# ---- fuzz ---------------------------------------------------------------------------------------

TREE_PIECES = ["[", "]", "[0]", "[1, 0]", ",", "0", "-1", "true", "1e9", '"a"', "{", "}",
               '"paths"', ":", "dynamic:", "8", "cpu_16", "plain", "null", " "]  # fmt: skip
NUMBERS = ["0", "1", "-1", "0.5", "nan", "inf", "-inf", "1e308", "2", "abc", "", "1e-9"]


def test_fuzz_tree_specs_sampling_flags_and_heads_configs(tmp_path):
    """Seeded random input: a clean one-line error or a valid object, never anything else."""
    rng = random.Random(0)
    drafter = SimpleNamespace(num_heads=4, max_depth=8, draft_vocab_size=512)
    for _ in range(300):
        spec = "".join(rng.choice(TREE_PIECES) for _ in range(rng.randint(1, 8)))
        try:
            tree = parse_tree(spec, drafter)
        except InvalidTreeError as err:
            assert "\n" not in str(err)
        else:
            assert tree.num_nodes >= 1
    for _ in range(300):
        values = {k: rng.choice(NUMBERS) for k in ("temperature", "top_p", "top_k", "lookup")}
        try:
            sampling = SamplingConfig(
                temperature=float(values["temperature"]),
                top_p=float(values["top_p"]),
                top_k=int(float(values["top_k"])),
            )
            config = EngineConfig(lookup=int(float(values["lookup"])), sampling=sampling)
        except (ValueError, OverflowError) as err:  # float("abc"), int(inf): argparse's part
            assert "\n" not in str(err)
        else:
            assert 0 <= config.lookup <= 256 and config.sampling.temperature >= 0
    heads_dir = tmp_path / "h"
    save_heads(MedusaHeads(HeadsConfig(2, 1, 16, 40)), heads_dir)
    good = json.loads((heads_dir / "config.json").read_text())
    junk = [0, -1, 3, 16, 40, 10**12, "16", None, [], 1.5, True]
    for _ in range(150):
        config = dict(good)
        for key in rng.sample(sorted(good), rng.randint(1, 3)):
            config[key] = rng.choice(junk)
        (heads_dir / "config.json").write_text(json.dumps(config))
        try:
            heads = load_heads(heads_dir)
        except HeadsError as err:
            assert "\n" not in str(err)
        else:
            assert heads.num_heads >= 1


def test_the_model_offline_fails_at_once(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_in_hub_cache", lambda repo: False)
    start = time.perf_counter()
    err = one_line_error(capsys, "generate", "--model", "someorg/somemodel", "--prompt", "hi")
    assert "not reachable" in err and time.perf_counter() - start < 5


# ---- bench --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no prompts"),
        ('{"turns": ["a"]}\n{"turns": ["b"\n', "line 2: not valid JSON"),
        ("[1, 2, 3]\n", "line 1: a row must be a JSON object"),
        ('{"turns": [1]}\n', "must be a list of strings"),
        ('{"title": "x"}\n', "has no `turns`, `prompt` or `text`"),
    ],
)
def test_bench_refuses_bad_prompt_files_before_loading_a_model(
    capsys, tmp_path, monkeypatch, content, message
):
    from eval import harness

    monkeypatch.setattr(harness, "load_engine", lambda *a, **k: pytest.fail("model loaded"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content)
    err = one_line_error(capsys, "bench", "--prompts", str(prompts), "--out", str(tmp_path / "o"))
    assert message in err


def test_bench_refuses_an_output_it_cannot_write_before_running(capsys, tmp_path, monkeypatch):
    from eval import harness

    monkeypatch.setattr(harness, "load_engine", lambda *a, **k: pytest.fail("model loaded"))
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    err = one_line_error(capsys, "bench", "--prompts", "mt_bench", "--out", str(a_file))
    assert "is a file" in err and a_file.read_text() == "keep me"
    err = one_line_error(capsys, "bench", "--prompts", "mt_bench", "--out", str(a_file / "sub"))
    assert "cannot create the folder" in err
