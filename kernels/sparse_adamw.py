"""Triton sparse-masked AdamW step: the default backend for CUDA tensors of `sparse_adamw_step`.

Same contract as the C++ op `torch.ops.fastopd.sparse_adamw_step_` (csrc/cpu/sparse_adamw.cpp) and the torch
reference (fastopd/optim/reference.py). Per selected coordinate j of a parameter (flat index i = idx[j]):

    p = master[j] or float(param[i]);  g = float(grad[i])
    p = p * (1 - lr*wd)                                  (DECAY)
    m = fma(w, g - m, m) for w = 1-b1 < 0.5, else fma(w - 1, g - m, g)
    v = fma(1-b2, g*g, v*b2)
    d = sqrt_rn(v) / sqrt(1 - b2^t) + eps                (correctly rounded sqrt and division)
    p = fma(-step_size, m / d, p)
    master[j] = p;  param[i] = round(p)

The expression forms follow torch's CUDA foreach AdamW (_foreach_lerp_, _foreach_mul_ + _foreach_addcmul_,
_foreach_sqrt/_div_/_add_, _foreach_addcdiv_), whose pointwise functors compute a + alpha * op(b, c). One program
handles BLOCK selected coordinates: a coalesced read of idx/m/v/master, a gather of grad/param (sorted indices,
so neighbouring lanes hit neighbouring cache lines), and the scatter of param. One launch per parameter tensor;
nothing is synchronized with the host (the swallowed-update count is an atomic add on the device).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _round_to(x, dtype, IS_BF16: tl.constexpr):
    """float32 -> dtype, round to nearest even. bf16 by integer rounding of the bit pattern (the same result as
    the hardware conversion for finite values; the interpreter's own bf16 downcast truncates), NaN kept NaN."""
    if IS_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _sparse_adamw_kernel(
    param_ptr, grad_ptr, idx_ptr, m_ptr, v_ptr, master_ptr, count_ptr, k,
    decay, w, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size,
    HAS_INDEX: tl.constexpr, HAS_MASTER: tl.constexpr, COUNT: tl.constexpr, DECAY: tl.constexpr,
    W_SMALL: tl.constexpr, IS_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < k
    if HAS_INDEX:
        i = tl.load(idx_ptr + offs, mask=ok, other=0).to(tl.int64)
    else:
        i = offs
    g = tl.load(grad_ptr + i, mask=ok, other=0.0).to(tl.float32)
    stored = tl.load(param_ptr + i, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASTER:
        old = tl.load(master_ptr + offs, mask=ok, other=0.0)
    else:
        old = stored
    p = old
    if DECAY:
        p = p * decay
    m = tl.load(m_ptr + offs, mask=ok, other=0.0)
    v = tl.load(v_ptr + offs, mask=ok, other=0.0)
    diff = g - m
    if W_SMALL:
        m = tl.fma(w, diff, m)
    else:
        m = tl.fma(w - 1.0, diff, g)
    v = tl.fma(one_minus_beta2, g * g, v * beta2)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = tl.fma(neg_step_size, tl.div_rn(m, denom), p)
    tl.store(m_ptr + offs, m, mask=ok)
    tl.store(v_ptr + offs, v, mask=ok)
    if HAS_MASTER:
        tl.store(master_ptr + offs, p, mask=ok)
    out = _round_to(p, param_ptr.dtype.element_ty, IS_BF16)
    if COUNT:
        moved = _round_to(stored + (p - old), param_ptr.dtype.element_ty, IS_BF16).to(tl.float32)
        hit = ok & (p != old) & (moved == stored)
        tl.atomic_add(count_ptr, tl.sum(hit.to(tl.int64), axis=0))
    tl.store(param_ptr + i, out, mask=ok)


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
    """Launches the kernel once per parameter; arguments as in fastopd/optim/reference.py."""
    w = 1.0 - beta1
    for n, param in enumerate(params):
        idx, master, counter = indices[n], masters[n], swallowed[n]
        k = param.numel() if idx is None else idx.numel()
        if k == 0:
            continue
        m = exp_avgs[n]
        _sparse_adamw_kernel[(triton.cdiv(k, BLOCK),)](
            param, grads[n], idx if idx is not None else m, m, exp_avg_sqs[n],
            master if master is not None else m, counter if counter is not None else m, k,
            1.0 - lr * weight_decay, w, beta2, 1.0 - beta2, bias_correction2_sqrts[n], eps, -step_sizes[n],
            HAS_INDEX=idx is not None, HAS_MASTER=master is not None, COUNT=counter is not None,
            DECAY=weight_decay != 0, W_SMALL=abs(w) < 0.5,
            IS_BF16=param.dtype == torch.bfloat16, BLOCK=BLOCK,
        )
