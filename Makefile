PYTHON ?= python3
# Two environments: the served one holds worldhost and nothing else, so a test-only
# plugin (tests/thirdparty, found by entry point) can never appear in a real server.
VENV := .venv
TEST_VENV := .venv-test

.PHONY: serve test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e .
	touch $@

$(TEST_VENV)/.installed: pyproject.toml tests/thirdparty/pyproject.toml
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/python -m pip install --quiet -e '.[test]' -e tests/thirdparty
	touch $@

serve: $(VENV)/.installed
	mkdir -p data
	$(VENV)/bin/worldhost serve --config plugins.toml

test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m pytest -q

lint: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m pip install --quiet ruff mypy
	$(TEST_VENV)/bin/ruff check --select F,E9,B --ignore B008,B905 host plugins state bench tests
	$(TEST_VENV)/bin/mypy host state plugins
	$(TEST_VENV)/bin/mypy bench  # the benchmarks' calls into the host, checked (one broke unseen)

bench: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python bench/roundtrip.py
	$(TEST_VENV)/bin/python bench/floor.py
	$(TEST_VENV)/bin/python bench/hostcost.py
	$(TEST_VENV)/bin/python bench/persistence.py
	$(TEST_VENV)/bin/python bench/simulation.py
	$(TEST_VENV)/bin/python bench/process.py
	$(TEST_VENV)/bin/python bench/sessions.py

clean:
	rm -rf $(VENV) $(TEST_VENV)
