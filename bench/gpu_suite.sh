#!/usr/bin/env bash
# The one command a GPU machine runs (no network needed): installs fastopd from this checkout, builds the CUDA
# extension, then benchmarks and tests in order of value, and writes everything to one folder for committing
# under bench/results/.
#
#   bash bench/gpu_suite.sh                 # everything
#   bash bench/gpu_suite.sh --budget 540    # time-boxed: steps in order of value, none started past the budget
#   bash bench/gpu_suite.sh --quick         # benchmark only N=1024 and N=8192 at V=128256
#   bash bench/gpu_suite.sh --skip-tests    # install + benchmarks
#   bash bench/gpu_suite.sh --dry-run       # on any machine: check the script and the benchmark harness (CPU)
#   bash bench/gpu_suite.sh --help
#
# Order: install + CUDA build; the loss benchmark (bench/gpu_bench.py, extremes of the grid first); the real-shape
# GPU tests (tests/kernels/test_gpu_shapes.py); the rollout benchmark (CUDA graphs); the other GPU tests; the
# sparse AdamW benchmark; the loss benchmark at 256-row chunks. With --budget each step is killed at the
# deadline and a step with too little time left is skipped (status.txt says which).
# Wheels the machine lacks (liger-kernel, ...) travel in .whl/ at the repository root and are installed with
# --no-index --no-deps. Environment: PYTHON (default python3), CUDA_HOME (default: from nvcc on PATH, else
# /usr/local/cuda), FASTOPD_CUDA_ARCHS (default 9.0), MAX_JOBS (ninja parallel compiles).
# Outputs: bench/results/, or with $OUT set (the device tool, which takes back at most 8 files) a folder whose
# files are packed into $OUT/gpu_suite_results.tar.gz beside copies of gpu_suite.log, status.txt and the tables.
set -uo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }

DRY=0 QUICK=0 TESTS=1 BENCH=1 BUDGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    --skip-tests) TESTS=0 ;;
    --skip-bench) BENCH=0 ;;
    --budget)
      shift
      case "${1:-}" in ''|*[!0-9]*) echo "gpu_suite: --budget needs whole seconds, got '${1:-}'" >&2; exit 2 ;; esac
      BUDGET="$1" ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_suite: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-$(command -v python3 || command -v python)}"
START=$SECONDS
RESERVE=20  # seconds kept back for packing the results
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
FAILED=() SKIPPED=()

