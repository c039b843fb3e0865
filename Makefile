# The two set-up commands: `make dev` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: dev test lint check-config clean store-server

# Quiet pip, so one line on stderr says what the wait is for.
$(STAMP): pyproject.toml
	@echo "installing keyproxy and its dependencies into $(VENV) (the first run takes about a minute)..." >&2
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)
	@echo "installed into $(VENV)" >&2

dev: $(STAMP)
	$(BIN)/keyproxy dev

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The state store's tests start a real Valkey/Redis server: install Debian's redis-server when
# neither valkey-server nor redis-server is on PATH (needs root, as on CI's fresh machine).
store-server:
	@command -v valkey-server >/dev/null || command -v redis-server >/dev/null || { \
	  echo "installing redis-server for the state store's tests..." >&2; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

# Two test processes (pytest-xdist): the suite waits on servers as much as it computes, so
# two take about 60% of one's time on two cores. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

test: lint store-server
	$(BIN)/pytest -n $(TEST_WORKERS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# The side-by-side benchmark (bench/run.py, about 14 minutes on 2 cores). Not part of `test`.
.PHONY: bench
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)
