PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml tests/thirdparty/pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]' -e tests/thirdparty
	touch $(STAMP)

serve: $(STAMP)
	mkdir -p data
	$(BIN)/worldhost serve --config plugins.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m pip install --quiet ruff mypy
	$(BIN)/ruff check --select F,E9,B --ignore B008,B905 host plugins state bench tests
	$(BIN)/mypy host state plugins

bench: $(STAMP)
	$(BIN)/python bench/roundtrip.py
	$(BIN)/python bench/persistence.py
	$(BIN)/python bench/simulation.py
	$(BIN)/python bench/process.py
	$(BIN)/python bench/sessions.py

clean:
	rm -rf $(VENV)
