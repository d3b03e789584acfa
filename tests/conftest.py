"""Test-wide setup. Triton kernels run on the CPU under the interpreter when no GPU is visible; the
variable must be set before any module decorates a kernel with @triton.jit, hence here."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
