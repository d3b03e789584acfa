#!/usr/bin/env bash
# The one command a GPU machine runs (no network needed): builds the CUDA extension, installs fastopd from this
# checkout, then benchmarks and tests in order of value, and writes everything to one folder for committing
# under bench/results/.
#
#   bash bench/gpu_suite.sh                    # everything
#   bash bench/gpu_suite.sh --budget 540       # time-boxed: every step has its own cap, none runs past the budget
#   bash bench/gpu_suite.sh --quick            # benchmark only N=1024 and N=8192 at V=128256
#   bash bench/gpu_suite.sh --skip-tests       # install + benchmarks
#   bash bench/gpu_suite.sh --dry-run          # on any machine: check the script and the benchmark harness (CPU)
#   bash bench/gpu_suite.sh --print-cuda-home  # print the CUDA toolkit the build would use, and why
#   bash bench/gpu_suite.sh --help
#
# Order: CUDA build (once, verbose, into the log) + install; the loss benchmark (bench/gpu_bench.py, both
# vocabularies at the largest and smallest N first); the rollout benchmark (CUDA graphs vs HF generate); the
# real-shape GPU tests (tests/kernels/test_gpu_shapes.py); the other GPU tests; the sparse AdamW benchmark; the
# loss benchmark at 256-row chunks. With --budget each step runs under its own cap (the loss benchmark leaves
# ROLLOUT_SHARE s for the rollout step, which leaves SHAPES_SHARE s for the real-shape tests, each share with
# STEP_SLACK s more for the overrun of a step killed at its cap), a step with too
# little time left is skipped, and status.txt says which were capped or skipped.
# Wheels the machine lacks (liger-kernel, ...) travel in .whl/ at the repository root (bench/fetch_wheels.sh).
# Environment: PYTHON (default python3); CUDA_HOME (kept if it holds lib64/libcudart.so*, else /usr/local/cuda or
# FASTOPD_CUDA_DEFAULT, else the toolkit nvcc on PATH belongs to); FASTOPD_CUDA_ARCHS (default 9.0); MAX_JOBS;
# FASTOPD_COMMIT, the commit the results name (else `git rev-parse HEAD`, else the file .fastopd_commit, else
# 'unknown'): .git may not travel to the GPU machine, so the caller passes it.
# Outputs: bench/results/, or with $OUT set (the device tool, which takes back at most 8 files) a folder packed
# into $OUT/gpu_suite_results.tar.gz beside gpu_suite.log, status.txt and the tables, refreshed after every step.
set -uo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

DRY=0 QUICK=0 TESTS=1 BENCH=1 BUDGET="" PRINT_CUDA_HOME=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    --skip-tests) TESTS=0 ;;
    --skip-bench) BENCH=0 ;;
    --print-cuda-home) PRINT_CUDA_HOME=1 ;;
    --budget)
      shift
      case "${1:-}" in ''|*[!0-9]*) echo "gpu_suite: --budget needs whole seconds, got '${1:-}'" >&2; exit 2 ;; esac
      BUDGET="$1" ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_suite: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT" || exit 2
PY="${PYTHON:-$(command -v python3 || command -v python)}"

cudart_layout() {  # cudart_layout DIR: prints lib64 or targets where DIR holds libcudart.so (setup.py needs lib64)
  [ -n "${1:-}" ] && [ -d "$1" ] || return 1
  if compgen -G "$1/lib64/libcudart.so*" >/dev/null; then echo lib64; return 0; fi
  if compgen -G "$1/targets/*/lib/libcudart.so*" >/dev/null; then echo targets; return 0; fi
  return 1
}

