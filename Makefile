# `make demo` and `make test` each set up .venv (create or update) and then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hcvision-installed
# `make test` runs the suite in parallel (pytest-xdist): one worker per core, at most 4. On CI's 2 cores this about
# halves the wall time. Whole files go to a worker (their module fixtures are built once), heaviest first and in
# conftest.py's order (--no-loadscope-reorder: not xdist's by number of tests).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))

.PHONY: demo test lint setup bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m hcvision.demo

# The lint gate first (ruff, configured in pyproject.toml): an unused import or a shadowed name stops the run.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(PY) benchmarks/bench_overhead.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
