"""Loads the optional C++/CUDA operator library `fastopd._C` and registers fake (meta) kernels for its
operators so that torch.compile can trace through them.

Every C++/CUDA operator schema is declared in csrc/ops.cpp; its fake lives here.
"""

from __future__ import annotations

import torch

try:
    import fastopd._C  # noqa: F401  (loading the library registers torch.ops.fastopd.*; "No module named" if absent)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # no compiler at install time, or built against another torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when `torch.ops.fastopd.<op>` exists and has a kernel for `dispatch_key` ("CPU", "CUDA")."""
    if LOAD_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastopd::{op}", dispatch_key)


if LOAD_ERROR is None:

    @torch.library.register_fake("fastopd::divergence_chunk_")
    def _divergence_chunk_fake(xs, xt, labels, loss, stats, divergence, beta, temperature, softcap,
                               soft_weight, hard_weight, ignore_index, compute_grad, hard_ratio=1.0) -> None:
        return None

if LOAD_ERROR is None:

    @torch.library.register_fake("fastopd::sparse_adamw_step_")
    def _sparse_adamw_step_fake(params, grads, indices, exp_avgs, exp_avg_sqs, masters, swallowed, step_sizes,
                                bias_correction2_sqrts, lr, beta1, beta2, eps, weight_decay) -> None:
        return None

if LOAD_ERROR is None:

    @torch.library.register_fake("fastopd::decode_linear_")
    def _decode_linear_fake(out, x, panels, bias, accumulate) -> None:
        return None