pick_cuda_home() {  # sets CUDA_HOME and CUDA_HOME_WHY; returns 1 when no toolkit holds libcudart.so
  local default="${FASTOPD_CUDA_DEFAULT:-/usr/local/cuda}" nvcc real top i want rejected=""
  local cands=() whys=() layouts=()
  if [ -n "${CUDA_HOME:-}" ]; then cands+=("$CUDA_HOME"); whys+=("CUDA_HOME as set"); fi
  cands+=("$default"); whys+=("the default toolkit")
  nvcc="$(command -v nvcc 2>/dev/null || true)"
  if [ -n "$nvcc" ]; then
    # nvcc may be a symlink (readlink -f finds the toolkit) or a wrapper script (/usr/local/bin/nvcc running
    # /usr/local/cuda-13.0/bin/nvcc): then only nvcc itself knows, as the TOP= line of a dry run.
    real="$(readlink -f "$nvcc" 2>/dev/null || echo "$nvcc")"
    cands+=("$(dirname "$(dirname "$real")")"); whys+=("two levels above nvcc ($nvcc -> $real)")
    top="$(timeout 30 "$nvcc" -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
    if [ -n "$top" ]; then cands+=("$(readlink -f "$top" 2>/dev/null || echo "$top")"); whys+=("TOP= of nvcc -dryrun"); fi
  fi
  for i in "${!cands[@]}"; do layouts[i]="$(cudart_layout "${cands[$i]}")"; done
  for want in lib64 targets; do  # a toolkit with lib64/libcudart.so* first: it is what setup.py checks
    rejected=""
    for i in "${!cands[@]}"; do
      if [ "${layouts[$i]}" != "$want" ]; then rejected+=" ${cands[$i]} (${whys[$i]})"; continue; fi
      CUDA_HOME="${cands[$i]}"
      CUDA_HOME_WHY="${whys[$i]}, holds $want libcudart.so"
      [ "$want" = targets ] && CUDA_HOME_WHY+=" but no lib64/libcudart.so, which setup.py checks: expect no CUDA kernel"
      [ -n "$rejected" ] && CUDA_HOME_WHY+="; passed over, no $want libcudart.so:$rejected"
      return 0
    done
  done
  CUDA_HOME_WHY="no CUDA toolkit with libcudart.so found (tried:$rejected): fastopd._C builds without CUDA kernels"
  return 1
}

if [ "$PRINT_CUDA_HOME" = 1 ]; then
  if pick_cuda_home; then echo "CUDA_HOME=$CUDA_HOME"; else echo "CUDA_HOME="; fi
  echo "why: $CUDA_HOME_WHY"
  exit 0
fi

resolve_commit() {  # sets COMMIT and COMMIT_FROM, exports FASTOPD_COMMIT for the benchmarks
  local c
  if [ -n "${FASTOPD_COMMIT:-}" ]; then COMMIT="$FASTOPD_COMMIT" COMMIT_FROM="FASTOPD_COMMIT"
  elif [ "$(git -C "$ROOT" rev-parse --show-toplevel 2>/dev/null)" = "$ROOT" ] \
       && c="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null)" && [ -n "$c" ]; then COMMIT="$c" COMMIT_FROM="git"
  elif [ -s "$ROOT/.fastopd_commit" ]; then
    COMMIT="$(head -c 100 "$ROOT/.fastopd_commit" | tr -d '[:space:]')" COMMIT_FROM=".fastopd_commit"
  else COMMIT="unknown" COMMIT_FROM="nothing (pass FASTOPD_COMMIT=<hash>)"; fi
  export FASTOPD_COMMIT="$COMMIT"
}

START=$SECONDS
RESERVE=20        # seconds kept back for packing the results
ROLLOUT_SHARE=180 # with --budget: what the loss benchmark leaves for the rollout step (HF static compiles cold)
SHAPES_SHARE=30   # ... and what the rollout step leaves for the real-shape GPU tests (also their minimum)
KILL_GRACE=10     # a step still running this long after its cap's SIGTERM gets a SIGKILL (timeout -k)
STEP_SLACK=15     # what a capped step may overrun its cap by: the kill grace, its exit, the packing after it
PACK_TO=""
if [ "$DRY" = 1 ]; then
  OUT_DIR="$(mktemp -d -t fastopd_gpu_suite_dry.XXXXXX)"
elif [ -n "${OUT:-}" ]; then
  PACK_TO="$OUT"
  OUT_DIR="$(mktemp -d -t fastopd_gpu_suite.XXXXXX)"
else
  OUT_DIR="$ROOT/bench/results"
fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_suite.log"
: > "$LOG"
FAILED=() SKIPPED=() CAPPED=() STEP_RC=0 INSTALL="not run" LINKED_KERNELS=0 SHIM="" SITE="" CUDA_KERNEL="not checked"
CUDA_HOME_WHY="not looked up"
resolve_commit

