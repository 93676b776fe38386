#!/usr/bin/env bash
# shellcheck disable=SC2317  # the stage_* functions are called by name ("stage_$name")
# All GPU checks of the project in ONE device call (at most GPU_CHECK_BUDGET_S = 540 s), in stages, most
# important first, each under its own time budget:
#
#   stage         what                                                                   budget s  writes
#   setup         env.txt; peer wheels from .whl/ into /tmp/site                               15  env.txt
#   build         bond_kernels._C with the CUDA kernels (CPU-only _C if that fails)            75  build.log
#   token         token_logprobs at V = 128256: fwd, fwd+bwd, fwd_bwd (gradient in the
#                 forward) of every provider (ours, Liger, eager) except torch.compile         90  results.md
#   token-vocabs  the same at V = 256000, then V = 32000                                       80  results.md
#   sweep         the default, the pipeline depths (NUM_STAGES 2/4/5) and two-sweep programs
#                 (66/264/528), then 13 more BLOCK x num_warps (4-32 elements a thread),
#                 x the three token kernels, V = 128256                                        70  sweep.md
#   gpu-tests     pytest tests -m gpu (4 pytest-xdist workers where xdist is installed)       110  gpu_tests.log
#   compile       the torch.compile rows of token_logprobs at V = 128256 (fwd, fwd+bwd)        30  results.md
#   linear        the fused linear head vs eager, Liger, TRL's head (test_bench_linear.py --table)  35  results.md
#   distill       linear_token_jeffreys vs eager, TRL, Liger (test_bench_distill.py)           15  results.md
#   bond          the BOND objective and a whole step (benchmarks/test_bench_bond.py)          20  results.md
#
#   bash benchmarks/fetch_peer_wheels.sh     # once, on the CPU machine: peer wheels into .whl/
#   device run, carry [".whl"], timeout_s 600:  bash benchmarks/gpu_check.sh
#
# Budgets: a stage's time limit is its own budget plus what the stages before it left unused (so a fast build
# gives the token stages more time and never takes time from the stages after), never more than what the
# global budget has left; the last stage run gets all that is left.  A stage whose budget is 0, or which has
# under GPU_CHECK_MIN_STAGE_S (10 s) left, is skipped and summary.md says why.  Each stage runs as its own
# process group under `timeout -k`: SIGTERM at its limit minus GPU_CHECK_GRACE_S (5 s), SIGKILL at its limit,
# then every process left in its group or carrying its stage id in its environment (a pytest-xdist worker,
# a setsid child) is killed too, so nothing a stage started outlives it or keeps the GPU.  Benchmark rows are
# appended to their file one by one as they are measured, and summary.md is rewritten after every stage:
# what a killed stage (or a killed device command) measured is kept.
#
# Files under $OUT (or ./out/gpu_check when OUT is unset), flat, 7 (the device returns at most 8):
#   env.txt  build.log  results.md  sweep.md  gpu_tests.log  bench.log (every benchmark stage's output)
#   summary.md (one row per stage: status, budget, limit, seconds used, rows measured, note)
#
# Knobs (environment):
#   GPU_CHECK_STAGES       comma-separated stages to run, in the order above (default: all)
#   GPU_CHECK_ONLY         token | bond | linear: that issue's stages and GPU tests only (sets the two
#                          variables GPU_CHECK_STAGES and GPU_CHECK_TESTS unless they are given)
#   GPU_CHECK_BUDGET_S     global budget, seconds (default 540)
#   GPU_CHECK_BUDGET_<S>   budget of stage S, name upper-cased with '-' as '_' (GPU_CHECK_BUDGET_TOKEN_VOCABS=60)
#   GPU_CHECK_ARGS_<S>     extra arguments of stage S only, split on blanks, after the stage's own (argparse:
#                          a repeated option wins, e.g. GPU_CHECK_ARGS_TOKEN="--skip liger" replaces the
#                          stage's --skip torch.compile).  Accepted: token, token-vocabs, compile and sweep:
#                          test_bench_token_logprobs.py (--vocab --modes --providers --skip --n --sweep-configs
#                          --sweep-kernels --sweep-vocab); linear: test_bench_linear.py (--n --h --v --skip
#                          --providers); bond: test_bench_bond.py (--skip --no-sweep --seq-b --jf --step);
#                          gpu-tests: pytest (e.g. "-k bf16 -x")
#   GPU_CHECK_TESTS        pytest targets of gpu-tests (default "tests")
#   GPU_CHECK_XDIST        pytest-xdist workers for gpu-tests (default 4; 0 = one process)
#   GPU_CHECK_TEST_TIMEOUT_S  per-test limit where pytest-timeout is installed (default 100)
#   GPU_CHECK_SKIP_BUILD=1 / GPU_CHECK_SWEEP=0   leave out the build / the sweep (older spellings)
#   GPU_CHECK_ROLLOVER=0   a stage gets its own budget only (no time left over by the stages before it)
#   GPU_CHECK_DRY_RUN=1    the whole script on a CPU machine (57-78 s on 2 cores): every stage at tiny shapes
#                          (N = 8, V in {96, 160, 64}) with the Triton kernels interpreted (TRITON_INTERPRET=1)
#                          and CPU timings (numbers mean nothing), gpu-tests only collects the gpu tests
#                          (status collect-only: nothing passes on the CPU), build only imports _C
#                          (GPU_CHECK_DRY_RUN_BUILD=1 builds), plus two self-test stages between sweep and
#                          gpu-tests: starved (budget 0: must be skipped) and overrun (starts children that
#                          outlive SIGTERM or leave the process group, then overruns its 3 s: must be killed
#                          with all of them, and the stages after it must still run); its pids go to
#                          $OUT/overrun.pids.  tests/test_gpu_check_dry_run.py runs it in the CPU suite.
set -u
SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
export ROOT SCRIPT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export PY=${PYTHON:-python3}
export DRY=${GPU_CHECK_DRY_RUN:-0}
export OUT="${OUT:-$ROOT/out/gpu_check}"  # /out/ is git-ignored
export SITE=${GPU_CHECK_SITE:-/tmp/site}  # where the peer wheels are installed

ALL_STAGES=(setup build token token-vocabs sweep starved overrun gpu-tests compile linear distill bond)
# default budgets, seconds (sum of the GPU stages: 540)
declare -A DEFAULT_BUDGET=(
  [setup]=15 [build]=75 [token]=90 [token-vocabs]=80 [sweep]=70 [gpu-tests]=110 [compile]=30 [linear]=35
  [distill]=15 [bond]=20 [starved]=0 [overrun]=3
)
if [ "$DRY" = "1" ]; then
  # dry-run limits are ceilings for a slow 2-core CI machine, not targets; starved and overrun are the tests
  DEFAULT_BUDGET=(
    [setup]=30 [build]=60 [token]=60 [token-vocabs]=60 [sweep]=60 [gpu-tests]=60 [compile]=60 [linear]=60
    [distill]=60 [bond]=60 [starved]=0 [overrun]=3
  )
fi

# ------------------------------------------------------------------------------------------- helpers
var_of() { local v=${1^^}; echo "${v//-/_}"; }  # token-vocabs -> TOKEN_VOCABS
# EXTRA=( the stage's extra arguments ): GPU_CHECK_ARGS_<S> split on blanks (no globbing)
read_extra() { local n; n="GPU_CHECK_ARGS_$(var_of "$1")"; EXTRA=(); read -r -a EXTRA <<< "${!n:-}"; }

# ------------------------------------------------------------------------- stage bodies (own process)
# Each runs as `bash gpu_check.sh __stage NAME`, in the stage's process group, under timeout.  It may write
# one line to $STAGE_DIR/note (shown in summary.md) and a status word to $STAGE_DIR/status (else: done).

# the benchmark script of a stage: its own arguments first, then GPU_CHECK_ARGS_<S>
bench() {  # STAGE OUTFILE SCRIPT ARGS...
  local stage=$1 out=$2; shift 2
  read_extra "$stage"
  echo "\$ $PY $* --out $out ${EXTRA[*]}"
  "$PY" "$@" --out "$out" "${EXTRA[@]}"
}

stage_setup() {
  {
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    [ "$DRY" = "1" ] && echo "DRY RUN on the CPU (GPU_CHECK_DRY_RUN=1): no number here is a measurement"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')" 2>&1
  } > "$OUT/env.txt"
  cat "$OUT/env.txt"
  local note
  if [ "$DRY" = "1" ]; then
    note="dry run: .whl/ not installed; peers as this Python has them"
  elif compgen -G ".whl/*.whl" > /dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl >> "$OUT/env.txt" 2>&1; then
      note="peer wheels installed: $(cd .whl && printf '%s ' *.whl)"
    else
      note="peer wheels FAILED to install (see env.txt)"
      echo "$note" > "$STAGE_DIR/note"
      return 1
    fi
  else
    note="no .whl/ carried: peers that are not on the machine are reported unavailable"
  fi
  echo "$note" > "$STAGE_DIR/note"
  [ -d "$SITE" ] && [ "$DRY" != "1" ] && export PYTHONPATH="$ROOT:$SITE:$PYTHONPATH"
  # the packages as Python will import them (PYTHONPATH's $SITE first), not only what pip sees
  "$PY" -c "import importlib.metadata as m
for d in ('numpy', 'pytest', 'pytest-xdist', 'pytest-timeout', 'liger_kernel', 'cut_cross_entropy', 'transformers', 'trl', 'datasets'):
    try: print(d, m.version(d))
    except m.PackageNotFoundError: print(d, 'not installed')" >> "$OUT/env.txt" 2>&1
}

stage_build() {
  local rc
  export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CFLAGS=${CFLAGS:--g0}
  if [ "$DRY" = "1" ] && [ "${GPU_CHECK_DRY_RUN_BUILD:-0}" != "1" ]; then
    echo "dry run: no build (GPU_CHECK_DRY_RUN_BUILD=1 builds); importing bond_kernels._C" > "$OUT/build.log"
    "$PY" -c "import torch, bond_kernels._C" >> "$OUT/build.log" 2>&1
    rc=$?
    if [ "$rc" = 0 ]; then echo "dry run: _C imports (not rebuilt)"; else echo "dry run: _C does not import"; fi > "$STAGE_DIR/note"
    return "$rc"
  fi
  : > "$OUT/build.log"
  if "$PY" setup.py -q build_ext --inplace >> "$OUT/build.log" 2>&1; then
    echo "bond_kernels._C built ($(grep -m1 'building the CUDA kernels' "$OUT/build.log" | sed 's/^bond_kernels: //'))" > "$STAGE_DIR/note"
  else
    echo "---- the build failed; retrying CPU-only ----" >> "$OUT/build.log"
    if BOND_KERNELS_BUILD_CUDA=0 "$PY" setup.py -q build_ext --inplace >> "$OUT/build.log" 2>&1; then
      echo "CUDA build FAILED, CPU-only _C built (see build.log)" > "$STAGE_DIR/note"
    else
      echo "build FAILED (see build.log); the Triton paths run without _C" > "$STAGE_DIR/note"
    fi
    rc=1
  fi
  "$PY" -c "import bond_kernels as bk; print(bk.info())" >> "$OUT/env.txt" 2>&1
  return "${rc:-0}"
}

