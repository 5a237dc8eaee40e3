# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 3000
STAMP  := $(VENV)/.installed

.PHONY: demo test install examples serve bench clean flake-check

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

## The whole suite RUNS times in a row with `stress-ng --cpu 2` loading the machine beside it; stops at the first failure.
RUNS ?= 3
flake-check: $(STAMP)
	@command -v stress-ng >/dev/null || { echo "flake-check needs stress-ng (apt-get install stress-ng)"; exit 2; }
	@stress-ng --cpu 2 --quiet & STRESS=$$!; trap "kill $$STRESS 2>/dev/null" EXIT; \
	for run in $$(seq 1 $(RUNS)); do \
	  echo "== stressed run $$run of $(RUNS)"; \
	  $(BIN)/python -m pytest -q -p no:cacheprovider || exit 1; \
	done

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf build var .pytest_cache
