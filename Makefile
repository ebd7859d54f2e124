# Two entry points a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test setup lint typecheck proto bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The pinned CPU build first, so nothing pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[server,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/expunge demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck/expunge
	ln -s ../../../proto/expunge/__init__.py build/typecheck/expunge/__init__.py
	ln -s ../../../proto/expunge/v1 build/typecheck/expunge/v1
	ln -s ../../../client build/typecheck/expunge/client
	ln -s ../../../server build/typecheck/expunge/server
	ln -s ../../../defenses build/typecheck/expunge/defenses
	MYPYPATH=build/typecheck $(VENV)/bin/mypy -p expunge

test: $(STAMP) lint typecheck
	$(VENV)/bin/pytest -q

proto: $(STAMP)
	$(PY) -m expunge.server.protogen

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache
