# Two entry points a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
LOCK := requirements/dev.lock
# The tool that writes the lock is itself pinned, so `make lock` is repeatable.
PIP_TOOLS := pip-tools==7.7.0
LOCK_VENV := build/lock-venv

.PHONY: demo test setup lint typecheck proto bench lock clean

# Everything installs from the lock (exact versions with hashes, torch's CPU build
# included); the package itself goes in without dependencies, so nothing unlocked
# can slip in.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --require-hashes --no-deps -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PIP) check
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
	$(VENV)/bin/pytest -q -n auto

proto: $(STAMP)
	$(PY) -m expunge.server.protogen

bench: $(STAMP)
	$(PY) -m benchmarks.run

# Refreshes the lock from pyproject's ranges and requirements/pins.in (newest versions
# the registry serves today); commit the result, then `make proto` if grpcio-tools moved.
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q $(PIP_TOOLS)
	$(LOCK_VENV)/bin/pip-compile -q --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --extra server --extra ray --extra dev \
		--output-file $(LOCK) pyproject.toml requirements/pins.in

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache
