# `make demo` and `make test` work on a fresh clone: each creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo quick test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU build of torch first; a GPU machine may install its own build instead.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev,examples,integrations]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m scripts.reproduce

quick: $(STAMP)
	$(PY) -m scripts.reproduce --quick

lint: $(STAMP)
	$(PY) -m ruff check tract_optim tests scripts
	$(PY) -m ruff format --check tract_optim tests scripts
	$(PY) -m mypy

# The integration tests fail instead of skipping when a framework is missing.
test: lint
	TRACT_REQUIRE_INTEGRATIONS=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m scripts.bench

clean:
	rm -rf $(VENV)
