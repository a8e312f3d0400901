# The two commands of the README: `make install` then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-slow lint format quickstart

install:  ## create .venv and install reidreg with its dev tools (torch + torchvision resolved together)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'

# Processes for `make test` (pytest-xdist), each taking whole test files, so that a file's module fixtures
# (a reference run, a tiny study) are built once: 6 min instead of 9 on 2 cores. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

test:  ## the fast suite (slow tests are marked and excluded)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow:  ## only the slow tests (end-to-end runs that take minutes)
	$(BIN)/python -m pytest -q -m slow

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

quickstart:  ## the README's first example
	$(BIN)/python -m reidreg.train experiment=quickstart
