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

.PHONY: setup setup-peers test test-cpu test-interpret ctest test-asan test-gpu demo bench lint lint-cpp format \
	format-cpp clean

setup: $(STAMP) $(PEERS_STAMP)

setup-peers: $(PEERS_STAMP)

# dev for the tests and lint, demo for `make demo` (tests/test_demo_deps.py checks this line names both).
$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q setuptools wheel ninja "pybind11>=2.10"
	CFLAGS=-g0 $(BIN)/python -m pip install -q --no-build-isolation -e ".[dev,demo]"
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

# Sanitizer job (README, "Sanitizers"): the extension and the torch-free C++ tests built with ASan + UBSan into
# build/asan (the in-place build is left alone), then ctest, and the CPU parity, bad-input, sequence, linear and
# odd-input tests and the fuzz suite at a small budget, with the sanitizer runtimes preloaded into python.  Any
# report aborts (-fno-sanitize-recover).  pytest runs as .venv/bin/pytest from the repository root, so the
# test ids (which seed the tests) are the usual ones and python does not put ./bond_kernels first on its path.
ASAN_DIR := build/asan
SAN_FLAGS := -fsanitize=address,undefined -fsanitize=float-cast-overflow -fno-sanitize-recover=all -fno-omit-frame-pointer
ASAN_TESTS := tests/test_cpu_parity.py tests/test_bad_input.py tests/test_bond_sequence.py \
	tests/test_linear_token_logprobs.py tests/test_odd_inputs.py tests/test_fuzz.py tests/test_cpu_distill_kernels.py

test-asan: setup
	rm -rf $(ASAN_DIR)/pkg && mkdir -p $(ASAN_DIR)/pkg && cp -r bond_kernels $(ASAN_DIR)/pkg/
	find $(ASAN_DIR)/pkg \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
	BOND_KERNELS_SANITIZE=address,undefined BOND_KERNELS_BUILD_CUDA=0 $(BIN)/python setup.py -q build_ext \
		--build-lib $(ASAN_DIR)/pkg --build-temp $(ASAN_DIR)/tmp > $(ASAN_DIR)/build.log 2>&1 || (tail -30 $(ASAN_DIR)/build.log; false)
	cmake -S . -B $(ASAN_DIR)/cmake -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBOND_WITH_CUDA=OFF \
		-DCMAKE_CXX_FLAGS="$(SAN_FLAGS)" -DCMAKE_EXE_LINKER_FLAGS="$(SAN_FLAGS)" > /dev/null
	cmake --build $(ASAN_DIR)/cmake -j2 > /dev/null
	ctest --test-dir $(ASAN_DIR)/cmake --output-on-failure
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
		ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 BOND_FUZZ=small \
		PYTHONPATH=$(abspath $(ASAN_DIR)/pkg) $(BIN)/pytest $(ASAN_TESTS) -q -p no:cacheprovider

# GPU machine only.
test-gpu:
	$(BIN)/python -m pytest tests -m gpu -q

demo: setup
	$(BIN)/bond-kernels demo

bench: setup
	$(BIN)/python -m pytest benchmarks/ --benchmark-only -q

lint: setup lint-cpp
	$(BIN)/ruff check bond_kernels tests benchmarks
	$(BIN)/ruff format --check bond_kernels tests benchmarks
	@# Dead code in the library (tests and benchmarks count as its users; their own pytest hooks and
	@# fixtures are not judged).  Paths and the names vulture cannot see used are in pyproject.toml.
	@dead=$$($(BIN)/vulture | grep '^bond_kernels/' || true); if [ -n "$$dead" ]; then echo "$$dead"; exit 1; fi

# C++ / CUDA sources, formatted by .clang-format with the clang-format the dev extra pins.
CPP_SOURCES = $(shell find csrc python/src -type f \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' \) | sort)

lint-cpp: setup
	$(BIN)/clang-format --dry-run -Werror $(CPP_SOURCES)

format: setup
	$(BIN)/ruff format bond_kernels tests benchmarks
	$(BIN)/ruff check --fix bond_kernels tests benchmarks

format-cpp: setup
	$(BIN)/clang-format -i $(CPP_SOURCES)

clean:
	rm -rf build $(VENV) *.egg-info bond_kernels/*.so
