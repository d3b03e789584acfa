"""Backend entry points of the sparse AdamW step (see fastopd/optim/reference.py for the contract)."""

from __future__ import annotations

import torch


def sparse_adamw_step_cpu(params, grads, indices, exp_avgs, exp_avg_sqs, masters, swallowed, step_sizes,
                          bias_correction2_sqrts, lr, beta1, beta2, eps, weight_decay) -> None:
    """The C++ OpenMP kernel (csrc/cpu/sparse_adamw.cpp), one call over all tensors of a group. The op takes an
    empty tensor for a missing master/counter (mutable optional lists do not functionalize under torch.compile)."""
    masters = [t if t is not None else torch.empty(0, dtype=torch.float32) for t in masters]
    swallowed = [t if t is not None else torch.empty(0, dtype=torch.int64) for t in swallowed]
    torch.ops.fastopd.sparse_adamw_step_(params, grads, indices, exp_avgs, exp_avg_sqs, masters, swallowed,
                                         step_sizes, bias_correction2_sqrts, lr, beta1, beta2, eps, weight_decay)
