# Tokenmill. `make demo` runs the product on SQLite with simulated GPU agents; `make test` runs the whole suite.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: venv agent-wheels demo test lint bench bench-agent bench-ingest bench-dashboard openapi clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

# The agent wheel and its dependency wheels that provisioning uploads to nodes (var/wheels); downloads only what is
# missing, so nodes and later runs need no package index.
agent-wheels: venv
	$(BIN)/python -m portal.provisioning.wheels >/dev/null

demo: venv agent-wheels
	$(BIN)/python scripts/demo.py

test: venv agent-wheels
	scripts/ensure-test-deps
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

openapi: venv
	$(BIN)/python manage.py export_openapi > docs/openapi.json

bench: bench-agent bench-ingest bench-dashboard

bench-agent: venv
	$(BIN)/python benchmarks/bench_agent.py

# Ingest at 1k-50k GPUs under both contracts, the process sweep and the outage drain; then the raw tiers' cost with
# 1 vs 30 days of history.
bench-ingest: venv
	$(BIN)/python benchmarks/bench_ingest.py
	$(BIN)/python benchmarks/ingest_history.py

bench-dashboard: venv
	$(BIN)/python benchmarks/bench_dashboard.py

clean:
	rm -rf var test-artifacts