TOKEN=benchmarks/test_bench_token_logprobs.py
stage_token() {
  if [ "$DRY" = "1" ]; then
    bench token "$OUT/results.md" "$TOKEN" --table --n 8 --vocab 96 --modes fwd,fwd+bwd,fwd_bwd --skip torch.compile
  else
    bench token "$OUT/results.md" "$TOKEN" --table --vocab 128256 --modes fwd,fwd+bwd,fwd_bwd --skip torch.compile
  fi
}
stage_token_vocabs() {
  if [ "$DRY" = "1" ]; then
    bench token-vocabs "$OUT/results.md" "$TOKEN" --table --n 8 --vocab 160,64 --modes fwd_bwd --skip torch.compile
  else
    bench token-vocabs "$OUT/results.md" "$TOKEN" --table --vocab 256000,32000 --modes fwd,fwd+bwd,fwd_bwd \
      --skip torch.compile
  fi
}
stage_sweep() {
  if [ "$DRY" = "1" ]; then
    bench sweep "$OUT/sweep.md" "$TOKEN" --sweep --n 4 --sweep-vocab 96 --sweep-configs pruned
  else
    bench sweep "$OUT/sweep.md" "$TOKEN" --sweep --sweep-vocab 128256 --sweep-configs pruned
  fi
}
stage_compile() {
  if [ "$DRY" = "1" ]; then
    # aot_eager: dynamo + AOTAutograd without inductor's C++ compile (~30 s cold on 2 cores)
    BOND_BENCH_COMPILE_BACKEND=${BOND_BENCH_COMPILE_BACKEND:-aot_eager} \
      bench compile "$OUT/results.md" "$TOKEN" --table --n 8 --vocab 96 --modes fwd,fwd+bwd --providers torch.compile
  else
    bench compile "$OUT/results.md" "$TOKEN" --table --vocab 128256 --modes fwd,fwd+bwd --providers torch.compile
  fi
}
stage_linear() {
  if [ "$DRY" = "1" ]; then
    bench linear "$OUT/results.md" benchmarks/test_bench_linear.py --table --n 16 --h 32 --v 64 \
      --skip torch.compile,recompute=full,+entropy,tile
  else
    bench linear "$OUT/results.md" benchmarks/test_bench_linear.py --table
  fi
}
stage_distill() {  # linear_token_jeffreys against eager, TRL and Liger (tiny shape on CPU in the dry run)
  bench distill "$OUT/results.md" benchmarks/test_bench_distill.py --table
}
stage_bond() {
  if [ "$DRY" = "1" ]; then
    bench bond "$OUT/results.md" benchmarks/test_bench_bond.py --table --seq-b 8 --jf 8,96 --step 2,4,96 \
      --skip torch.compile --no-sweep
  else
    bench bond "$OUT/results.md" benchmarks/test_bench_bond.py --table
  fi
}

stage_gpu_tests() {
  local targets=() flags=() rc
  read -r -a targets <<< "${GPU_CHECK_TESTS:-tests}"
  read_extra gpu-tests
  if [ "$DRY" = "1" ]; then
    # only the files that hold gpu tests: collecting the whole suite to deselect it costs seconds
    [ -z "${GPU_CHECK_TESTS:-}" ] && targets=(tests/test_gpu_*.py)
    # No GPU: the gpu tests cannot run, so they are only collected (an import or collection error fails
    # the stage); tests/conftest.py deselects them and says how many.  Nothing passes.
    echo "\$ $PY -m pytest ${targets[*]} -m gpu --collect-only -p no:cacheprovider ${EXTRA[*]}"
    "$PY" -m pytest "${targets[@]}" -m gpu --collect-only -p no:cacheprovider "${EXTRA[@]}" > "$OUT/gpu_tests.log" 2>&1
    rc=$?
    local n
    n=$(grep -oE 'deselected [0-9]+ test\(s\) marked gpu \(no CUDA device\)' "$OUT/gpu_tests.log" | grep -oE '[0-9]+')
    if [ "$rc" = 5 ] && [ "${n:-0}" -gt 0 ]; then
      echo "collect-only" > "$STAGE_DIR/status"
      echo "dry run: $n gpu tests collected, none run (no CUDA device)" > "$STAGE_DIR/note"
      return 0
    fi
    echo "collection FAILED rc=$rc (see gpu_tests.log)" > "$STAGE_DIR/note"
    [ "$rc" = 0 ] && rc=1  # tests were selected to run: not what a CPU machine should do
    return "$rc"
  fi
  "$PY" -c "import pytest_timeout" 2>/dev/null && flags+=("--timeout=${GPU_CHECK_TEST_TIMEOUT_S:-100}")
  # Several pytest workers when pytest-xdist is there: most of the test time is Triton compiling the kernel
  # variants (one CPU core each); the GPU work itself is small.  --dist loadgroup: the tests marked
  # xdist_group("gpu_bigmem") (> ~8 GB each) run one after another in one worker (tests/conftest.py).
  if "$PY" -c "import xdist" 2>/dev/null && [ "${GPU_CHECK_XDIST:-4}" != "0" ]; then
    flags+=(-n "${GPU_CHECK_XDIST:-4}" --dist loadgroup)
  fi
  # -v: one line per finished test, so a stage cut off by its budget still shows what passed
  echo "\$ $PY -m pytest ${targets[*]} -m gpu -v -p no:cacheprovider -rfE --durations=15 ${flags[*]} ${EXTRA[*]}"
  "$PY" -m pytest "${targets[@]}" -m gpu -v -p no:cacheprovider -rfE --durations=15 "${flags[@]}" "${EXTRA[@]}" \
    > "$OUT/gpu_tests.log" 2>&1
  rc=$?
  [ "$rc" = 5 ] && echo "NONE RAN (pytest exit 5): no CUDA device or no gpu tests collected" > "$STAGE_DIR/note"
  return "$rc"
}