say() { echo "[gpu_suite $(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }
left() {  # seconds left before the deadline (a large number without --budget)
  if [ -z "$BUDGET" ]; then echo 999999; else echo $((BUDGET - RESERVE - (SECONDS - START))); fi
}
pack() {  # writes status.txt; with $OUT set, packs the folder into at most 8 files there (after every step)
  {
    echo "failed: ${FAILED[*]:-none}"
    echo "capped: ${CAPPED[*]:-none}"
    echo "skipped: ${SKIPPED[*]:-none}"
    echo "elapsed_s: $((SECONDS - START))"
    echo "commit: $COMMIT (from $COMMIT_FROM)"
    echo "install: $INSTALL"
    echo "cuda_home: ${CUDA_HOME:-none} ($CUDA_HOME_WHY)"
    echo "cuda_kernel: $CUDA_KERNEL"
  } > "$OUT_DIR/status.txt"
  if [ -n "$PACK_TO" ]; then
    mkdir -p "$PACK_TO"
    tar -C "$OUT_DIR" -czf "$PACK_TO/.gpu_suite_results.tar.gz" . 2>/dev/null \
      && mv -f "$PACK_TO/.gpu_suite_results.tar.gz" "$PACK_TO/gpu_suite_results.tar.gz"
    cp "$OUT_DIR/gpu_suite.log" "$OUT_DIR/status.txt" "$PACK_TO"/ 2>/dev/null
    for md in gpu_bench.md rollout_cuda.md optim_cuda.md gpu_bench_chunk256.md; do
      [ -f "$OUT_DIR/$md" ] && cp "$OUT_DIR/$md" "$PACK_TO"/
    done
  fi
}
unfail() {  # unfail NAME: drops step NAME from the failures (a fallback stood in for it)
  local kept=() f
  for f in ${FAILED[@]+"${FAILED[@]}"}; do [ "$f" = "$1" ] || kept+=("$f"); done
  FAILED=(${kept[@]+"${kept[@]}"})
}
finish() {
  [ "$LINKED_KERNELS" = 1 ] && rm -f "$ROOT/fastopd/kernels"  # the fallback's link, made by this run
  [ -n "$SHIM" ] && rm -f "$SHIM/fastopd" && rmdir "$SHIM"  # the fallback's PYTHONPATH folder (a link only)
  [ -n "$SITE" ] && rm -rf "$SITE"  # the travelling wheels' --target folder, made by this run (mktemp)
  pack
}
trap finish EXIT

# step NAME MIN_SECONDS CAP_SECONDS COMMAND...: runs COMMAND with its output in the log; under --budget it is
# killed after min(CAP, time left) seconds (CAP 0: the deadline only) and skipped when fewer than MIN_SECONDS are
# left. Records failure, cap or skip without stopping the suite; STEP_RC is the command's exit status.
step() {
  local name="$1" need="$2" cap="$3"; shift 3
  local t limit kind="deadline"; t=$(left); limit=$t
  STEP_RC=0
  if [ "$t" -lt "$need" ] || [ "$t" -le 0 ]; then say "-- $name: skipped (${t}s left, needs ${need}s)"; SKIPPED+=("$name"); STEP_RC=-1; return 0; fi
  if [ "$cap" -gt 0 ] && [ "$cap" -lt "$t" ]; then limit=$cap kind="cap"; fi
  if [ -n "$BUDGET" ]; then say "== $name (at most ${limit}s): $*"; else say "== $name: $*"; fi
  if [ -n "$BUDGET" ]; then timeout -k "$KILL_GRACE" "$limit" "$@" >>"$LOG" 2>&1 || STEP_RC=$?; else "$@" >>"$LOG" 2>&1 || STEP_RC=$?; fi
  if [ "$STEP_RC" = 0 ]; then say "   $name: ok"
  elif [ -n "$BUDGET" ] && { [ "$STEP_RC" = 124 ] || [ "$STEP_RC" = 137 ]; }; then
    if [ "$kind" = cap ]; then say "   $name: stopped at its ${limit}s cap (what it wrote is kept)"; CAPPED+=("$name")
    else say "   $name: stopped at the deadline (what it wrote is kept)"; FAILED+=("$name (deadline)"); fi
  else say "   $name: FAILED rc=$STEP_RC (see $LOG)"; FAILED+=("$name"); fi
  pack
}

if [ "$DRY" = 1 ]; then
  say "dry run: checking syntax and the benchmark harness on the CPU; outputs in $OUT_DIR"
  say "commit: $COMMIT (from $COMMIT_FROM)"
  pick_cuda_home; say "CUDA_HOME would be ${CUDA_HOME:-none}: $CUDA_HOME_WHY"
  step "bash syntax" 0 0 bash -n "$0"
  step "bench harness (CPU, tiny shapes)" 0 0 "$PY" bench/gpu_bench.py --dry-run --out "$OUT_DIR"
  step "python syntax" 0 0 "$PY" -m py_compile bench/gpu_bench.py bench/test_rollout_bench.py
  [ ${#FAILED[@]} -eq 0 ] && say "dry run ok" && exit 0
  say "dry run failed: ${FAILED[*]}"; exit 1
fi

# --- 1. The machine ------------------------------------------------------------------------------------------
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  echo "commit: $COMMIT (from $COMMIT_FROM)"
  uname -a
  nvidia-smi 2>&1 || echo "nvidia-smi unavailable"
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], sys.executable); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  "$PY" -c "import transformers; print('transformers', transformers.__version__)" 2>&1
  [ "$COMMIT_FROM" = git ] && git -C "$ROOT" status --short 2>/dev/null | head -20
} > "$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt" >> "$LOG"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA device visible: this suite needs a GPU (use --dry-run elsewhere)"
  FAILED+=("no CUDA device")
  exit 2
