"""Torch reference (and fallback) for the sparse-masked AdamW step.

The kernel contract shared by every backend (torch here, C++ in csrc/cpu/sparse_adamw.cpp, Triton in
kernels/sparse_adamw.py), one call per parameter group:

    sparse_adamw_step_(params, grads, indices, exp_avgs, exp_avg_sqs, masters, swallowed,
                       step_sizes, bias_correction2_sqrts, lr, beta1, beta2, eps, weight_decay) -> None

- params[i]: contiguous float32/bfloat16/float16 tensor, updated in place at its selected coordinates only.
- grads[i]: contiguous tensor of params[i]'s shape and dtype.
- indices[i]: sorted, unique int32/int64 flat indices [k_i], or None for "every coordinate" (k_i = numel).
- exp_avgs[i], exp_avg_sqs[i]: float32 [k_i]; masters[i]: float32 [k_i] or None (then the update is computed
  from the stored value in float32 and rounded back to the parameter's dtype).
- swallowed[i]: int64 0-dim counter or None; when given, the kernel adds the number of coordinates whose update
  was non-zero in float32 but would have left the bf16/fp16 stored value unchanged without master weights,
  i.e. round(stored + (new - old)) == stored, where old/new are the float32 values before/after the step.
- step_sizes[i] = lr / (1 - beta1**t_i), bias_correction2_sqrts[i] = sqrt(1 - beta2**t_i), computed in double on
  the host exactly as torch.optim.AdamW does.

Per selected coordinate, in torch.optim.AdamW's order and with its float32 roundings:
    p = p * (1 - lr*wd)                      (only when wd != 0)
    m = lerp(m, g, 1 - beta1)                (torch's lerp: fma(w, g - m, m) for w < 0.5)
    v = fma((1 - beta2) * g, g, v * beta2)   (mul_ then addcmul_)
    d = sqrt(v) / bias_correction2_sqrt + eps
    p = p + (-step_size * m) / d             (addcdiv_)
"""

from __future__ import annotations

import torch


def sparse_adamw_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    indices: list[torch.Tensor | None],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    masters: list[torch.Tensor | None],
    swallowed: list[torch.Tensor | None],
    step_sizes: list[float],
    bias_correction2_sqrts: list[float],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """The sparse AdamW step with torch ops on compact (gathered) tensors; see the module docstring."""
    for i, param in enumerate(params):
        flat = param.view(-1)
        idx = indices[i]
        m, v, master = exp_avgs[i], exp_avg_sqs[i], masters[i]
        g = grads[i].view(-1)
        if idx is not None:
            g = g.index_select(0, idx)
        g = g.float()
        if master is not None:
            p = master
        elif idx is None and param.dtype == torch.float32:
            p = flat  # in place on the parameter itself
        else:
            p = (flat if idx is None else flat.index_select(0, idx)).float()
        counter = swallowed[i]
        old = p.clone() if counter is not None else None

        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrts[i]).add_(eps)
        p.addcdiv_(m, denom, value=-step_sizes[i])

        if counter is not None:
            stored = flat if idx is None else flat.index_select(0, idx)
            moved = (stored.float() + (p - old)).to(param.dtype)
            counter.add_(((p != old) & (moved == stored)).sum())
        if p is flat:
            continue
        if idx is None:
            flat.copy_(p)
        else:
            flat.index_put_((idx,), p.to(param.dtype))
