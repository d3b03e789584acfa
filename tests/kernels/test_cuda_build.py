"""CUDA sources compile for sm_90 with nvcc against this torch, so they cannot rot unseen on machines without a GPU.

Each csrc/cuda/*.cu is compiled to an object file with the flags setup.py's CUDA build uses (torch's nvcc flags,
-O3 --use_fast_math, sm_90), with ptxas asked to report register use, and the report is checked for spills.
Skips with a clear message when no CUDA toolkit (nvcc) is found (set CUDA_HOME to the toolkit root to run it) or when
torch is a CPU build, which ships no CUDA headers.
Running the kernels needs a GPU: tests/kernels/test_triton_divergence.py covers backend "cuda" there.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")))


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "nvcc")
    return cand if os.path.exists(cand) else shutil.which("nvcc")


def _include_dirs(nvcc: str) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    dirs = include_paths()
    dirs.append(str(Path(nvcc).resolve().parents[1] / "include"))
    dirs.append(sysconfig.get_paths()["include"])
    # pip-installed CUDA wheels put the library headers (cusparse.h, ...) beside torch rather than in the toolkit.
    dirs += glob.glob(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "*", "include"))
    return dirs


@pytest.mark.skipif(not SOURCES, reason="no CUDA sources under csrc/cuda")
@pytest.mark.parametrize("source", SOURCES, ids=[os.path.basename(s) for s in SOURCES])
def test_cuda_source_compiles_for_sm90(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no CUDA toolkit found (nvcc not under $CUDA_HOME/bin nor on PATH): set CUDA_HOME to compile "
                    "csrc/cuda for sm_90")
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU build (torch.version.cuda is None): it ships no CUDA headers "
                    "(c10/cuda), so csrc/cuda cannot compile against it; install a CUDA build of torch")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    cmd = [nvcc, "-c", source, "-o", str(tmp_path / "out.o"), "-std=c++20", "-O3", "--use_fast_math",
           "-gencode=arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC", "-Xptxas", "-v",
           "-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *COMMON_NVCC_FLAGS, *[f"-I{d}" for d in _include_dirs(nvcc)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{log[-6000:]}"
    assert (tmp_path / "out.o").stat().st_size > 0
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills and max(spills) == 0, f"register spills in {os.path.basename(source)}:\n{log[-3000:]}"
    regs = [int(n) for n in re.findall(r"Used (\d+) registers", log)]
    assert regs and max(regs) <= 128, f"a kernel uses {max(regs)} registers (launch bound 512 threads allows 128)"
