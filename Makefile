# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned in pyproject (worker extra): an unpinned torch would pull a multi-GB CUDA build.
STAMP  := $(VENV)/.installed

.PHONY: install run worker migrate test test-fast matrix bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[worker,dev]"
	touch $(STAMP)

install: $(STAMP)

## The service on its embedded default: SQLite, local files, an embedded Celery worker.
run: $(STAMP)
	@command -v bwrap >/dev/null 2>&1 || [ "$${COMPACTOR_SANDBOX:-on}" = off ] || { \
	  echo "make run: bubblewrap (bwrap) is missing. The worker runs uploaded models only inside its sandbox."; \
	  echo "  Install it: sudo apt-get install bubblewrap   (Fedora: dnf install bubblewrap; Arch: pacman -S bubblewrap)"; \
	  echo "  or run models unsandboxed, as your own user:  COMPACTOR_SANDBOX=off make run"; exit 1; }
	$(BIN)/compactor serve --host $${HOST:-127.0.0.1} --port $${PORT:-8000}

worker: $(STAMP)
	$(BIN)/compactor worker

migrate: $(STAMP)
	$(BIN)/compactor migrate

## All tests, against the real Postgres and Redis of this machine (they fail, not skip, without them).
test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## Engine tests only (no servers needed).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/engines $(PYTEST_ARGS)

## Every zoo model × quantize scheme × pipeline through the engines and the meter; prints a summary table.
matrix: $(STAMP)
	$(BIN)/python -m tests.engines.matrix $(MATRIX_ARGS)

## ruff: lint and format check (`$(BIN)/ruff format .` applies the format).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) var .pytest_cache
