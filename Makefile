# Two commands do all set-up on a fresh CPU machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qlaunch-installed

.PHONY: install demo test lint format clean bench-gpu

# torch is installed first and pinned: on CPU machines torch==2.13.0 is the CPU wheel; an unpinned
# torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements-cpu.txt -e '.[dev,deepspeed]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qlaunch run tiny-cpu --gpus 2

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(VENV)/bin/python -m pytest -q -m "not gpu" --durations=15 tests

# On a GPU machine with the GPU stack installed (see bench/RESULTS.md): every benchmark row on GPUS GPUs.
GPUS ?= 2
BENCH_OUT ?= bench/out
bench-gpu:
	python3 scripts/bench.py $(BENCH_OUT) --gpus $(GPUS)

clean:
	rm -rf runs .pytest_cache
