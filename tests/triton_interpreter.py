"""Run a Triton test module under the interpreter when there is no GPU.

TRITON_INTERPRET is read when triton is first imported, and other tests import triton earlier (a
FlexAttention call does), so without CUDA such a module re-runs itself in a fresh pytest process
with TRITON_INTERPRET=1 (no conftest: it needs no model fixtures) and reports that run's result.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

RUN_HERE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rerun_under_interpreter(test_file: str) -> None:
    """The body of the one test a module defines when not RUN_HERE: run it interpreted."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-o", "addopts=--strict-markers"]
    cmd += ["--noconftest", "-p", "no:cacheprovider"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in summary and "skipped" not in summary, summary
