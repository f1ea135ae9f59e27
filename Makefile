# Tokenmill. `make demo` runs the product on SQLite with simulated GPU agents; `make test` runs the whole suite.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: venv demo test lint bench bench-agent bench-ingest bench-dashboard openapi clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/python scripts/demo.py

test: venv
	scripts/ensure-test-deps
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

openapi: venv
	$(BIN)/python manage.py export_openapi > docs/openapi.json

bench: bench-agent bench-ingest

bench-agent: venv
	$(BIN)/python benchmarks/bench_agent.py

bench-ingest: venv
	$(BIN)/python benchmarks/bench_ingest.py

clean:
	rm -rf var test-artifacts
