# Developer entry points. On a fresh machine `make test` (or `make demo`) does
# all the set-up: creates .venv, installs the package, makes sure a PostgreSQL
# server is reachable (scripts/ensure-postgres.sh) and runs the thing.
#
#   make test PYTEST_ARGS="-k notify -x"   # extra pytest arguments
#   make test ROWSYNC_TEST_DSN=postgresql://user@host/postgres   # use that server
#   make db                                # just print the DSN

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# Touched after a successful install; pip re-runs when pyproject.toml is newer. The demos
# need the package and its [web] extra only, not the development set: a stamp of their own.
STAMP := $(VENV)/.rowsync-installed
DEMO_STAMP := $(VENV)/.rowsync-web-installed
BENCH_STAMP := $(VENV)/.rowsync-bench-installed
PYTEST_ARGS ?=
# Extra arguments for the demos, e.g. DEMO_ARGS="--no-writer" (both), "--steps 5" (console).
DEMO_ARGS ?=
# Set (e.g. by .ci/run) to treat pytest's "no tests collected" (exit 5) as success.
ALLOW_NO_TESTS ?=

# Recipe prefix: find/start PostgreSQL and export its DSN, or stop right there.
# (`dsn=$(...) || exit` so a failing script is not masked by `export`.)
WITH_DB = dsn=$$(scripts/ensure-postgres.sh) || exit $$?; export ROWSYNC_TEST_DSN="$$dsn";

.PHONY: test oracle-soak demo demo-console venv demo-venv db lint docs bench package-check \
	clean distclean

venv: $(STAMP)
demo-venv: $(DEMO_STAMP)

$(STAMP): pyproject.toml
	@test -x $(VPY) || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	$(VPY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

# The benchmarks need the development set, and matplotlib for their charts ([bench]).
$(BENCH_STAMP): $(STAMP)
	$(VPY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	@touch $@

$(DEMO_STAMP): pyproject.toml
	@test -x $(VPY) || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	$(VPY) -m pip install --quiet --disable-pip-version-check -e '.[web]'
	@touch $@

db:
	@scripts/ensure-postgres.sh

# The recipe exits with pytest's own status (make then reports it as "Error N"
# and itself exits non-zero), so failures are never swallowed. The browser test
# (tests/test_browser.py) needs Debian's chromium: installed first when missing
# (if that fails, the other tests still run and the browser test fails, saying why).
test: venv
	@scripts/ensure-chromium.sh || echo "make test: no chromium: the browser test will fail" >&2; \
	scripts/ensure-brokers.sh || echo "make test: no Redis/NATS: the fan-out tests will fail" >&2; \
	$(WITH_DB) \
	$(VPY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [[ $$rc -eq 5 && -n "$(ALLOW_NO_TESTS)" ]]; then \
	  echo "make test: pytest collected no tests; ALLOW_NO_TESTS is set, so not failing" >&2; rc=0; \
	fi; \
	exit $$rc

# The mapping oracle (tests/test_oracle_mappings.py) run long, on random seeds: CI runs a
# fixed, derandomized budget. ORACLE_EXAMPLES=N sets the examples per test.
ORACLE_EXAMPLES ?= 2000
oracle-soak: venv
	@$(WITH_DB) ROWSYNC_ORACLE_SOAK=1 ROWSYNC_ORACLE_EXAMPLES=$(ORACLE_EXAMPLES) \
	$(VPY) -m pytest tests/test_oracle_mappings.py -k "not broken" $(PYTEST_ARGS)

# The live web demo (examples/web): serves http://127.0.0.1:$PORT/ (PORT defaults to 8000).
demo: demo-venv
	@$(WITH_DB) DATABASE_URL="$$dsn" PYTHONPATH="examples$${PYTHONPATH:+:$$PYTHONPATH}" \
	$(VPY) -m web $(DEMO_ARGS)

# The console demo (examples/demo.py): the tree printed after each change.
demo-console: demo-venv
	@$(WITH_DB) DATABASE_URL="$$dsn" $(VPY) examples/demo.py $(DEMO_ARGS)

# bench/results.json and its charts in bench/charts/ (drawn even if a benchmark failed; the
# recipe fails if either step did).
bench: $(BENCH_STAMP)
	@$(WITH_DB) DATABASE_URL="$$dsn" $(VPY) bench/run.py; rc=$$?; \
	$(VPY) bench/charts.py || rc=1; \
	exit $$rc

# Build the sdist and the wheel into dist/, install the wheel in a fresh virtualenv (core
# dependencies only, then each extra) and run the README's example there, twice.
package-check: venv
	@$(WITH_DB) $(VPY) scripts/package-check.py

# Run every check even if an earlier one fails, then fail if any did.
LINT_PATHS := rowsync tests bench examples scripts
lint: venv
	@rc=0; \
	$(VENV)/bin/ruff check $(LINT_PATHS) || rc=1; \
	$(VENV)/bin/ruff format --check $(LINT_PATHS) || rc=1; \
	$(VENV)/bin/mypy || rc=1; \
	exit $$rc

# The documentation site (docs/, mkdocs.yml) in build/site; any warning fails it.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

# Caches and build output only: .venv is kept (others may be using it).
clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
