#!/usr/bin/env bash
# All GPU checks of the project in ONE device call (about 8 minutes): set-up, build, `pytest tests -m gpu`,
# every benchmark script's markdown table, the launch-configuration sweep, then a short summary (last).
#
#   bash benchmarks/fetch_peer_wheels.sh     # once, on the CPU machine: peer wheels into .whl/
#   device run, carry [".whl"], timeout_s 560:  bash benchmarks/gpu_check.sh
#
# Files written under $OUT (or ./out/gpu_check when OUT is unset), flat, at most 7:
#   env.txt  build.log  gpu_tests.log  bench.log  results.md  sweep.md  summary.md
#
# Knobs (environment):
#   GPU_CHECK_BUDGET_S   wall-clock budget of the whole script, seconds (default 480)
#   GPU_CHECK_SKIP_BUILD=1      do not build bond_kernels._C (the Triton paths do not need it)
#   GPU_CHECK_TESTS      pytest targets (default "tests")
#   GPU_CHECK_XDIST      pytest-xdist workers for the tests (default 4; 0 = one process)
#   GPU_CHECK_BENCH      benchmark scripts (default: every benchmarks/test_bench_*.py with a --table mode)
#   GPU_CHECK_BENCH_ARGS extra arguments for every --table run (e.g. "--skip torch.compile")
#   GPU_CHECK_SWEEP=0    skip the launch-configuration sweep
#   GPU_CHECK_ONLY       token | bond | linear: only that issue's GPU tests and benchmark (sets the two above
#                        unless given; a whole default run may not fit one device call, so a session short on
#                        device time runs `GPU_CHECK_ONLY=token` first, then the others in later calls)
set -u
cd "$(dirname "$0")/.."
case "${GPU_CHECK_ONLY:-}" in
  "") ;;
  token) : "${GPU_CHECK_TESTS:=tests/test_gpu_token_logprobs.py}" "${GPU_CHECK_BENCH:=benchmarks/test_bench_token_logprobs.py}" ;;
  bond) : "${GPU_CHECK_TESTS:=tests/test_gpu_bond.py}" "${GPU_CHECK_BENCH:=benchmarks/test_bench_bond.py}"
        GPU_CHECK_SWEEP=${GPU_CHECK_SWEEP:-0} ;;
  linear) : "${GPU_CHECK_TESTS:=tests/test_gpu_linear.py}" "${GPU_CHECK_BENCH:=benchmarks/test_bench_linear.py}"
          GPU_CHECK_SWEEP=${GPU_CHECK_SWEEP:-0} ;;
  *) echo "GPU_CHECK_ONLY must be token, bond or linear, got '$GPU_CHECK_ONLY'" >&2; exit 2 ;;
esac
ROOT=$PWD
OUT="${OUT:-$ROOT/out/gpu_check}"  # /out/ is git-ignored
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
BUDGET=${GPU_CHECK_BUDGET_S:-480}
DEADLINE=$((SECONDS + BUDGET))
PY=${PYTHON:-python3}

left() { echo $((DEADLINE - SECONDS)); }
# cap SECONDS: the smaller of SECONDS and what is left of the budget (minus 20 s for the summary)
# (never below 5: `timeout 0` would mean no limit at all)
cap() { local l=$(( $(left) - 20 )); [ "$l" -lt "$1" ] && l=$l || l=$1; [ "$l" -lt 5 ] && l=5; echo "$l"; }

STATUS=()
note() { STATUS+=("$1"); echo "== $1"; }

# ---------------------------------------------------------------------------------------------- set-up
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')" 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

if compgen -G ".whl/*.whl" > /dev/null; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >> "$OUT/env.txt" 2>&1; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    note "peer wheels installed: $(ls .whl | tr '\n' ' ')"
  else
    note "peer wheels FAILED to install (see env.txt)"
  fi
else
  note "no .whl/ carried: peers that are not on the machine are reported unavailable"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
$PY -m pip list 2>/dev/null | grep -iE "^(torch|triton|pytest|pytest-xdist|numpy) " >> "$OUT/env.txt"
# the peers as Python will import them (PYTHONPATH's /tmp/site first), not only what pip sees
$PY -c "import importlib.metadata as m
for d in ('liger_kernel', 'cut_cross_entropy', 'transformers'):
    try: print(d, m.version(d))
    except m.PackageNotFoundError: print(d, 'not installed')" >> "$OUT/env.txt" 2>&1

# ----------------------------------------------------------------------------------------------- build
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = "1" ]; then
  note "build skipped (GPU_CHECK_SKIP_BUILD=1)"
else
  export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  t0=$SECONDS
  if timeout "$(cap 180)" $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
    note "build: bond_kernels._C with CUDA kernels in $((SECONDS - t0)) s"
  else
    echo "---- CUDA build failed; retrying CPU-only ----" >> "$OUT/build.log"
    if BOND_KERNELS_BUILD_CUDA=0 timeout "$(cap 90)" $PY setup.py -q build_ext --inplace >> "$OUT/build.log" 2>&1; then
      note "build: CUDA build FAILED, CPU-only _C built (see build.log)"
    else
      note "build: FAILED (see build.log); the Triton paths run without _C"
    fi
  fi