# self-test stages (dry run): the budget and kill logic on a stage that must not run / must be killed
stage_starved() {
  echo "ran" > "$OUT/starved.ran"  # a budget of 0 must keep this from ever running
}
stage_overrun() {
  local pids="$OUT/overrun.pids"
  : > "$pids"
  echo "$$" >> "$pids"                                  # the stage's own shell
  sleep 600 & echo "$!" >> "$pids"                      # a plain child
  bash -c 'trap "" TERM; exec sleep 600' &              # ignores SIGTERM: only the SIGKILL ends it
  echo "$!" >> "$pids"
  setsid sleep 600 & echo "$!" >> "$pids"               # left the process group: found by its stage id
  "$PY" -c "import time; time.sleep(600)" & echo "$!" >> "$pids"
  echo "started $(wc -l < "$pids") processes; sleeping past the budget"
  wait
}

if [ "${1:-}" = "__stage" ]; then
  # the checkout first, then the peers' wheels once setup installed them (never in a dry run)
  [ "$DRY" != "1" ] && [ -d "$SITE" ] && export PYTHONPATH="$ROOT:$SITE:$PYTHONPATH"
  "stage_${2//-/_}"
  exit $?
fi

# --------------------------------------------------------------------------------------- the runner
STAGES_CSV=${GPU_CHECK_STAGES:-}
case "${GPU_CHECK_ONLY:-}" in
  "") ;;
  token) : "${STAGES_CSV:=setup,build,token,token-vocabs,sweep,gpu-tests,compile}"
         : "${GPU_CHECK_TESTS:=tests/test_gpu_token_logprobs.py}" ;;
  bond) : "${STAGES_CSV:=setup,build,gpu-tests,bond}" "${GPU_CHECK_TESTS:=tests/test_gpu_bond.py}" ;;
  linear) : "${STAGES_CSV:=setup,build,gpu-tests,linear}" "${GPU_CHECK_TESTS:=tests/test_gpu_linear.py}" ;;
  *) echo "GPU_CHECK_ONLY must be token, bond or linear, got '$GPU_CHECK_ONLY'" >&2; exit 2 ;;
esac
export GPU_CHECK_TESTS
if [ -z "$STAGES_CSV" ]; then
  STAGES_CSV=setup,build,token,token-vocabs,sweep,gpu-tests,compile,linear,distill,bond
  [ "$DRY" = "1" ] && STAGES_CSV=setup,build,token,token-vocabs,sweep,starved,overrun,gpu-tests,compile,linear,distill,bond
fi
[ "${GPU_CHECK_SKIP_BUILD:-0}" = "1" ] && STAGES_CSV=$(echo ",$STAGES_CSV," | sed 's/,build,/,/; s/^,//; s/,$//')
[ "${GPU_CHECK_SWEEP:-1}" = "0" ] && STAGES_CSV=$(echo ",$STAGES_CSV," | sed 's/,sweep,/,/; s/^,//; s/,$//')
declare -A SELECTED=()
IFS=, read -r -a _sel <<< "$STAGES_CSV"
for s in "${_sel[@]}"; do
  [ -z "$s" ] && continue
  [[ " ${ALL_STAGES[*]} " == *" $s "* ]] || { echo "unknown stage '$s' in GPU_CHECK_STAGES (stages: ${ALL_STAGES[*]})" >&2; exit 2; }
  SELECTED[$s]=1
