# Two entry points do all the set-up on a fresh machine (Python 3.11, pip, make):
#   make quickstart   the main job
#   make test         the test suite (what CI runs)
#   make test-fast    unit and equivalence tests only, for a change-test loop
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart test test-fast lint lock clean

# Installs exactly the tested versions (requirements.lock, with hashes), then the project
# itself without resolving anything again.
$(STAMP): pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/ttt sweep run sweeps/quickstart.yaml
	$(BIN)/ttt plots --experiment quickstart --out figures
	$(BIN)/ttt report --experiment quickstart --out figures/report

test: $(STAMP)
	$(BIN)/ruff check ttt sweeps analysis tests
	$(BIN)/python -m pytest -q --durations=25

# Unit and equivalence tests only (no training runs, no Ray): a change-test loop.
test-fast: $(STAMP)
	$(BIN)/ruff check ttt sweeps analysis tests
	$(BIN)/python -m pytest -q -m "not slow and not ray"

lint: $(STAMP)
	$(BIN)/ruff format ttt sweeps analysis tests
	$(BIN)/ruff check --fix ttt sweeps analysis tests

# Re-resolve the newest versions pyproject.toml allows into requirements.lock (then run
# `make test` before committing it).
lock:
	$(PY) -m pip install --quiet --target $(VENV)/uv uv
	$(VENV)/uv/bin/uv pip compile pyproject.toml --extra test --generate-hashes --universal \
		--python-version 3.11 --custom-compile-command "make lock" -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