fi
$PY -c "import bond_kernels as bk; print(bk.info())" >> "$OUT/env.txt" 2>&1 || true

# ----------------------------------------------------------------------------------------------- tests
TIMEOUT_FLAG=""
$PY -c "import pytest_timeout" 2>/dev/null && TIMEOUT_FLAG="--timeout=200"
# Several pytest workers when pytest-xdist is there: most of the test time is Triton compiling the kernel
# variants (one CPU core each); the GPU work itself is small.
XDIST=""
# --dist loadgroup: the tests marked xdist_group("gpu_bigmem") (> ~8 GB each) run one after another in one
# worker, so the four workers' peaks stay well inside one GPU's memory (tests/conftest.py).
$PY -c "import xdist" 2>/dev/null && [ "${GPU_CHECK_XDIST:-4}" != "0" ] && XDIST="-n ${GPU_CHECK_XDIST:-4} --dist loadgroup"
t0=$SECONDS
# shellcheck disable=SC2086
timeout "$(cap 240)" $PY -m pytest ${GPU_CHECK_TESTS:-tests} -m gpu -q -p no:cacheprovider -rfE --durations=15 \
  $TIMEOUT_FLAG $XDIST > "$OUT/gpu_tests.log" 2>&1
rc=$?
line=$(grep -E "(passed|failed|error|no tests ran)" "$OUT/gpu_tests.log" | tail -1)
case $rc in
  0) note "gpu tests: ${line:-passed} ($((SECONDS - t0)) s)" ;;
  124) note "gpu tests: TIMED OUT after $((SECONDS - t0)) s (${line:-no summary}); see gpu_tests.log" ;;
  5) note "gpu tests: NONE RAN (exit 5): no CUDA device or no gpu tests collected" ;;
  *) note "gpu tests: FAILED rc=$rc: ${line:-no summary} ($((SECONDS - t0)) s)" ;;
esac

# ------------------------------------------------------------------------------------------ benchmarks
: > "$OUT/results.md"
: > "$OUT/bench.log"
if [ -n "${GPU_CHECK_BENCH:-}" ]; then
  read -r -a SCRIPTS <<< "$GPU_CHECK_BENCH"
else
  # the token log-prob table first: it is the hot path every other number builds on
  SCRIPTS=()
  for f in benchmarks/test_bench_token_logprobs.py benchmarks/test_bench_*.py; do
    grep -q -- "--table" "$f" && [[ ! " ${SCRIPTS[*]} " == *" $f "* ]] && SCRIPTS+=("$f")
  done
fi
n=${#SCRIPTS[@]}
i=0
for f in "${SCRIPTS[@]}"; do
  i=$((i + 1))
  # an equal share of what is left for each remaining script (the sweep takes at most 90 s after them)
  share=$(( ($(left) - 20 - 90) / (n - i + 1) ))
  [ "$share" -lt 30 ] && share=30
  t0=$SECONDS
  echo "######## $f" >> "$OUT/bench.log"
  # shellcheck disable=SC2086
  timeout "$(cap $share)" $PY "$f" --table --out "$OUT/results.md" ${GPU_CHECK_BENCH_ARGS:-} >> "$OUT/bench.log" 2>&1
  rc=$?
  case $rc in
    0) note "bench $f: done in $((SECONDS - t0)) s" ;;
    124) note "bench $f: TIMED OUT after $((SECONDS - t0)) s (partial rows in bench.log)" ;;
    *) note "bench $f: FAILED rc=$rc (see bench.log)" ;;
  esac
done
# a measured row has a time with a decimal point in some cell (headers and FAILED/unavailable rows do not)
note "bench rows measured in total: $(grep -cE '^\|.*\| [0-9]+\.[0-9]+ \|' "$OUT/bench.log")"

if [ "${GPU_CHECK_SWEEP:-1}" != "0" ] && [ "$(left)" -gt 60 ]; then
  t0=$SECONDS
  # rows are appended to sweep.md as they are measured, so a cut-off sweep keeps what it timed
  timeout "$(cap 90)" $PY benchmarks/test_bench_token_logprobs.py --sweep --out "$OUT/sweep.md" >> "$OUT/bench.log" 2>&1
  rc=$?
  note "launch sweep: rc=$rc in $((SECONDS - t0)) s (sweep.md)"
elif [ "${GPU_CHECK_SWEEP:-1}" = "0" ]; then
  note "launch sweep: off (GPU_CHECK_SWEEP=0)"
else
  note "launch sweep: skipped ($(left) s left)"
fi

# ---------------------------------------------------------------------------------------------- summary
{
  echo "# gpu_check summary"
  echo
  echo "- $(grep -m1 -E '^device' "$OUT/env.txt" || echo 'device unknown'); $(grep -m1 -E '^torch' "$OUT/env.txt"); $(grep -m1 -E '^triton' "$OUT/env.txt")"
  for s in "${STATUS[@]}"; do echo "- $s"; done
  echo "- wall time: $SECONDS s of a $BUDGET s budget"
  echo
  grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20
} > "$OUT/summary.md"
echo
echo "================================ results.md (head) ================================"
head -c 6000 "$OUT/results.md"
echo
echo "================================ summary =========================================="
cat "$OUT/summary.md"
