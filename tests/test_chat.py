"""`medusa-engine chat` driven through a pipe: turns, commands, greedy equivalence."""

from __future__ import annotations

import subprocess
import sys

import torch

from tests.helpers import random_heads

MAX_NEW = 24


def greedy_reply(model, ids: list[int]) -> list[int]:
    out = model.model.generate(
        torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


def test_chat_through_a_pipe(stories260k, tmp_path):
    random_heads(save_to=tmp_path / "heads")
    script = "Once upon a time\nThe dog\n/stats\n/reset\nTom had a red ball\n/quit\nnever read\n"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medusa_engine.cli",
            "chat",
            "--model",
            "stories260k",
            "--heads",
            str(tmp_path / "heads"),
            "--max-new-tokens",
            str(MAX_NEW),
        ],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    replies = [line[2:] for line in proc.stdout.splitlines() if line.startswith("> ") and line[2:]]
    stats = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(stats) == 3 and all(f"{MAX_NEW} tokens" in s for s in stats)
    assert "(new conversation)" in proc.stdout and "3 replies" not in proc.stdout
    assert any("1 replies" not in r and "2 replies" in r for r in replies)  # /stats after 2 turns

    tok = stories260k.tokenizer
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    first_prompt = tok("Once upon a time")["input_ids"]
    first = greedy_reply(stories260k, first_prompt)
    second_prompt = first_prompt + first + tok("The dog", add_special_tokens=False)["input_ids"]
    second = greedy_reply(stories260k, second_prompt)
    third = greedy_reply(stories260k, tok("Tom had a red ball")["input_ids"])  # after /reset
    texts = [r for r in replies if "replies" not in r and not r.startswith("(")]
    assert texts == [decode(first), decode(second), decode(third)]