done
LAST=""
for s in "${ALL_STAGES[@]}"; do [ -n "${SELECTED[$s]:-}" ] && LAST=$s; done

if [ "$DRY" = "1" ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
fi
MIN_STAGE=${GPU_CHECK_MIN_STAGE_S:-$([ "$DRY" = "1" ] && echo 2 || echo 10)}
GRACE=${GPU_CHECK_GRACE_S:-$([ "$DRY" = "1" ] && echo 1 || echo 5)}
RESERVE=2  # seconds kept for the last summary
BUDGET=${GPU_CHECK_BUDGET_S:-$([ "$DRY" = "1" ] && echo 400 || echo 540)}
DEADLINE=$((SECONDS + BUDGET))
ROLLOVER=${GPU_CHECK_ROLLOVER:-1}

mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/bench.log"
: > "$OUT/results.md"
: > "$OUT/sweep.md"
rm -f "$OUT/starved.ran" "$OUT/overrun.pids"

declare -A STATUS=() LIMIT=() USED=() ROWS=() NOTE=()
WARNINGS=()
[ -n "${GPU_CHECK_BENCH_ARGS:-}" ] && WARNINGS+=("GPU_CHECK_BENCH_ARGS is not read any more (it reached every script): use GPU_CHECK_ARGS_<STAGE>")
[ -n "${GPU_CHECK_BENCH:-}" ] && WARNINGS+=("GPU_CHECK_BENCH is not read any more: use GPU_CHECK_STAGES")
T_START=$SECONDS

budget_of() { local n; n="GPU_CHECK_BUDGET_$(var_of "$1")"; echo "${!n:-${DEFAULT_BUDGET[$1]}}"; }
log_of() {
  case $1 in setup) echo env.txt ;; build) echo build.log ;; gpu-tests) echo gpu_tests.log ;; *) echo bench.log ;; esac
}
rows_file_of() {
  case $1 in sweep) echo "$OUT/sweep.md" ;; token|token-vocabs|compile|linear|distill|bond) echo "$OUT/results.md" ;; esac
}

write_summary() {
  {
    echo "# gpu_check summary"
    echo
    if [ "$DRY" = "1" ]; then
      echo "- DRY RUN on the CPU (GPU_CHECK_DRY_RUN=1): Triton interpreted, tiny shapes, perf_counter timings; no number here is a measurement"
    fi
    echo "- $(grep -m1 -E '^device' "$OUT/env.txt" 2>/dev/null || echo 'device unknown'); $(grep -m1 -E '^torch' "$OUT/env.txt" 2>/dev/null); $(grep -m1 -E '^triton' "$OUT/env.txt" 2>/dev/null)"
    echo "- wall time: $((SECONDS - T_START)) s of a $BUDGET s budget; stages: $STAGES_CSV"
    for w in "${WARNINGS[@]}"; do echo "- WARNING: $w"; done
    echo
    echo "| stage | status | budget s | limit s | used s | rows | note |"
    echo "|---|---|---|---|---|---|---|"
    local s
    for s in "${ALL_STAGES[@]}"; do
      [ -z "${STATUS[$s]:-}" ] && [ -z "${SELECTED[$s]:-}" ] && continue  # a self-test stage of the dry run
      echo "| $s | ${STATUS[$s]:-pending} | $(budget_of "$s") | ${LIMIT[$s]:-} | ${USED[$s]:-} | ${ROWS[$s]:-} | ${NOTE[$s]:-} |"
    done
    if [ -s "$OUT/gpu_tests.log" ]; then
      echo
      grep -E "^(FAILED|ERROR) " "$OUT/gpu_tests.log" | head -20
    fi
  } > "$OUT/summary.md.tmp" && mv "$OUT/summary.md.tmp" "$OUT/summary.md"
}

