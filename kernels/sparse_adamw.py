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
_foreach_sqrt/_div_/_add_, _foreach_addcdiv_), whose pointwise functors compute a + alpha * op(b, c).

One launch covers every tensor of a group that shares a variant (parameter dtype, index dtype, masters, counter;
usually all of them): a per-tensor table of raw addresses and sizes, and a block map (tensor, first coordinate)
with one entry per program. Each program handles BLOCK selected coordinates of one tensor: a coalesced read of
idx/m/v/master, a gather of grad/param (sorted indices, so neighbouring lanes hit neighbouring cache lines), and
the scatter of param. Nothing is synchronized with the host: the tables are copied to the device asynchronously,
the block map is cached per mask layout, and the swallowed-update count is an atomic add on the device.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from fastopd.kernels import on_tensor_device

BLOCK = 1024
# Per-tensor address table columns: param, grad, idx, m, v, master, counter addresses, then k.
_COLS = 8


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
    table_ptr, coef_ptr, block_tensor_ptr, block_start_ptr, param_like_ptr, index_like_ptr,
    decay, w, beta2, one_minus_beta2, eps,
    HAS_INDEX: tl.constexpr, HAS_MASTER: tl.constexpr, COUNT: tl.constexpr, DECAY: tl.constexpr,
    W_SMALL: tl.constexpr, IS_BF16: tl.constexpr, COLS: tl.constexpr, BLOCK: tl.constexpr,
):
    # param_like_ptr / index_like_ptr are never dereferenced: their pointer types are those of every parameter /
    # index tensor of this launch, to which the table's raw addresses are cast.
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid).to(tl.int64)
    start = tl.load(block_start_ptr + pid)
    row = table_ptr + t * COLS
    param_ptr = tl.load(row + 0).to(param_like_ptr.dtype)
    grad_ptr = tl.load(row + 1).to(param_like_ptr.dtype)
    m_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    k = tl.load(row + 7)
    neg_step_size = tl.load(coef_ptr + 2 * t)
    bc2_sqrt = tl.load(coef_ptr + 2 * t + 1)

    offs = start + tl.arange(0, BLOCK)
    ok = offs < k
    if HAS_INDEX:
        idx_ptr = tl.load(row + 2).to(index_like_ptr.dtype)
        i = tl.load(idx_ptr + offs, mask=ok, other=0).to(tl.int64)
    else:
        i = offs
    g = tl.load(grad_ptr + i, mask=ok, other=0.0).to(tl.float32)
    stored = tl.load(param_ptr + i, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASTER:
        master_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
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
    out = _round_to(p, param_like_ptr.dtype.element_ty, IS_BF16)
    if COUNT:
        count_ptr = tl.load(row + 6).to(tl.pointer_type(tl.int64))
        moved = _round_to(stored + (p - old), param_like_ptr.dtype.element_ty, IS_BF16).to(tl.float32)
        hit = ok & (p != old) & (moved == stored)
        tl.atomic_add(count_ptr, tl.sum(hit.to(tl.int64), axis=0))
    tl.store(param_ptr + i, out, mask=ok)


@functools.lru_cache(maxsize=64)
def _block_map(device: torch.device, sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor number int32, first coordinate int64) of each program, for tensors of `sizes` selected coordinates.
    Cached: the masks, hence the sizes, are fixed for the life of an optimizer."""
    owner, start = [], []
    for t, k in enumerate(sizes):
        for b in range(0, k, BLOCK):
            owner.append(t)
            start.append(b)
    return (torch.tensor(owner, dtype=torch.int32).to(device), torch.tensor(start, dtype=torch.int64).to(device))


@on_tensor_device
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
    """One launch per variant of the group's tensors; arguments as in fastopd/optim/reference.py."""
    variants: dict[tuple, list[int]] = {}
    for n, param in enumerate(params):
        idx = indices[n]
        k = param.numel() if idx is None else idx.numel()
        if k == 0:
            continue
        key = (param.device, param.dtype, None if idx is None else idx.dtype, masters[n] is not None,
               swallowed[n] is not None)
        variants.setdefault(key, []).append(n)
    w = 1.0 - beta1
    for (device, dtype, index_dtype, has_master, count), members in variants.items():
        rows, coefs, sizes = [], [], []
        for n in members:
            idx, master, counter = indices[n], masters[n], swallowed[n]
            k = params[n].numel() if idx is None else idx.numel()
            rows.append([params[n].data_ptr(), grads[n].data_ptr(), 0 if idx is None else idx.data_ptr(),
                         exp_avgs[n].data_ptr(), exp_avg_sqs[n].data_ptr(),
                         0 if master is None else master.data_ptr(), 0 if counter is None else counter.data_ptr(), k])
            coefs.append([-step_sizes[n], bias_correction2_sqrts[n]])
            sizes.append(k)
        # Host tables go to the device asynchronously (pageable memory is staged at once; no device sync).
        table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        coef = torch.tensor(coefs, dtype=torch.float32).to(device, non_blocking=True)
        block_tensor, block_start = _block_map(device, tuple(sizes))
        first = members[0]
        _sparse_adamw_kernel[(block_tensor.numel(),)](
            table, coef, block_tensor, block_start, params[first],
            indices[first] if index_dtype is not None else block_start,
            1.0 - lr * weight_decay, w, beta2, 1.0 - beta2, eps,
            HAS_INDEX=index_dtype is not None, HAS_MASTER=has_master, COUNT=count, DECAY=weight_decay != 0,
            W_SMALL=abs(w) < 0.5, IS_BF16=dtype == torch.bfloat16, COLS=_COLS, BLOCK=BLOCK,
        )
