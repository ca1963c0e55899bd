# FastServe developer commands. `make demo` and `make test` bootstrap everything they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.setup-done
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-fast test-reliability lint format bench clean

setup: $(STAMP)

# torch is installed first with an exact pin (a CPU build on the reference machines); the
# constraints file then keeps any dependency from replacing it with another build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -c "import torch, fastserve; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	$(PY) -c "from fastserve.engine import paged_kernel as k; assert k.available(), 'kernel build failed'"
	touch $(STAMP)

demo: setup
	$(PY) -m fastserve demo --out $(DEMO_DIR)

test: setup
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests -m "not slow and not e2e"

# The reliability suite at its heavy settings (longer soak, more streams, cases and crashes);
# its figures go to runs/reliability.jsonl (docs/benchmarks.md, Reliability).
test-reliability: setup
	mkdir -p runs && rm -f runs/reliability.jsonl
	FASTSERVE_RELIABILITY=heavy FASTSERVE_RELIABILITY_REPORT=$(CURDIR)/runs/reliability.jsonl \
		$(PY) -m pytest tests/reliability -v

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: setup
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_shakespeare.py --skip-long

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache src/*.egg-info
