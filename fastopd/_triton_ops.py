"""The chunked-mode Triton row kernel as a `torch.library` custom op, so that torch.compile keeps it whole.

Dynamo does not trace the launcher (its Python, the launch, the interpreter on the CPU): the op is opaque in the
graph, described by its mutated arguments and a fake implementation, as the C++/CUDA ops registered in
csrc/ops.cpp are. Eager calls go through the same op (the custom-op dispatch costs some 20 us per chunk, against
a chunk's milliseconds of GEMMs). Imported only when the dispatch loads the Triton backend (it imports triton).
"""

from __future__ import annotations

import torch

from fastopd.kernels import divergence as _kernels


@torch.library.custom_op("fastopd::triton_divergence_chunk_", mutates_args=("xs", "loss", "stats"))
def _divergence_chunk_op(xs: torch.Tensor, xt: torch.Tensor, labels: torch.Tensor | None, loss: torch.Tensor,
                         stats: torch.Tensor, divergence: int, beta: float, temperature: float, softcap: float,
                         soft_weight: float, hard_weight: float, ignore_index: int, compute_grad: bool,
                         hard_ratio: float, block_v: int, num_warps: int) -> None:
    _kernels.divergence_chunk_(xs, xt, labels, loss, stats, divergence, beta, temperature, softcap, soft_weight,
                               hard_weight, ignore_index, compute_grad, hard_ratio,
                               block_v=block_v or None, num_warps=num_warps or None)


@_divergence_chunk_op.register_fake
def _divergence_chunk_fake(xs, xt, labels, loss, stats, divergence, beta, temperature, softcap, soft_weight,
                           hard_weight, ignore_index, compute_grad, hard_ratio, block_v, num_warps) -> None:
    return None


def divergence_chunk_(xs: torch.Tensor, xt: torch.Tensor, labels: torch.Tensor | None, loss: torch.Tensor,
                      stats: torch.Tensor, divergence: int, beta: float, temperature: float, softcap: float,
                      soft_weight: float, hard_weight: float, ignore_index: int, compute_grad: bool,
                      hard_ratio: float = 1.0, *, block_v: int | None = None, num_warps: int | None = None) -> None:
    """`fastopd.kernels.divergence.divergence_chunk_` (same arguments and effects) through the custom op."""
    _divergence_chunk_op(xs, xt, labels, loss, stats, int(divergence), float(beta), float(temperature),
                         float(softcap), float(soft_weight), float(hard_weight), int(ignore_index),
                         bool(compute_grad), float(hard_ratio), int(block_v or 0), int(num_warps or 0))
