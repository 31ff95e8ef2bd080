# Two commands for a newcomer: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv, installs torch==2.13.0 first (a CPU build here; GPU users keep theirs), then velodiff.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/velodiff: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,ray,quant,peers,serve]"
	# k-diffusion's samplers are the parity reference where diffusers has none (tests/test_kdiffusion_parity.py);
	# only its sampling module is loaded, so none of its other requirements (torchvision, ...) are installed
	$(BIN)/pip install -q --no-deps k-diffusion==0.1.1.post1
	touch $(BIN)/velodiff

install: $(BIN)/velodiff

demo: install
	mkdir -p out
	$(BIN)/velodiff generate "a red circle above a blue square" --out out/demo.png --n 4 --seed 0
	$(BIN)/velodiff bench solvers --json out/bench_solvers.json

test: install
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -n 2 tests

lint: install
	$(BIN)/ruff check src tests

.PHONY: install demo test lint
