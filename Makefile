# petalflow — every target sets up .venv itself (pinned by constraints.txt) the first time.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test test-fast bench clean browser postgres stack-up stack-down

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

## Debian's Chromium for the browser test (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "install Debian's chromium package (sudo apt-get install chromium)"; exit 1; fi; }

## Debian's PostgreSQL (initdb, postgres, createdb) for `petalflow stack up --database postgres`
## and the deployed-stack tests; the stack runs its own private cluster, no system service.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	  else echo "install Debian's postgresql package (sudo apt-get install postgresql)"; exit 1; fi; }

## The whole test suite (offline, CPU only).
test: $(STAMP) browser postgres
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## Unit tests only (skips the end-to-end flow tests).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e" $(PYTEST_ARGS)

## Benchmark against a plain Keras baseline: make bench ARCHIVE=path.tgz BACKBONE=dir
bench: $(STAMP)
	$(BIN)/python bench/run_bench.py --archive "$(ARCHIVE)" --backbone "$(BACKBONE)" $(ARGS)

## Prefect server + MLflow server + cpu/gpu pools and workers + deployments, on 127.0.0.1.
stack-up: $(STAMP)
	$(BIN)/petalflow stack up $(ARGS)

stack-down:
	$(BIN)/petalflow stack down $(ARGS)

clean:
	rm -rf .petalflow .pytest_cache
