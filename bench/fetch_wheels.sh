#!/usr/bin/env bash
# Downloads, into .whl/ at the repository root, the wheels the GPU suite installs on a machine without network:
# the Python packages such a machine lacks (liger-kernel, the benchmark's peer). Run it where pip reaches an index.
#
#   bash bench/fetch_wheels.sh                   # for CPython 3.12 (the lent H200's python3)
#   PY_VERSION=3.11 bash bench/fetch_wheels.sh   # another target interpreter
#
# Then carry .whl with the checkout (it is git-ignored) and run `bash bench/gpu_suite.sh` there, with the commit
# written into the command (.git may not travel): the last line printed is that command.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
PY_VERSION="${PY_VERSION:-3.12}"
LIGER="${LIGER_VERSION:-0.8.5}"  # the version the CPU benchmarks and tests of this checkout ran against
mkdir -p "$ROOT/.whl"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d "$ROOT/.whl" "liger-kernel==$LIGER"
ls -l "$ROOT/.whl"
echo "device command: FASTOPD_COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown) bash bench/gpu_suite.sh --budget 540"