say() { echo "[gpu_suite $(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }
left() {  # seconds left before the deadline (a large number without --budget)
  if [ -z "$BUDGET" ]; then echo 999999; else echo $((BUDGET - RESERVE - (SECONDS - START))); fi
}
step() {  # step NAME MIN_SECONDS COMMAND...: runs, logs, records failure or skip without stopping the suite
  local name="$1" need="$2"; shift 2
  local t; t=$(left)
  if [ "$t" -lt "$need" ]; then say "-- $name: skipped (${t}s left, needs ${need}s)"; SKIPPED+=("$name"); return 0; fi
  say "== $name: $*"
  local rc=0
  if [ -n "$BUDGET" ]; then timeout -k 10 "$t" "$@" >>"$LOG" 2>&1 || rc=$?; else "$@" >>"$LOG" 2>&1 || rc=$?; fi
  if [ "$rc" = 0 ]; then say "   $name: ok"
  elif [ -n "$BUDGET" ] && { [ "$rc" = 124 ] || [ "$rc" = 137 ]; }; then say "   $name: stopped at the deadline"; FAILED+=("$name (deadline)")
  else say "   $name: FAILED rc=$rc (see $LOG)"; FAILED+=("$name"); fi
}
finish() {  # writes status.txt; with $OUT set, packs the folder into at most 8 files there
  {
    echo "failed: ${FAILED[*]:-none}"
    echo "skipped: ${SKIPPED[*]:-none}"
    echo "elapsed_s: $((SECONDS - START))"
  } > "$OUT_DIR/status.txt"
  if [ -n "$PACK_TO" ]; then
    mkdir -p "$PACK_TO"
    tar -C "$OUT_DIR" -czf "$PACK_TO/gpu_suite_results.tar.gz" . 2>/dev/null
    cp "$OUT_DIR/gpu_suite.log" "$OUT_DIR/status.txt" "$PACK_TO"/ 2>/dev/null
    for md in gpu_bench.md rollout_cuda.md optim_cuda.md gpu_bench_chunk256.md; do
      [ -f "$OUT_DIR/$md" ] && cp "$OUT_DIR/$md" "$PACK_TO"/
    done
  fi
}
trap finish EXIT

if [ "$DRY" = 1 ]; then
  say "dry run: checking syntax and the benchmark harness on the CPU; outputs in $OUT_DIR"
  step "bash syntax" 0 bash -n "$0"
  step "bench harness (CPU, tiny shapes)" 0 "$PY" bench/gpu_bench.py --dry-run --out "$OUT_DIR"
  step "python syntax" 0 "$PY" -m py_compile bench/gpu_bench.py
  [ ${#FAILED[@]} -eq 0 ] && say "dry run ok" && exit 0
  say "dry run failed: ${FAILED[*]}"; exit 1
fi

# --- 1. The machine ------------------------------------------------------------------------------------------
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  uname -a
  nvidia-smi 2>&1 || echo "nvidia-smi unavailable"
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], sys.executable); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  "$PY" -c "import transformers; print('transformers', transformers.__version__)" 2>&1
  git -C "$ROOT" rev-parse HEAD 2>/dev/null && git -C "$ROOT" status --short 2>/dev/null | head -20
} > "$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt" >> "$LOG"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA device visible: this suite needs a GPU (use --dry-run elsewhere)"
  FAILED+=("no CUDA device")
  exit 2
fi

# --- 2. Install offline (the editable install compiles fastopd._C with the CUDA kernel in place) ---------------
if [ -z "${CUDA_HOME:-}" ]; then
  if command -v nvcc >/dev/null 2>&1; then CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"; else CUDA_HOME=/usr/local/cuda; fi
