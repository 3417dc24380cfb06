# Everything the project needs is installed from this file and pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run cluster-demo test test-slow lint typecheck fuzz bench bench-quick clean

# The stamp is written only after a complete install and removed before a new
# one starts, so a venv without it was left half-installed and is rebuilt from
# scratch, as is one whose interpreter no longer runs (a removed Python).
$(STAMP): pyproject.toml
	@if [ -e $(VENV) ] && { [ ! -e $(STAMP) ] || ! $(BIN)/python -c '' >/dev/null 2>&1; }; then \
		echo "removing $(VENV): its last install did not finish or its python is broken"; \
		rm -rf $(VENV); \
	fi
	rm -f $(STAMP)
	test -e $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/infinario-router serve $(if $(ROUTER_INFINARIO_URL),,--simulate)

# The Redis mode on one machine: redis-server with deploy/redis.conf, the simulator and
# three relays, all on 127.0.0.1 (Ctrl-C stops them all). DEMO_ARGS=--help lists options.
cluster-demo: $(STAMP)
	$(BIN)/python deploy/cluster_demo.py $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/ruff check router tests bench deploy
	$(BIN)/mypy
	$(BIN)/pytest -q

# Long repetitions left out of `make test`: 20 kill -9 runs at random moments, and the
# Redis mode's failure test (kill -9 and a pause) on four more seeds of 122k messages.
test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check router tests bench deploy

typecheck: $(STAMP)
	$(BIN)/mypy

# The long fuzz of the intake (tests/test_fuzz.py runs a short one in `make test`).
FUZZ_REQUESTS ?= 1000000
FUZZ_SEED ?= 1
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz --requests $(FUZZ_REQUESTS) --seed $(FUZZ_SEED)

bench: $(STAMP)
	$(BIN)/python -m bench.run --full

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
