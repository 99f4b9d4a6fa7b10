# `make demo` and `make test` set everything up on a fresh machine: each creates .venv when
# missing and installs the project into it; a second run only re-installs when
# pyproject.toml changed (the stamp file below), so it takes seconds.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

demo: install
	$(BIN)/sce demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/bench_sce.py

clean:
	rm -rf $(VENV) build dist *.egg-info
