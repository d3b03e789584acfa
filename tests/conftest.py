"""Test-wide setup. Triton kernels run on the CPU under the interpreter when no GPU is visible; the
variable must be set before any module decorates a kernel with @triton.jit, hence here."""

import os
import sys
from pathlib import Path

import torch

# The repository's kernels/ (installed as fastopd.kernels) is a package named `kernels` at the repository root,
# which `python -m pytest` puts on sys.path: there it shadows Hugging Face's `kernels` package, which transformers
# >= 5.25 imports (ImportError: cannot import name 'CUDAProperties' from 'kernels'). fastopd itself is imported
# through its installation, so the root is not needed on the path.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
