# One entry point for set-up, tests, the demo and benchmarks.  `make test` and `make demo` work on a fresh
# machine with python3 (>= 3.9), a C++ compiler, make and cmake: they create .venv and install everything.
PYTHON ?= python3
VENV ?= .venv
# CPU wheel by default (pip takes the one on disk here); on a CUDA machine use e.g. TORCH_SPEC="torch" or
# install torch yourself first and run with VENV pointing at that environment.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.bond_kernels_installed
# The peers tests/test_integrations_trl_verl.py compares against (trl, verl), pinned with what importing them
# needs, installed with --no-deps: their declared requirements would replace the CPU torch with a CUDA build
# (accelerate, tensordict, peft and torchdata ask for torch) and verl pins transformers<5.11.
PEERS := tests/requirements-peers.txt
PEERS_STAMP := $(VENV)/.bond_kernels_peers
export HF_HUB_OFFLINE ?= 1

.PHONY: setup setup-peers test test-cpu test-interpret ctest test-gpu demo bench lint format clean

setup: $(STAMP) $(PEERS_STAMP)

setup-peers: $(PEERS_STAMP)

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q setuptools wheel ninja "pybind11>=2.10"
	CFLAGS=-g0 $(BIN)/python -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

$(PEERS_STAMP): $(STAMP) $(PEERS)
	$(BIN)/python -m pip install -q --no-deps -r $(PEERS)
	touch $(PEERS_STAMP)

# The test command (README, CI): the CPU suite, the Triton kernels under the interpreter, then the C++ tests.
test: setup test-cpu test-interpret ctest

test-cpu: setup
	$(BIN)/python -m pytest tests -m "not gpu and not interpret" -q -p no:cacheprovider

test-interpret: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest tests -m "interpret" -q -p no:cacheprovider

ctest:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/cmake -j2 > /dev/null
	ctest --test-dir build/cmake --output-on-failure

# GPU machine only.
test-gpu:
	$(BIN)/python -m pytest tests -m gpu -q

demo: setup
	$(BIN)/bond-kernels demo

bench: setup
	$(BIN)/python -m pytest benchmarks/ --benchmark-only -q

lint: setup
	$(BIN)/ruff check bond_kernels tests benchmarks
	$(BIN)/ruff format --check bond_kernels tests benchmarks

format: setup
	$(BIN)/ruff format bond_kernels tests benchmarks
	$(BIN)/ruff check --fix bond_kernels tests benchmarks

clean:
	rm -rf build $(VENV) *.egg-info bond_kernels/*.so
