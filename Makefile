# petalflow — every target sets up .venv itself (pinned by constraints.txt) the first time.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

## Train and register a model on the defaults (flower_photos + TF Hub MobileNetV2);
## override anything with ARGS, e.g. make run ARGS="--data-url URL --backbone DIR"
run: $(STAMP)
	$(BIN)/petalflow train $(ARGS)

## The whole test suite (offline, CPU only).
test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## Unit tests only (skips the end-to-end flow tests).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e" $(PYTEST_ARGS)

## Benchmark against a plain Keras baseline: make bench ARCHIVE=path.tgz BACKBONE=dir
bench: $(STAMP)
	$(BIN)/python bench/run_bench.py --archive "$(ARCHIVE)" --backbone "$(BACKBONE)" $(ARGS)

clean:
	rm -rf .petalflow .pytest_cache
