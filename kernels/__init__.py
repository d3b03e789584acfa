"""Triton kernels of fastopd (installed as `fastopd.kernels`). They know nothing of autograd or dispatch."""

from __future__ import annotations

import functools

import torch


def _first_tensor(args) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    return None


def on_tensor_device(launcher):
    """Runs a kernel launcher with its first tensor argument's CUDA device current. Triton launches on the current
    device and its current stream, not on the tensors' device: with tensors on cuda:1 while cuda:0 is current, the
    kernel would run on the wrong GPU, unordered with the work around it. A no-op for CPU tensors (interpreter).

    The launcher is also left out of torch.compile's tracing (`torch.compiler.disable`: a graph break). Its host
    code (device address tables, cached block maps, the interpreter on the CPU, where Dynamo fails inside the
    launch) is not written to be traced; a launcher a graph must keep whole is registered as a custom op instead
    (fastopd/_triton_ops.py)."""

    @torch.compiler.disable
    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        t = _first_tensor(args)
        if t is None or not t.is_cuda:
            return launcher(*args, **kwargs)
        with torch.cuda.device(t.device):
            return launcher(*args, **kwargs)

    return launch
