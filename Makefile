# Every target installs what it needs into .venv first, so each works on a fresh clone.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint format demo bench gpu-check-dry clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,demo,bench,dense,onnx,openvino]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

# The whole suite, slow tests (big models, subprocesses) included, and the GPU script's CPU dry run:
# this is what CI runs.
test: lint
	$(PY) -m pytest -q
	$(MAKE) gpu-check-dry

# benchmarks/gpu_check.sh's steps on the CPU at tiny sizes (about a minute), so the script keeps working.
gpu-check-dry: $(STAMP)
	rm -rf out/gpu_check_dry
	PY=$(PY) bash benchmarks/gpu_check.sh --dry-run out/gpu_check_dry

test-fast: lint
	$(PY) -m pytest -q -m "not slow and not cuda"

demo: $(STAMP)
	$(PY) -m repavit.demo --output-dir out/demo

# The benchmarks recorded in the README (about 15 minutes on 2 CPU cores).
bench: $(STAMP)
	PY=$(PY) bash benchmarks/run_all.sh

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
