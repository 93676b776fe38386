#!/usr/bin/env bash
# Download the pure-Python wheels of the peers the GPU benchmarks compare against into .whl/ (git-ignored),
# for the device machine, which reaches no package registry: carry ".whl" with the device call and
# benchmarks/gpu_check.sh installs them with --no-index --no-deps.
#
#   bash benchmarks/fetch_peer_wheels.sh                      # the default pins below
#   bash benchmarks/fetch_peer_wheels.sh liger-kernel==0.8.5  # or any NAME==VERSION list
#
# --no-deps: torch and triton are already on the device machine (torch 2.11, triton 3.6, Python 3.12).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .git/info .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x /work/venv/bin/python ]; then PY=/work/venv/bin/python; else PY=python3; fi
fi
# trl (its fused head and distillation loss in the linear and distill stages) imports datasets, which needs
# dill and multiprocess: the device image has transformers, accelerate, pyarrow and pandas, not these four.
DEFAULT_SPECS=("liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
  "trl==1.16.0" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19")
if [ "$#" -gt 0 ]; then SPECS=("$@"); else SPECS=("${DEFAULT_SPECS[@]}"); fi

for spec in "${SPECS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
ls -l .whl
du -sh .whl
