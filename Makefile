# Two commands for a fresh machine (see README.md):
#   make demo   sample with Domain Guidance on the embedded models, write a grid, print throughput
#   make test   lint (ruff) and run the whole test suite (benchmarks run once each, untimed)
# Each creates its own virtual environment in .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 is the CPU wheel; the C++ ops build against it (no build isolation, so pip
# does not fetch a second torch into a throwaway build environment).
STAMP  := $(VENV)/.dgfast-installed

.PHONY: demo test bench gpu-check clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "setuptools>=64" wheel pybind11 ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,diffusers]"
	touch $@

demo: $(STAMP)
	$(PY) -m dgfast demo

# ruff first: the house rules (ruff.toml) are part of the test.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests bench --benchmark-disable -q

# One thread: two-thread timings on a 2-core VM swing. The ratio table follows the run.
bench: $(STAMP)
	mkdir -p .benchmarks
	OMP_NUM_THREADS=1 $(PY) -m pytest bench --benchmark-only --benchmark-columns=min,median,max,rounds \
		--benchmark-json=.benchmarks/latest.json
	$(PY) bench/ratios.py .benchmarks/latest.json

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