fi

# --- 2. Build once, install offline ------------------------------------------------------------------------------
pick_cuda_home
say "CUDA_HOME=${CUDA_HOME:-none}: $CUDA_HOME_WHY"
export CUDA_HOME FASTOPD_BUILD_CUDA=1 FASTOPD_CUDA_ARCHS="${FASTOPD_CUDA_ARCHS:-9.0}" PIP_NO_INDEX=1
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}" PYTHONUNBUFFERED=1
[ -n "${CUDA_HOME:-}" ] && "$CUDA_HOME/bin/nvcc" --version >> "$LOG" 2>&1
say "python=$PY FASTOPD_CUDA_ARCHS=$FASTOPD_CUDA_ARCHS MAX_JOBS=$MAX_JOBS budget=${BUDGET:-none}"
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  step "install travelling wheels" 0 120 "$PY" -m pip install -q --no-index --no-deps "$ROOT"/.whl/*.whl
  if [ "$STEP_RC" != 0 ] && [ "$STEP_RC" != -1 ]; then  # e.g. a read-only site-packages: a folder on PYTHONPATH
    SITE="$(mktemp -d -t fastopd_gpu_suite_site.XXXXXX)"
    step "install travelling wheels to $SITE" 0 120 "$PY" -m pip install -q --no-index --no-deps --target "$SITE" \
      "$ROOT"/.whl/*.whl
    if [ "$STEP_RC" = 0 ]; then
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
      unfail "install travelling wheels"
      say "wheels installed to $SITE (on PYTHONPATH)"
    fi
  fi
else
  say "no .whl/ folder: installing no extra wheels (Liger-Kernel is benchmarked only if already installed)"
fi
# One build, in place and verbose (ninja's commands and nvcc's errors land in the log); setup.py degrades to a
# CPU-only build rather than fail, so the registration check below is what tells, and a failed build is not
# repeated: the log says why.
BUILD_LOG_FROM=$(($(wc -l < "$LOG") + 1))
step "build fastopd._C in place (CUDA, once)" 0 300 "$PY" setup.py build_ext --inplace
BUILT=$STEP_RC BUILD_LOG_TO=$(wc -l < "$LOG")
CHECK_CUDA="
import torch, fastopd._ops as o
assert o.LOAD_ERROR is None, o.LOAD_ERROR
assert o.has_kernel('divergence_chunk_', 'CUDA'), 'fastopd._C has no CUDA kernel for divergence_chunk_'
print('fastopd::divergence_chunk_ has a CUDA kernel')"
if [ "$BUILT" != 0 ] && [ "$BUILT" != 124 ] && [ "$BUILT" != 137 ]; then
  # setup.py itself refused to run (not a compile error, which it swallows): let pip do the one build
  say "setup.py build_ext did not run (rc=$BUILT): pip install -e builds the extension instead"
  PIP_STEP="pip install -e (builds fastopd._C)"
  step "$PIP_STEP" 0 300 "$PY" -m pip install -v --no-index --no-build-isolation --no-deps -e "$ROOT"
else
  PIP_STEP="pip install -e (no rebuild)"
  step "$PIP_STEP" 0 120 env FASTOPD_BUILD_CPP=0 "$PY" -m pip install --no-index --no-build-isolation --no-deps \
    -e "$ROOT"
fi
PIP_RC=$STEP_RC
INSTALL="editable (pip install -e)"
if [ "$PIP_RC" != 0 ] || ! "$PY" -c "import fastopd.kernels.divergence" >>"$LOG" 2>&1; then
  # The Triton code imports as fastopd.kernels only through the editable finder (kernels/ -> fastopd.kernels).
  # Without it, run from the checkout: a link fastopd/kernels -> ../kernels, removed when the suite ends, and a
  # folder holding only a link to fastopd/ on PYTHONPATH. Not the root itself: there kernels/ would also import as
  # `kernels`, shadowing Hugging Face's package, which transformers >= 5.25 imports to build a model.
  if [ ! -e "$ROOT/fastopd/kernels" ] && ln -s ../kernels "$ROOT/fastopd/kernels"; then LINKED_KERNELS=1; fi
  SHIM="$(mktemp -d -t fastopd_gpu_suite_path.XXXXXX)" && ln -s "$ROOT/fastopd" "$SHIM/fastopd"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  if (cd "$OUT_DIR" && "$PY" -c "import fastopd.kernels.divergence") >>"$LOG" 2>&1; then
    INSTALL="checkout fallback (pip install -e rc=$PIP_RC; fastopd/kernels -> ../kernels, PYTHONPATH=$SHIM)"
    say "fastopd.kernels did not import through the editable install: running from the checkout ($INSTALL)"
    unfail "$PIP_STEP"
  else
    INSTALL="broken: fastopd.kernels imports neither installed nor from the checkout"
    say "$INSTALL: the Triton backends are unusable"
    FAILED+=("import fastopd.kernels")
  fi
fi
if "$PY" -c "$CHECK_CUDA" >>"$LOG" 2>&1; then
  CUDA_KERNEL="yes"; say "fastopd._C has its CUDA kernel"
else
  CUDA_KERNEL="no (see the 'fastopd setup:' lines and nvcc's errors in gpu_suite.log)"
  say "fastopd._C has no CUDA kernel after the one build: chunked-cuda is unavailable; not rebuilding. The build said:"
  sed -n "${BUILD_LOG_FROM},${BUILD_LOG_TO}p" "$LOG" | grep -a -E "fastopd setup:|error|fatal" | head -n 6 \
    | while IFS= read -r line; do say "   $line"; done
  FAILED+=("CUDA kernel")
fi
# From the results folder: `python -m` puts the working folder on sys.path, and from the root kernels/ would
# shadow Hugging Face's `kernels` (doctor would report the clash, not this install).
(cd "$OUT_DIR" && timeout 120 "$PY" -m fastopd.cli doctor) > "$OUT_DIR/doctor.txt" 2>&1
cat "$OUT_DIR/doctor.txt" >> "$LOG"
pack

# --- 3. Benchmarks and tests, in order of value -----------------------------------------------------------------
# pytest, with SIGTERM raised as KeyboardInterrupt: a test step stopped at its cap (timeout's SIGTERM) still prints
# the failures so far and writes its JUnit XML (on a plain SIGTERM pytest dies with one character per test logged).
PYTEST=("$PY" -c "import signal, sys, pytest; signal.signal(signal.SIGTERM, signal.default_int_handler); sys.exit(pytest.main(sys.argv[1:]))" -q -rs -p no:cacheprovider)
ROUNDS="${FASTOPD_BENCH_ROUNDS:-$([ -n "$BUDGET" ] && echo 3 || echo 5)}"
cap_after() {  # cap_after SHARE...: the time left minus the shares of the steps after this one (at least 60 s),
  # each with STEP_SLACK: a step killed at its cap ends up to that much later, which its successor must not lose
  local c s; c=$(left)
  for s in "$@"; do c=$((c - s - STEP_SLACK)); done
  [ "$c" -lt 60 ] && c=60
  echo "$c"
}
if [ "$BENCH" = 1 ]; then
  BENCH_ARGS=(--out "$OUT_DIR")
  [ "$QUICK" = 1 ] && BENCH_ARGS+=(--tokens 1024 8192 --vocab 128256)
  LATER=()
  [ "$QUICK" = 0 ] && LATER+=("$ROLLOUT_SHARE")
  [ "$TESTS" = 1 ] && LATER+=("$SHAPES_SHARE")
  CAP=0
  if [ -n "$BUDGET" ]; then
    CAP=$(cap_after ${LATER[@]+"${LATER[@]}"})
    BENCH_ARGS+=(--time-budget $((CAP - 30)))  # it stops itself (imports take ~10 s) before the cap kills it
  fi
  step "loss benchmark" 60 "$CAP" "$PY" bench/gpu_bench.py "${BENCH_ARGS[@]}"
fi
if [ "$BENCH" = 1 ] && [ "$QUICK" = 0 ]; then
  # Writes rollout_cuda.json/.md after every measured configuration; HF's static cache (a cold torch.compile of
  # the decode step) runs last, so a cap or the deadline costs only what was not yet measured.
  CAP=0
  [ -n "$BUDGET" ] && CAP=$(cap_after $([ "$TESTS" = 1 ] && echo "$SHAPES_SHARE"))
  step "rollout benchmark (CUDA, bf16, CUDA graphs vs HF generate)" 60 "$CAP" env OUT="$OUT_DIR" \
    FASTOPD_BENCH_ROUNDS="$ROUNDS" "${PYTEST[@]}" bench/test_rollout_bench.py -k "cuda or write_results"
fi
if [ "$TESTS" = 1 ]; then
  step "GPU tests at real shapes" "$SHAPES_SHARE" 0 "${PYTEST[@]}" tests/kernels/test_gpu_shapes.py \
    --junitxml="$OUT_DIR/pytest_gpu_shapes.xml"
  # Without the files that need no GPU (ahead-of-time compiles, the CUDA emulation, this suite's own checks):
  # CI runs those, and here they would only spend the lease.
  NO_GPU_NEEDED=(tests/kernels/test_gpu_shapes.py tests/kernels/test_cuda_build.py tests/kernels/test_cuda_emulation.py
                 tests/kernels/test_triton_sm90_compile.py tests/kernels/test_gpu_suite.py
                 tests/optim/test_sparse_adamw_sm90.py tests/losses/test_compile.py)
  step "GPU tests (tests/kernels, tests/losses, tests/optim, tests/rollout)" 60 0 "${PYTEST[@]}" tests/kernels \
    tests/losses tests/optim tests/rollout "${NO_GPU_NEEDED[@]/#/--ignore=}" --junitxml="$OUT_DIR/pytest_gpu.xml"
fi
if [ "$BENCH" = 1 ] && [ "$QUICK" = 0 ]; then
  step "sparse AdamW benchmark (CUDA)" 30 0 env OUT="$OUT_DIR" "${PYTEST[@]}" bench/test_optim_bench.py \
    -k "cuda or write_results"
  # The chunked providers again with 256-row chunks (the default 1 GiB budget gives ~1k rows at V = 128k):
  # shows how much the chunk size matters on this GPU (grad_W GEMM depth, programs per SM).
  step "loss benchmark, chunked at 256 rows" 60 0 "$PY" bench/gpu_bench.py --out "$OUT_DIR" --tag chunk256 \
    --chunk-size 256 --providers gemm_floor chunked-triton chunked-cuda --tokens 8192 1024 --vocab 128256
fi
for md in "$OUT_DIR"/gpu_bench*.md "$OUT_DIR"/rollout_cuda.md "$OUT_DIR"/optim_cuda.md; do
  [ -f "$md" ] && tee -a "$LOG" < "$md"
done

if [ ${#FAILED[@]} -eq 0 ]; then
  say "all steps run passed (capped: ${CAPPED[*]:-none}; skipped: ${SKIPPED[*]:-none}); results in ${PACK_TO:-$OUT_DIR}"
  exit 0
fi
say "failed steps: ${FAILED[*]}; results (partial) in ${PACK_TO:-$OUT_DIR}"
exit 1
