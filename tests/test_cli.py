"""The `medusa-engine` command: output formats and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from medusa_engine.cli import main
from medusa_engine.config import DEFAULT_LOOKUP, HeadsConfig
from medusa_engine.heads import MedusaHeads
from medusa_engine.heads_io import save_heads
from tests.helpers import random_heads


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_matches_greedy(capsys, stories260k, tmp_path):
    random_heads(save_to=tmp_path / "heads")
    code, out, _ = run(
        capsys,
        "generate",
        "--model",
        "stories260k",
        "--heads",
        str(tmp_path / "heads"),
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "48",
        "--json",
    )
    assert code == 0
    record = json.loads(out)
    assert {"text", "token_ids", "new_tokens", "steps", "mean_accepted", "tokens_per_s"} <= set(
        record
    )
    ids = stories260k.tokenizer("Once upon a time")["input_ids"]
    ref = stories260k.model.generate(
        torch.tensor([ids]), max_new_tokens=48, do_sample=False, pad_token_id=0
    )
    assert record["token_ids"] == ref[0, len(ids) :].tolist()
    assert record["new_tokens"] == len(record["token_ids"])
    assert record["text"].startswith(", there was")


def test_generate_streams_text_and_a_summary(capsys):
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        "stories260k",
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "12",
        "--heads",
        "none",
    )
    assert code == 0 and out.startswith(", there was")
    assert "12 new tokens, 11 steps, τ=1.00" in err


def write_tree(tmp_path, content: str):
    path = tmp_path / "tree.json"
    path.write_text(content)
    return str(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--model", "./missing-folder"], "no such model folder or file"),
        (["--model", "missing.gguf"], "no such GGUF file"),
        (["--model", "stories260k", "--heads", "/nonexistent/heads"], "heads folder not found"),
        (["--model", "stories260k", "--tree", "bogus"], "unknown tree 'bogus'"),
        (["--model", "stories260k", "--tree", "/nonexistent/tree.json"], "tree file not found"),
        (["--model", "stories260k", "--max-new-tokens", "0"], "must be positive"),
        (["--model", "stories260k", "--temperature", "-1"], "temperature must be a finite"),
        (["--model", "stories260k", "--temperature", "nan"], "temperature must be a finite"),
        (["--model", "stories260k", "--temperature", "inf"], "temperature must be a finite"),
        (["--model", "stories260k", "--tree", "[[true]]"], "not an integer"),
        (["--model", "stories260k", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--model", "stories260k", "--top-k", "-1"], "top_k must be >= 0"),
        (["--model", "stories260k", "--static-step"], "--static-step needs greedy decoding"),
        (["--model", "stories260k", "--tree", "[[0], [0, 0"], "--tree is not valid JSON"),
        (["--model", "stories260k", "--device", "bogus"], "invalid device 'bogus'"),
        (["--model", "stories260k", "--tree", "[[0], [5, 0]]"], "no parent"),
        (
            ["--model", "stories260k", "--prompt", "word " * 600],
            "do not fit the model's context of 512",
        ),
    ],
)
def test_bad_input_is_one_line_and_nonzero(capsys, args, message):
    argv = ["generate", "--prompt", "hi", *args] if "--prompt" not in args else ["generate", *args]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("medusa-engine: error: "), err
    assert message in err


def test_unknown_acceptance_rule_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "hi", "--acceptance", "exact"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'exact' (choose from 'lossless', 'typical')" in capsys.readouterr().err


def test_lossless_sampling_is_reproducible_with_a_seed(capsys, tmp_path):
    random_heads(save_to=tmp_path / "heads")
    runs = []
    for seed in ("3", "3", "4"):
        code, out, _ = run(
            capsys,
            "generate",
            "--model",
            "stories260k",
            "--heads",
            str(tmp_path / "heads"),
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "24",
            "--json",
            "--temperature",
            "1.0",
            "--acceptance",
            "lossless",
            "--seed",
            seed,
        )
        assert code == 0
        runs.append(json.loads(out)["token_ids"])
    assert runs[0] == runs[1] != runs[2] and len(runs[0]) == 24


def test_inline_tree_and_a_tree_file_give_the_same_tokens(capsys, tmp_path):
    spec = "[[0], [1], [0, 0]]"
    runs = []
    for tree in (spec, write_tree(tmp_path, spec)):
        code, out, _ = run(
            capsys,
            "generate",
            "--model",
            "stories260k",
            "--prompt",
            "Once upon",
            "--tree",
            tree,
            "--max-new-tokens",
            "12",
            "--json",
            "--dtype",
            "fp32",
        )
        assert code == 0
        runs.append(json.loads(out))
    assert runs[0]["token_ids"] == runs[1]["token_ids"] and runs[0]["new_tokens"] == 12


def test_triton_backend_off_cuda_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, _, err = run(
        capsys, "generate", "--model", "stories260k", "--prompt", "hi", "--attention", "triton"
    )
    assert code == 2 and err.count("\n") == 1
    assert "needs a CUDA device" in err or "needs the triton package" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_one_line_error(capsys):
    code, _, err = run(
        capsys, "generate", "--model", "stories260k", "--prompt", "hi", "--device", "cuda"
    )
    assert code == 2 and err.count("\n") == 1 and "no CUDA GPU here" in err


def test_invalid_tree_file_and_mismatched_heads(capsys, tmp_path):
    save_heads(MedusaHeads(HeadsConfig(4, 1, 64, 512)), tmp_path / "small")
    bad = write_tree(tmp_path, "[[0], [0, 0, 0]]")
    code, _, err = run(
        capsys,
        "generate",
        "--model",
        "stories260k",
        "--prompt",
        "hi",
        "--tree",
        bad,
        "--heads",
        str(tmp_path / "small"),
    )
    assert code == 2 and "no parent" in err
    save_heads(MedusaHeads(HeadsConfig(2, 1, 576, 49152, base_model="smollm2")), tmp_path / "big")
    code, _, err = run(
        capsys,
        "generate",
        "--model",
        "stories260k",
        "--prompt",
        "hi",
        "--heads",
        str(tmp_path / "big"),
    )
    assert code == 2 and "expect hidden size 576" in err and err.count("\n") == 1


def test_stop_string_ends_the_reply(capsys):
    code, out, _ = run(
        capsys,
        "generate",
        "--model",
        "stories260k",
        "--prompt",
        "Once upon a time",
        "--heads",
        "none",
        "--stop",
        "Lily",
        "--json",
    )
    record = json.loads(out)
    assert code == 0 and record["finish_reason"] == "stop"
    assert record["text"] == ", there was a little girl named "
    assert record["new_tokens"] < 20


def test_default_tree_is_the_heads_own_tree(tmp_path):
    import argparse

    from medusa_engine.cli import add_model_args, engine_config
    from medusa_engine.engine import load_engine

    random_heads(save_to=tmp_path / "heads")
    parser = argparse.ArgumentParser()
    add_model_args(parser)

    def load(*flags: str):
        return load_engine(engine_config(parser.parse_args(flags)))

    base = ["--model", "stories260k", "--heads", str(tmp_path / "heads")]
    engine = load(*base, "--lookup", "0")
    assert engine.tree.num_nodes == 17  # no tree.json: the cpu_16 preset
    engine = load(*base)
    assert engine.tree.num_nodes == 17 and engine.lookup == DEFAULT_LOOKUP  # branch comes per step
    base = [*base, "--lookup", "0"]
    (tmp_path / "heads" / "tree.json").write_text(json.dumps({"paths": [[0], [1], [0, 0]]}))
    engine = load(*base)
    assert engine.tree.num_nodes == 4 and engine.tree.max_depth == 2
    engine = load(*base, "--tree", "chain_2")
    assert engine.tree.num_nodes == 3


def test_static_step_flag_gives_the_greedy_tokens(capsys, stories260k):
    common = [
        "generate",
        "--model",
        "stories260k",
        "--prompt",
        "Tom had a red ball",
        "--max-new-tokens",
        "40",
        "--json",
        "--dtype",
        "fp32",
    ]
    code, out, _ = run(capsys, *common, "--heads", "none")
    plain = json.loads(out)["token_ids"]
    code, out, _ = run(capsys, *common, "--attention", "sdpa", "--lookup", "0", "--static-step")
    assert code == 0
    record = json.loads(out)
    assert record["token_ids"] == plain
    assert record["mean_accepted"] > 1.3
