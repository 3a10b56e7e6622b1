# Fresh-machine entry points. `make run` starts a dev gateway, `make test` runs every check.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080
LINT_PATHS := $(wildcard src tests bench fuzz)
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := request_reader envelope

.PHONY: run test lint typecheck pytest deps system-deps venv clean bench-smoke

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(BIN)/sse-gateway serve --dev --host $(HOST) --port $(PORT)

system-deps:
	@bash scripts/ensure-system-deps.sh

deps: $(VENV)/.dev-installed system-deps

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/lint-imports --no-cache

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy --strict src/sse_gateway

pytest: deps
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test: deps lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

.PHONY: bench
# Side-by-side benchmark against nchan and sse-starlette (~20 min; not part of `make test`).
# Writes docs/comparison.md and docs/img/comparison-*.png. BENCH_ARGS=--quick for a smoke run.
bench: $(VENV)/.installed
	$(BIN)/python bench/compare.py --wait-quiet 60 $(BENCH_ARGS)

.PHONY: soak
# Soak under faults (~2.5 min; not part of `make test`, which runs a short one): EventSource-like
# clients, two gateways, Redis with appendfsync always, random gateway/Redis/Pub/Sub faults and
# a per-player ledger; exits non-zero on any loss, refusal, duplicate or reordering. Options:
# SOAK_ARGS="--seed 7 --duration 600" (`.venv/bin/python bench/soak.py --help`).
soak: deps
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

.PHONY: fuzz
# Coverage-guided fuzzing (atheris/libFuzzer) of the request reader and the envelope parser,
# FUZZ_SECONDS (default 60) per target; not part of `make test`, which runs 3 s of each
# (tests/fuzz). Starts from the seeds in fuzz/corpus/, keeps what it finds new in fuzz/.corpus/;
# a failing input lands in fuzz/findings/ and stops the run (docs/operations.md, "Fuzzing").
# More libFuzzer flags: FUZZ_ARGS="-jobs=2 -workers=2".
fuzz: $(VENV)/.dev-installed
	@set -e; for target in $(FUZZ_TARGETS); do \
	  echo "fuzzing $$target for $(FUZZ_SECONDS)s"; \
	  $(BIN)/python fuzz/run.py $$target -max_total_time=$(FUZZ_SECONDS) $(FUZZ_ARGS); \
	done
