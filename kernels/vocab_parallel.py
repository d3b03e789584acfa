"""Triton phases of the vocab-parallel divergence: the row kernel's passes, one launch each, so that the ranks of a
tensor-parallel group can all-reduce per-row numbers between them (fastopd/distributed/vocab_parallel.py drives
them; `fastopd.distributed.vocab_parallel.torch_phase_` is the reference with the same contract).

Per row of a shard xs, xt [C, V_r] (raw fp32/bf16/fp16 logits of this rank's vocabulary columns):

    phase 1  out fp64 [C, 6] = (max_s, sum exp(z_s - max_s), max_t, sum exp(z_t - max_t),
             sum exp(r (z_s - max_s)) (hard_t only, else 0), z_t at the student's top token (rkl only, else -inf)),
             all of this shard alone;
    phase 2  given info fp32 [C, 8] = (max_s, log S_s, max_t, log S_t, log S_h, pivot, K, -) of the whole row
             (every shard's max and sums combined), out fp32 [C, 3] = this shard's divergence sums
             (fkl KL(t||s); rkl KL(s||t) - pivot; jsd KL(t||m) and KL(s||m)) and sum p_s lp_s; fkl with
             compute_grad also writes dL/dx_s over xs;
    phase 3  (rkl, jsd with compute_grad) given K in info[:, 6] (the row's rkl - pivot, or KL(s||m)), writes dL/dx_s.

y int64 [C] says where each row's label is: a column of this shard (>= 0), elsewhere or no label (-1), or the row
is ignored (-2: its gradient is zeroed, its sums are 0). The hard-label term of the gradient (`hard`) adds
hw (p_h - onehot(y)) with hw = hard_weight (x r under hard_t); its -hw lands only on the shard holding the label.
The math is the single-process row kernel's (kernels/divergence.py), through the same @triton.jit helpers.
Nothing is synchronized with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastopd.kernels import on_tensor_device
from fastopd.kernels.divergence import _row_grad, _row_normalizers, _row_terms, _zero_row, launch_config


@triton.jit
def _vocab_parallel_kernel(
    xs_ptr, xt_ptr, y_ptr, info_ptr, out_ptr,
    V, stride_s, stride_t,
    beta, inv_temp, temperature, softcap, inv_softcap, soft_weight, hw, hard_ratio,
    PHASE: tl.constexpr, DIV: tl.constexpr, HARD: tl.constexpr, HARD_T: tl.constexpr, SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    xs_row = xs_ptr + row * stride_s
    xt_row = xt_ptr + row * stride_t
    y = tl.load(y_ptr + row)

    if PHASE == 1:
        m_s, s_s, m_t, s_t, s_h, top_t = _row_normalizers(xs_row, xt_row, V, inv_temp, softcap, inv_softcap,
                                                          hard_ratio, DIV, HARD_T, SOFTCAP, BLOCK_V)
        out = out_ptr + row * 6
        tl.store(out + 0, m_s.to(tl.float64))
        tl.store(out + 1, s_s)
        tl.store(out + 2, m_t.to(tl.float64))
        tl.store(out + 3, s_t)
        tl.store(out + 4, s_h)
        tl.store(out + 5, top_t.to(tl.float64))
    elif y == -2:  # an ignored row: no sums, zero gradient
        if PHASE == 2:
            three = tl.arange(0, 4)
            tl.store(out_ptr + row * 3 + three, tl.zeros([4], dtype=tl.float32), mask=three < 3)
        if COMPUTE_GRAD and (PHASE == 3 or DIV == 0):
            _zero_row(xs_row, V, BLOCK_V)
    else:
        info = info_ptr + row * 8
        m_s = tl.load(info + 0)
        log_s = tl.load(info + 1)
        m_t = tl.load(info + 2)
        log_t = tl.load(info + 3)
        log_h = tl.load(info + 4)
        pivot = tl.load(info + 5)
        if PHASE == 2:
            acc_a, acc_b, ent = _row_terms(xs_row, xt_row, V, y, m_s, log_s, m_t, log_t, log_h, pivot, beta,
                                           inv_temp, temperature, softcap, inv_softcap, soft_weight, hard_ratio, hw,
                                           DIV, HARD, HARD_T, SOFTCAP, COMPUTE_GRAD and DIV == 0, BLOCK_V)
            tl.store(out_ptr + row * 3 + 0, acc_a)
            tl.store(out_ptr + row * 3 + 1, acc_b)
            tl.store(out_ptr + row * 3 + 2, ent)
        else:
            _row_grad(xs_row, xt_row, V, y, m_s, log_s, m_t, log_t, log_h, pivot, tl.load(info + 6), beta,
                      inv_temp, temperature, softcap, inv_softcap, soft_weight, hard_ratio, hw, DIV, HARD, HARD_T,
                      SOFTCAP, BLOCK_V)


@on_tensor_device
def vocab_parallel_phase_(phase: int, xs: torch.Tensor, xt: torch.Tensor, y: torch.Tensor,
                          info: torch.Tensor | None, out: torch.Tensor | None, divergence: int, beta: float,
                          temperature: float, softcap: float, soft_weight: float, hard_weight: float,
                          hard_ratio: float, hard: bool, compute_grad: bool, *, block_v: int | None = None,
                          num_warps: int | None = None) -> None:
    """One phase of the vocab-parallel row math on this rank's shard, in place (see the module docstring).

    The caller (the vocab-parallel driver) checks shapes and never passes an empty shard."""
    c, v = xs.shape
    if c == 0 or (phase == 3 and (not compute_grad or divergence == 0)):
        return
    block_v, num_warps = launch_config(v, block_v, num_warps)
    use_cap = softcap > 0.0
    hard_t = hard and float(hard_ratio) != 1.0
    _vocab_parallel_kernel[(c,)](
        xs, xt, y, info if info is not None else y, out if out is not None else y,
        v, xs.stride(0), xt.stride(0),
        float(beta), 1.0 / float(temperature), float(temperature), float(softcap),
        1.0 / float(softcap) if use_cap else 0.0, float(soft_weight),
        float(hard_weight) * (float(hard_ratio) if hard_t else 1.0), float(hard_ratio),
        PHASE=int(phase), DIV=int(divergence), HARD=bool(hard), HARD_T=hard_t, SOFTCAP=use_cap,
        COMPUTE_GRAD=bool(compute_grad), BLOCK_V=block_v, num_warps=num_warps,
    )
