# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 3000
STAMP  := $(VENV)/.installed

.PHONY: demo test install examples serve bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Train the example models (only those not yet registered) and register them.
examples: $(STAMP)
	$(BIN)/python examples/train.py --register

## Train, register and serve the examples with monitoring at http://127.0.0.1:$(PORT) (Ctrl-C stops).
demo: examples
	$(BIN)/vigil serve --port $(PORT)

## Set up the same environment and run the whole test suite.
test: $(STAMP)
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || $(MAKE) --no-print-directory apt-deps
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

apt-deps:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq prometheus wrk >/dev/null

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf build var .pytest_cache
