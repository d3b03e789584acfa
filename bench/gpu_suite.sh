#!/usr/bin/env bash
# The one command a GPU machine runs (no network needed): installs fastopd from this checkout, builds the CUDA
# extension, runs the GPU tests, then the GPU benchmark at the published shapes, and writes everything to one
# folder ($OUT when set, else bench/results/) for committing under bench/results/.
#
#   bash bench/gpu_suite.sh                 # everything
#   bash bench/gpu_suite.sh --quick         # benchmark only N=1024 and N=8192 at V=128256
#   bash bench/gpu_suite.sh --skip-tests    # install + benchmark
#   bash bench/gpu_suite.sh --dry-run       # on any machine: check the script and the benchmark harness (CPU)
#   bash bench/gpu_suite.sh --help
#
# Wheels the machine lacks (liger-kernel, ...) travel in .whl/ at the repository root and are installed with
# --no-index --no-deps. Environment: CUDA_HOME (default: from nvcc on PATH, else /usr/local/cuda),
# FASTOPD_CUDA_ARCHS (default 9.0), MAX_JOBS (ninja parallel compiles).
# Outputs: gpu_suite.log, environment.txt, doctor.txt, pytest_gpu.xml, gpu_bench.json/.md,
# gpu_bench_chunk256.json/.md, status.txt.
set -uo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

DRY=0 QUICK=0 TESTS=1 BENCH=1
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    --skip-tests) TESTS=0 ;;
    --skip-bench) BENCH=0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_suite: unknown option $arg" >&2; usage >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT_DIR="${OUT:-$ROOT/bench/results}"
PY="${PYTHON:-python}"
if [ "$DRY" = 1 ]; then
  OUT_DIR="$(mktemp -d -t fastopd_gpu_suite_dry.XXXXXX)"
fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_suite.log"
: > "$LOG"
FAILED=()

say() { echo "[gpu_suite $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
step() {  # step NAME COMMAND...: runs, logs, records failure without stopping the suite
  local name="$1"; shift
  say "== $name: $*"
  if "$@" >>"$LOG" 2>&1; then say "   $name: ok"; else say "   $name: FAILED (see $LOG)"; FAILED+=("$name"); fi
}

if [ "$DRY" = 1 ]; then
  say "dry run: checking syntax and the benchmark harness on the CPU; outputs in $OUT_DIR"
  step "bash syntax" bash -n "$0"
  step "bench harness (CPU, tiny shapes)" "$PY" bench/gpu_bench.py --dry-run --out "$OUT_DIR"
  step "python syntax" "$PY" -m py_compile bench/gpu_bench.py
  printf '%s\n' "${FAILED[@]:-}" > "$OUT_DIR/status.txt"
  [ ${#FAILED[@]} -eq 0 ] && say "dry run ok" && exit 0
  say "dry run failed: ${FAILED[*]}"; exit 1
fi

# --- 1. The machine ------------------------------------------------------------------------------------------
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  uname -a
  nvidia-smi 2>&1 || echo "nvidia-smi unavailable"
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  git -C "$ROOT" rev-parse HEAD 2>/dev/null && git -C "$ROOT" status --short 2>/dev/null | head -20
} > "$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt" >> "$LOG"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA device visible: this suite needs a GPU (use --dry-run elsewhere)"
  exit 2
fi

# --- 2. Install offline ---------------------------------------------------------------------------------------
if [ -z "${CUDA_HOME:-}" ]; then
  if command -v nvcc >/dev/null 2>&1; then CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"; else CUDA_HOME=/usr/local/cuda; fi
fi
export CUDA_HOME FASTOPD_BUILD_CUDA=1 FASTOPD_CUDA_ARCHS="${FASTOPD_CUDA_ARCHS:-9.0}" PIP_NO_INDEX=1
say "CUDA_HOME=$CUDA_HOME FASTOPD_CUDA_ARCHS=$FASTOPD_CUDA_ARCHS"
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  step "install travelling wheels" "$PY" -m pip install --no-index --no-deps "$ROOT"/.whl/*.whl
else
  say "no .whl/ folder: installing no extra wheels (Liger-Kernel is benchmarked only if already installed)"
fi
step "pip install -e (FASTOPD_BUILD_CUDA=1)" "$PY" -m pip install --no-index --no-build-isolation --no-deps -e "$ROOT"
step "build fastopd._C in place with CUDA" "$PY" setup.py build_ext --inplace
step "CUDA kernel registered" "$PY" -c "
import torch, fastopd._ops as o
assert o.LOAD_ERROR is None, o.LOAD_ERROR
assert o.has_kernel('divergence_chunk_', 'CUDA'), 'fastopd._C has no CUDA kernel for divergence_chunk_'
print('fastopd::divergence_chunk_ has a CUDA kernel')"
if ! "$PY" -c "import fastopd.kernels.divergence" >>"$LOG" 2>&1; then
  say "fastopd.kernels does not import from the editable install: the Triton backends are unusable"
  FAILED+=("import fastopd.kernels")
fi
"$PY" -m fastopd.cli doctor > "$OUT_DIR/doctor.txt" 2>&1 || "$PY" -c "from fastopd import cli; cli.main(['doctor'])" > "$OUT_DIR/doctor.txt" 2>&1
cat "$OUT_DIR/doctor.txt" >> "$LOG"

# --- 3. GPU tests ---------------------------------------------------------------------------------------------
if [ "$TESTS" = 1 ]; then
  step "GPU tests (tests/kernels, tests/losses, tests/optim, tests/rollout)" "$PY" -m pytest tests/kernels tests/losses tests/optim tests/rollout -q -rs \
    --junitxml="$OUT_DIR/pytest_gpu.xml" -p no:cacheprovider
fi

# --- 4. Benchmark ---------------------------------------------------------------------------------------------
if [ "$BENCH" = 1 ]; then
  if [ "$QUICK" = 1 ]; then
    step "GPU benchmark (quick)" "$PY" bench/gpu_bench.py --out "$OUT_DIR" --tokens 1024 8192 --vocab 128256
  else
    step "GPU benchmark" "$PY" bench/gpu_bench.py --out "$OUT_DIR"
    # The chunked providers again with 256-row chunks (the default 1 GiB budget gives ~1k rows at V = 128k):
    # shows how much the chunk size matters on this GPU (grad_W GEMM depth, programs per SM).
    step "GPU benchmark, chunked at 256 rows" "$PY" bench/gpu_bench.py --out "$OUT_DIR" --tag chunk256 \
      --chunk-size 256 --providers chunked-triton chunked-cuda gemm_floor
    step "sparse AdamW benchmark (CUDA)" "$PY" -m pytest bench/test_optim_bench.py -q -p no:cacheprovider
    step "rollout benchmark (CUDA, bf16, CUDA graphs)" "$PY" -m pytest bench/test_rollout_bench.py -q -p no:cacheprovider
    cp "$ROOT"/bench/results/optim_cuda.* "$ROOT"/bench/results/rollout_cuda.* "$OUT_DIR"/ 2>/dev/null || true
  fi
  for md in "$OUT_DIR"/gpu_bench*.md; do [ -f "$md" ] && tee -a "$LOG" < "$md"; done
fi

printf '%s\n' "${FAILED[@]:-}" > "$OUT_DIR/status.txt"
if [ ${#FAILED[@]} -eq 0 ]; then
  say "all steps passed; results in $OUT_DIR"
  exit 0
fi
say "failed steps: ${FAILED[*]}; results (partial) in $OUT_DIR"
exit 1