# pids (not zombies) in process group $1, read from /proc/*/stat ("pid (comm) state ppid pgrp ...")
group_pids() {
  local f line state pgrp p
  for f in /proc/[0-9]*/stat; do
    { read -r line < "$f"; } 2>/dev/null || continue
    read -r state _ pgrp _ <<< "${line##*) }"
    if [ "$pgrp" = "$1" ] && [ "$state" != Z ]; then p=${f#/proc/}; echo "${p%/stat}"; fi
  done
}
# pids of processes whose environment carries GPU_CHECK_STAGE_ID=$1 (one grep over /proc/*/environ; a
# zombie's environment reads empty)
tagged() {
  grep -lsxzF "GPU_CHECK_STAGE_ID=$1" /proc/[0-9]*/environ 2>/dev/null | sed -E 's#^/proc/([0-9]+)/environ$#\1#'
}
# kill what is left of a stage: its process group and every process tagged with its id; echo how many
reap() {  # PGID ID
  local pids
  pids=$( { group_pids "$1"; tagged "$2"; } | sort -u)
  [ -z "$pids" ] && { echo 0; return; }
  kill -KILL -- "-$1" 2>/dev/null
  # shellcheck disable=SC2086  # one pid a word
  kill -KILL $pids 2>/dev/null
  echo "$pids" | wc -l
}

CUR_PGID="" CUR_ID="" CUR_STAGE=""
on_signal() {
  trap - INT TERM HUP
  [ -n "$CUR_PGID" ] && reap "$CUR_PGID" "$CUR_ID" > /dev/null
  if [ -n "$CUR_STAGE" ]; then
    STATUS[$CUR_STAGE]="interrupted"; NOTE[$CUR_STAGE]="gpu_check.sh got a signal; the stage was killed"
  fi
  write_summary
  rm -rf "$WORK"
  exit 130
}
trap on_signal INT TERM HUP

CARRY=0
run_stage() {
  local name=$1 budget left limit term grace rc t0 id n_left still st note file lines_before seg
  budget=$(budget_of "$name")
  if [ -z "${SELECTED[$name]:-}" ]; then
    case $name in starved|overrun) return ;; esac  # self-tests: only where asked for (the dry run)
    STATUS[$name]="skipped"; NOTE[$name]="not selected (GPU_CHECK_STAGES / GPU_CHECK_ONLY)"; return
  fi
  left=$((DEADLINE - SECONDS - RESERVE))
  if [ "$budget" -le 0 ]; then
    STATUS[$name]="skipped"; NOTE[$name]="budget 0"; LIMIT[$name]=0; USED[$name]=0; write_summary; return
  fi
  limit=$budget
  local selftest=0
  case $name in starved|overrun) selftest=1 ;; esac  # exactly their own budget: that is what they test
  [ "$ROLLOVER" = "1" ] && [ $selftest = 0 ] && limit=$((budget + CARRY))
  [ "$name" = "$LAST" ] && [ $selftest = 0 ] && limit=$left
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt "$MIN_STAGE" ]; then
    STATUS[$name]="skipped"; NOTE[$name]="global budget gone: $left s left of $BUDGET s (a stage needs $MIN_STAGE s)"
    LIMIT[$name]=$((limit < 0 ? 0 : limit)); USED[$name]=0; write_summary; return
  fi
  term=$((limit - GRACE)); [ "$term" -lt 1 ] && term=1
  grace=$((limit - term)); [ "$grace" -lt 1 ] && grace=1
  file=$(rows_file_of "$name")
  lines_before=0
  [ -n "$file" ] && lines_before=$(wc -l < "$file")
  export STAGE_DIR="$WORK/$name"
  mkdir -p "$STAGE_DIR"
  STATUS[$name]="running"; LIMIT[$name]=$limit; write_summary
  echo "== $name: limit $limit s (budget $budget s; SIGTERM at $term s, SIGKILL $grace s later)"
  { echo; echo "######## stage $name (limit $limit s, $(date -u +%H:%M:%S))"; } >> "$OUT/bench.log"
  id="$name.$$.$RANDOM"
  t0=$SECONDS
  # timeout makes itself the leader of a new process group that holds the stage and all it starts; the
  # stage id in the environment also finds what leaves the group (setsid)
  GPU_CHECK_STAGE_ID=$id timeout -k "$grace" "$term" bash "$SCRIPT" __stage "$name" >> "$OUT/bench.log" 2>&1 &
  CUR_PGID=$! CUR_ID=$id CUR_STAGE=$name
  wait "$CUR_PGID"
  rc=$?
  USED[$name]=$((SECONDS - t0))
  n_left=$(reap "$CUR_PGID" "$id")
  sleep 0.2
  still=$( { group_pids "$CUR_PGID"; tagged "$id"; } | sort -u | wc -l)
  CUR_PGID="" CUR_ID="" CUR_STAGE=""
  st=$(cat "$STAGE_DIR/status" 2>/dev/null || echo "done")
  note=$(cat "$STAGE_DIR/note" 2>/dev/null)
  case $rc in
    0) STATUS[$name]=$st ;;
    124|137) STATUS[$name]="killed"; note="over its $limit s limit (rc $rc)${note:+; $note}" ;;
    *) STATUS[$name]="failed"; note="rc $rc, see $(log_of "$name")${note:+; $note}" ;;
  esac
  [ "$name" = gpu-tests ] && [ "$DRY" != "1" ] && note="$(tests_line)${note:+; $note}"
  if [ "$n_left" -gt 0 ] || [ "$still" -gt 0 ]; then
    note="${note:+$note; }$n_left process(es) outlived the stage and were killed; $still still alive"
  elif [ "${STATUS[$name]}" = killed ]; then
    note="$note; no process left"
  fi
  if [ -n "$file" ]; then
    seg=$(tail -n +"$((lines_before + 1))" "$file")
    ROWS[$name]=$(grep -cE '^\|.*\| -?[0-9]+\.[0-9]+ \|' <<< "$seg")
    local failed unavail
    failed=$(grep -cE '^\|.*\| FAILED' <<< "$seg")
    unavail=$(grep -cE '^\|.*\| unavailable' <<< "$seg")
    [ "$failed" -gt 0 ] && note="${note:+$note; }$failed FAILED rows"
    [ "$unavail" -gt 0 ] && note="${note:+$note; }$unavail rows unavailable (peers missing)"
  fi
  NOTE[$name]=$note
  if [ "$ROLLOVER" = "1" ] && [ $selftest = 0 ]; then CARRY=$((limit - USED[$name])); [ "$CARRY" -lt 0 ] && CARRY=0; fi
  echo "== $name: ${STATUS[$name]} in ${USED[$name]} s${ROWS[$name]:+, ${ROWS[$name]} rows}${note:+ ($note)}"
  write_summary
}

# the pytest result line of gpu-tests, or (cut off) how many tests finished so far
tests_line() {
  local line p f
  line=$(grep -E "^=+ .*(passed|failed|error|no tests ran).* =+$" "$OUT/gpu_tests.log" 2>/dev/null | tail -1 | sed -E 's/^=+ //; s/ =+$//')
  if [ -n "$line" ]; then echo "$line"; return; fi
  p=$(grep -cE " PASSED " "$OUT/gpu_tests.log" 2>/dev/null)
  f=$(grep -cE " (FAILED|ERROR) " "$OUT/gpu_tests.log" 2>/dev/null)
  echo "no pytest summary; ${p:-0} passed, ${f:-0} failed before the stage ended"
}

write_summary
for s in "${ALL_STAGES[@]}"; do run_stage "$s"; done
write_summary
rm -rf "$WORK"
RC=0  # 1 when a stage failed (a stage killed at its limit, or skipped, is reported, not a failure)
for s in "${ALL_STAGES[@]}"; do [ "${STATUS[$s]:-}" = failed ] && RC=1; done
echo
echo "================================ results.md (head) ================================"
head -c 6000 "$OUT/results.md"
echo
echo "================================ summary =========================================="
cat "$OUT/summary.md"
exit "$RC"
