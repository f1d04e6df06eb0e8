# The two commands of the README: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,demo]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m xloss demo

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -n 2 --durations=10

bench: $(STAMP)
	$(PY) -m xloss bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info
