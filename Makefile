# The two commands of the README's quick start:
#   make demo   set up .venv, then run the end-to-end KIND demo on the bundled data
#   make test   set up .venv, then run the test suite (what CI runs, via .ci/run)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
DEMO_ARGS ?=

.PHONY: demo test setup lint

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kind-dit demo $(DEMO_ARGS)

# a pytest-xdist worker a core (at most 4; each worker runs torch on its share of the cores)
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n auto --maxprocesses 4 --dist worksteal

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts benchmarks
	$(VENV)/bin/ruff format --check src tests scripts benchmarks
