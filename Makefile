# The two commands of the README. Both set up ./.venv first (scripts/setup.sh).
PY := .venv/bin/python
LIB := medusa_engine attention diffusion_ext eval

.PHONY: chat test lint setup

setup:
	@scripts/setup.sh

chat: setup
	@.venv/bin/medusa-engine chat

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy $(wildcard $(LIB))

test: lint
	$(PY) -m pytest -m "not slow and not gpu"
