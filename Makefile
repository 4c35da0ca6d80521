# minphi3: `make demo` runs the demo model, `make test` runs the suite. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
BASE_STAMP := $(VENV)/.installed-base

.PHONY: install test lint demo bench bench-gpu lessons clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# -qq: errors still print; setuptools' notice about editable installs does not, on every set-up.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -qq -e ".[dev]"
	touch $(STAMP)

# The demo needs only the runtime dependencies (no torch, no transformers).
$(BASE_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -qq -e .
	touch $(BASE_STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check minphi3 tests benchmarks

demo: $(BASE_STAMP)
	$(PY) -m minphi3 chat --prompt "What is the capital of France? Answer in one sentence."

bench: $(STAMP)
	$(PY) benchmarks/bench_cpu.py

bench-gpu: $(STAMP)
	$(PY) benchmarks/bench_gpu.py

lessons: $(STAMP)
	$(PY) -m jupyter lab lessons/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