fi
export CUDA_HOME FASTOPD_BUILD_CUDA=1 FASTOPD_CUDA_ARCHS="${FASTOPD_CUDA_ARCHS:-9.0}" PIP_NO_INDEX=1
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}" PYTHONUNBUFFERED=1
say "python=$PY CUDA_HOME=$CUDA_HOME FASTOPD_CUDA_ARCHS=$FASTOPD_CUDA_ARCHS budget=${BUDGET:-none}"
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  step "install travelling wheels" 0 "$PY" -m pip install -q --no-index --no-deps "$ROOT"/.whl/*.whl
else
  say "no .whl/ folder: installing no extra wheels (Liger-Kernel is benchmarked only if already installed)"
fi
step "pip install -e (FASTOPD_BUILD_CUDA=1)" 0 "$PY" -m pip install --no-index --no-build-isolation --no-deps -e "$ROOT"
CHECK_CUDA="
import torch, fastopd._ops as o
assert o.LOAD_ERROR is None, o.LOAD_ERROR
assert o.has_kernel('divergence_chunk_', 'CUDA'), 'fastopd._C has no CUDA kernel for divergence_chunk_'
print('fastopd::divergence_chunk_ has a CUDA kernel')"
if ! "$PY" -c "$CHECK_CUDA" >>"$LOG" 2>&1; then  # rebuild in place, verbosely, to log why
  step "build fastopd._C in place with CUDA (the install's build has no CUDA kernel)" 0 "$PY" setup.py build_ext --inplace
fi
step "CUDA kernel registered" 0 "$PY" -c "$CHECK_CUDA"
if ! "$PY" -c "import fastopd.kernels.divergence" >>"$LOG" 2>&1; then
  say "fastopd.kernels does not import from the editable install: the Triton backends are unusable"
  FAILED+=("import fastopd.kernels")
fi
"$PY" -m fastopd.cli doctor > "$OUT_DIR/doctor.txt" 2>&1
cat "$OUT_DIR/doctor.txt" >> "$LOG"

# --- 3. Benchmarks and tests, in order of value -----------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)
if [ "$BENCH" = 1 ]; then
  BENCH_ARGS=(--out "$OUT_DIR")
  [ "$QUICK" = 1 ] && BENCH_ARGS+=(--tokens 1024 8192 --vocab 128256)
  # Start no new shape once 45% of what is left is spent: the tests and the rollout benchmark come next.
  [ -n "$BUDGET" ] && BENCH_ARGS+=(--time-budget $(( $(left) * 45 / 100 )))
  step "loss benchmark" 60 "$PY" bench/gpu_bench.py "${BENCH_ARGS[@]}"
fi
if [ "$TESTS" = 1 ]; then
  step "GPU tests at real shapes" 45 "${PYTEST[@]}" tests/kernels/test_gpu_shapes.py --junitxml="$OUT_DIR/pytest_gpu_shapes.xml"
fi
if [ "$BENCH" = 1 ] && [ "$QUICK" = 0 ]; then
  # Time-boxed: 3 interleaved rounds instead of 5 (HF's static cache compiles its decode step once, in warm-up).
  ROUNDS="${FASTOPD_BENCH_ROUNDS:-$([ -n "$BUDGET" ] && echo 3 || echo 5)}"
  step "rollout benchmark (CUDA, bf16, CUDA graphs)" 60 env OUT="$OUT_DIR" FASTOPD_BENCH_ROUNDS="$ROUNDS" \
    "${PYTEST[@]}" bench/test_rollout_bench.py -k "cuda or write_results"
fi
if [ "$TESTS" = 1 ]; then
  # Without the files that need no GPU (ahead-of-time compiles, the CUDA emulation, this suite's own checks):
  # CI runs those, and here they would only spend the lease.
  NO_GPU_NEEDED=(tests/kernels/test_gpu_shapes.py tests/kernels/test_cuda_build.py tests/kernels/test_cuda_emulation.py
                 tests/kernels/test_triton_sm90_compile.py tests/kernels/test_gpu_suite.py
                 tests/optim/test_sparse_adamw_sm90.py)
  step "GPU tests (tests/kernels, tests/losses, tests/optim, tests/rollout)" 60 "${PYTEST[@]}" tests/kernels \
    tests/losses tests/optim tests/rollout "${NO_GPU_NEEDED[@]/#/--ignore=}" --junitxml="$OUT_DIR/pytest_gpu.xml"
fi
if [ "$BENCH" = 1 ] && [ "$QUICK" = 0 ]; then
  step "sparse AdamW benchmark (CUDA)" 30 env OUT="$OUT_DIR" "${PYTEST[@]}" bench/test_optim_bench.py -k "cuda or write_results"
  # The chunked providers again with 256-row chunks (the default 1 GiB budget gives ~1k rows at V = 128k):
  # shows how much the chunk size matters on this GPU (grad_W GEMM depth, programs per SM).
  step "loss benchmark, chunked at 256 rows" 60 "$PY" bench/gpu_bench.py --out "$OUT_DIR" --tag chunk256 \
    --chunk-size 256 --providers chunked-triton chunked-cuda gemm_floor --tokens 1024 8192 --vocab 128256
fi
for md in "$OUT_DIR"/gpu_bench*.md "$OUT_DIR"/rollout_cuda.md "$OUT_DIR"/optim_cuda.md; do
  [ -f "$md" ] && tee -a "$LOG" < "$md"
done

if [ ${#FAILED[@]} -eq 0 ]; then
  say "all steps run passed (skipped: ${SKIPPED[*]:-none}); results in ${PACK_TO:-$OUT_DIR}"
  exit 0
fi
say "failed steps: ${FAILED[*]}; results (partial) in ${PACK_TO:-$OUT_DIR}"
exit 1
