"""Triton row kernel of the chunked divergence: the default GPU backend of `divergence_chunk`.

Same contract as the C++ op `torch.ops.fastopd.divergence_chunk_` (csrc/cpu/divergence.cpp) and the torch
reference (fastopd/losses/reference.py). Per row r of xs, xt [C, V] (raw fp32 logits after the head GEMMs):

    z = softcap(x) / T,  lse = log sum exp z,  lp = z - lse,  p = exp(lp)
    fkl = sum p_t (lp_t - lp_s)                       dL/dz_s = p_s - p_t
    rkl = sum p_s (lp_s - lp_t)                       dL/dz_s = p_s ((lp_s - lp_t) - rkl)
    jsd = b KL(t||m) + (1-b) KL(s||m), log m = log(b p_t + (1-b) p_s)
                                                      dL/dz_s = (1-b) p_s ((lp_s - log m) - KL(s||m))
    loss = soft_w * div + hard_w * (lse_s - z_s[y]);  the hard term adds hard_w (p_s - onehot(y)).
With a hard-label temperature of its own (HARD_T; r = T / T_hard) the CE is of z_h = r z_s: pass 1 also sums
exp(r (z_s - max_s)) (max(r z_s) = r max_s, r > 0), and the gradient term is hard_w r (p_h - onehot(y)).

One program per row streams the vocabulary in BLOCK_V blocks:
  pass 1  online max / sum-exp of both models (block maxima, rescaled running sums in fp64); for rkl also the
          teacher's z at the student's top token, the pivot that rkl and lp_s - lp_t are taken relative to;
  pass 2  the divergence sums and the entropy with log-probs formed as (z - max) - log(sum), exact near 0
          where z - lse would round them away; for fkl the gradient is written here (p_s - p_t via expm1
          where both are near 1);
  pass 3  (rkl, jsd with a gradient) the gradient, which needs the row's KL from pass 2.
Memory traffic per row (fp32): fkl 2 reads of both rows + 1 write; rkl/jsd 3 reads + 1 write. The gradient
(chain rule through temperature and softcap included) overwrites xs; xt is only read. Ignored rows
(label == ignore_index) get loss 0, stats 0 and, with compute_grad, gradient 0. -inf logits (masked vocab
entries) contribute p = 0 and no NaN. Nothing is synchronized with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastopd.kernels import on_tensor_device

FKL, RKL, JSD = 0, 1, 2
DEFAULT_BLOCK_V = 2048
TINY_P: tl.constexpr = tl.constexpr(1e-30)  # JSD drops terms of smaller probability, as the C++ kernel does


@triton.jit
def _tanh(x):
    # tanh from exp (exact limits at +-inf, no NaN); libdevice's tanh is not available to the interpreter. Below
    # |x| = 0.2, where 1 - exp(-2|x|) cancels (a large softcap), its odd Taylor polynomial to x^9.
    t = tl.exp(-2.0 * tl.abs(x))
    r = (1.0 - t) / (1.0 + t)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(tl.abs(x) < 0.2, series, tl.where(x < 0, -r, r))


@triton.jit
def _scale(x, mask, inv_temp, softcap, inv_softcap, SOFTCAP: tl.constexpr):
    """z = softcap(x) / T for a block, -inf where `mask` is false (lanes past the vocabulary)."""
    if SOFTCAP:
        x = softcap * _tanh(x * inv_softcap)
    return tl.where(mask, x * inv_temp, float("-inf"))


@triton.jit
def _online_update(m, s, z):
    """One block of an online log-sum-exp: running max m (fp32) and sum s (fp64, relative to m), block values z.

    The sum is kept in fp64 so that log(s) resolves log-probs near 0 (s = 1 + tiny when one token dominates):
    in fp32 their error would be the spacing of 1.0, 6e-8, as large as the log-probs themselves."""
    m_new = tl.maximum(m, tl.max(z, 0))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all -inf prefix keeps s = 0, never NaN
    s = s * tl.exp(m - safe).to(tl.float64) + tl.sum(tl.exp(z - safe).to(tl.float64), 0)
    return m_new, s


@triton.jit
def _expm1(x):
    """exp(x) - 1, accurate near 0 (series below |x| = 0.1; libdevice's expm1 is not available to the interpreter)."""
    series = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0))))))
    return tl.where(tl.abs(x) < 0.1, series, tl.exp(x) - 1.0)


@triton.jit
def _p_diff(ps, pt, lps, lpt):
    """p_s - p_t, exact also where both are near 1 (a dominant token): p_t * expm1(lp_s - lp_t) there."""
    d = lps - lpt
    return tl.where((pt > 0.0) & (d < 30.0) & (lpt > -1.0), pt * _expm1(d), ps - pt)


@triton.jit
def _store_grad(xs_row, offs, mask, g, zs, ps, y, m_s, log_h, hard_ratio, hw, inv_temp, temperature, inv_softcap,
                HARD: tl.constexpr, HARD_T: tl.constexpr, SOFTCAP: tl.constexpr):
    """Adds the hard-label term hw (p_h - onehot(y)) to a block's dL/dz_s `g` (p_h = p_s, or under HARD_T the
    CE's own distribution of r z_s), applies the chain rule through temperature and softcap, stores dL/dx_s."""
    if HARD:
        ph = tl.exp((zs - m_s) * hard_ratio - log_h) if HARD_T else ps
        g += hw * ph
        g = tl.where(offs == y, g - hw, g)
    chain = inv_temp
    if SOFTCAP:
        c = zs * (temperature * inv_softcap)
        chain = inv_temp * (1.0 - c * c)
    tl.store(xs_row + offs, g * chain, mask=mask)


@triton.jit
def _load_z(row_ptr, offs, mask, inv_temp, softcap, inv_softcap, SOFTCAP: tl.constexpr):
    """A block of z = softcap(x) / T read from a row (upcast to fp32), -inf past the vocabulary."""
    return _scale(tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32), mask, inv_temp, softcap, inv_softcap,
                  SOFTCAP)


@triton.jit
def _block_logprobs(xs_row, xt_row, offs, mask, m_s, log_s, m_t, log_t, inv_temp, softcap, inv_softcap,
                    SOFTCAP: tl.constexpr):
    """A block's z_s and both models' log-probs (z - max) - log(sum), given the row's normalizers."""
    zs = _load_z(xs_row, offs, mask, inv_temp, softcap, inv_softcap, SOFTCAP)
    zt = _load_z(xt_row, offs, mask, inv_temp, softcap, inv_softcap, SOFTCAP)
    return zs, (zs - m_s) - log_s, (zt - m_t) - log_t


@triton.jit
def _row_normalizers(xs_row, xt_row, V, inv_temp, softcap, inv_softcap, hard_ratio,
                     DIV: tl.constexpr, HARD_T: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 1: (max, sum exp(z - max)) of both models' rows (sums in fp64), under HARD_T sum exp(r (z_s - max_s)),
    and for rkl the teacher's z at the student's top token (ties: the largest within a block; across blocks the
    first block's: any tied token is a valid pivot). Empty rows give (-inf, 0)."""
    lanes = tl.arange(0, BLOCK_V)
    m_s = float("-inf")
    m_t = float("-inf")
    s_s = tl.zeros([], dtype=tl.float64)
    s_t = tl.zeros([], dtype=tl.float64)
    s_h = tl.zeros([], dtype=tl.float64)  # HARD_T: sum exp(r (z_s - max_s)), relative to the running max
    top_t = float("-inf")  # rkl: the teacher's z at the student's top token (the pivot, see _row_terms)
    for start in range(0, V, BLOCK_V):
        offs = start + lanes
        mask = offs < V
        zs = _load_z(xs_row, offs, mask, inv_temp, softcap, inv_softcap, SOFTCAP)
        zt = _load_z(xt_row, offs, mask, inv_temp, softcap, inv_softcap, SOFTCAP)
        if DIV == 1:
            block_max = tl.max(zs, 0)
            block_top_t = tl.max(tl.where(zs == block_max, zt, float("-inf")), 0)
            top_t = tl.where(block_max > m_s, block_top_t, top_t)
        if HARD_T:
            m_h = tl.maximum(m_s, tl.max(zs, 0))
            safe_h = tl.where(m_h == float("-inf"), 0.0, m_h)
            s_h = s_h * tl.exp((m_s - safe_h) * hard_ratio).to(tl.float64) + tl.sum(
                tl.exp((zs - safe_h) * hard_ratio).to(tl.float64), 0)
        m_s, s_s = _online_update(m_s, s_s, zs)
        m_t, s_t = _online_update(m_t, s_t, zt)
    return m_s, s_s, m_t, s_t, s_h, top_t


@triton.jit
def _row_terms(xs_row, xt_row, V, y, m_s, log_s, m_t, log_t, log_h, pivot, beta, inv_temp, temperature, softcap,
               inv_softcap, soft_weight, hard_ratio, hw, DIV: tl.constexpr, HARD: tl.constexpr,
               HARD_T: tl.constexpr, SOFTCAP: tl.constexpr, GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 2, given the row's normalizers: the divergence sums (fkl KL(t||s); rkl KL(s||t) - pivot; jsd KL(t||m)
    and KL(s||m)) and sum p_s lp_s, with log-probs formed as (z - max) - log(sum). fkl with GRAD also writes the
    gradient (p_s - p_t via expm1 where both are near 1)."""
    lanes = tl.arange(0, BLOCK_V)
    acc_a = 0.0  # fkl: KL(t||s); rkl: KL(s||t) - pivot; jsd: KL(t||m)
    acc_b = 0.0  # jsd: KL(s||m)
    ent = 0.0    # sum p_s lp_s
    for start in range(0, V, BLOCK_V):
        offs = start + lanes
        mask = offs < V
        zs, lps, lpt = _block_logprobs(xs_row, xt_row, offs, mask, m_s, log_s, m_t, log_t, inv_temp, softcap,
                                       inv_softcap, SOFTCAP)
        ps = tl.exp(lps)
        pt = tl.exp(lpt)
        ent += tl.sum(tl.where(ps != 0.0, ps * lps, 0.0), 0)
        if DIV == 0:
            acc_a += tl.sum(tl.where(pt != 0.0, pt * (lpt - lps), 0.0), 0)
            if GRAD:
                g = soft_weight * _p_diff(ps, pt, lps, lpt)
                _store_grad(xs_row, offs, mask, g, zs, ps, y, m_s, log_h, hard_ratio, hw, inv_temp, temperature,
                            inv_softcap, HARD, HARD_T, SOFTCAP)
        elif DIV == 1:
            acc_a += tl.sum(tl.where(ps != 0.0, ps * ((lps - lpt) - pivot), 0.0), 0)  # rkl - pivot
        else:
            # Terms of probability <= 1e-30 are dropped (< 1e-28 each): m > 0 wherever log m is used.
            lm = tl.log(beta * pt + (1.0 - beta) * ps)
            acc_a += tl.sum(tl.where(pt > TINY_P, pt * (lpt - lm), 0.0), 0)
            acc_b += tl.sum(tl.where(ps > TINY_P, ps * (lps - lm), 0.0), 0)
    return acc_a, acc_b, ent


@triton.jit
def _row_grad(xs_row, xt_row, V, y, m_s, log_s, m_t, log_t, log_h, pivot, k, beta, inv_temp, temperature, softcap,
              inv_softcap, soft_weight, hard_ratio, hw, DIV: tl.constexpr, HARD: tl.constexpr,
              HARD_T: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 3 (rkl, jsd), given the row's K (rkl: rkl - pivot; jsd: KL(s||m)): dL/dz_s = coef p_s ((lp_s - lp_ref)
    - K) plus the hard-label term; for rkl both lp_s - lp_t and K are taken relative to the pivot."""
    lanes = tl.arange(0, BLOCK_V)
    if DIV == 1:
        coef = soft_weight
    else:
        coef = soft_weight * (1.0 - beta)
    for start in range(0, V, BLOCK_V):
        offs = start + lanes
        mask = offs < V
        zs, lps, lpt = _block_logprobs(xs_row, xt_row, offs, mask, m_s, log_s, m_t, log_t, inv_temp, softcap,
                                       inv_softcap, SOFTCAP)
        ps = tl.exp(lps)
        if DIV == 1:
            g = coef * tl.where(ps != 0.0, ps * (((lps - lpt) - pivot) - k), 0.0)
        else:
            lm = tl.log(beta * tl.exp(lpt) + (1.0 - beta) * ps)
            term = tl.where(ps > TINY_P, ps * (lps - lm), 0.0)
            g = coef * (term - ps * k)
        _store_grad(xs_row, offs, mask, g, zs, ps, y, m_s, log_h, hard_ratio, hw, inv_temp, temperature,
                    inv_softcap, HARD, HARD_T, SOFTCAP)


@triton.jit
def _zero_row(xs_row, V, BLOCK_V: tl.constexpr):
    lanes = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + lanes
        tl.store(xs_row + offs, tl.zeros([BLOCK_V], dtype=tl.float32), mask=offs < V)


@triton.jit
def _divergence_row_kernel(
    xs_ptr, xt_ptr, labels_ptr, loss_ptr, stats_ptr,
    V, stride_s, stride_t,
    beta, inv_temp, temperature, softcap, inv_softcap, soft_weight, hard_weight, ignore_index, hard_ratio,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr, HARD_T: tl.constexpr, SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    xs_row = xs_ptr + row * stride_s
    xt_row = xt_ptr + row * stride_t

    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        valid = y != ignore_index
    else:
        y = -1
        valid = row >= 0

    if valid:
        # The label's logits, read before any gradient overwrites xs.
        if HAS_LABELS:
            tl.device_assert((y >= 0) & (y < V), "divergence_chunk_: label out of range")
            in_range = (y >= 0) & (y < V)
            ys = tl.load(xs_row + y, mask=in_range, other=0.0).to(tl.float32)
            yt = tl.load(xt_row + y, mask=in_range, other=0.0).to(tl.float32)
            if SOFTCAP:
                ys = softcap * _tanh(ys * inv_softcap)
                yt = softcap * _tanh(yt * inv_softcap)
            zs_y = ys * inv_temp
            zt_y = yt * inv_temp

        m_s, s_s, m_t, s_t, s_h, top_t = _row_normalizers(xs_row, xt_row, V, inv_temp, softcap, inv_softcap,
                                                          hard_ratio, DIV, HARD_T, SOFTCAP, BLOCK_V)
        # log p = (z - max) - log(sum): subtracting the max first keeps log-probs near 0 exact, where z - lse
        # would lose everything below the fp32 spacing at |lse|.
        m_s = tl.where(m_s == float("-inf"), 0.0, m_s)
        m_t = tl.where(m_t == float("-inf"), 0.0, m_t)
        log_s = tl.log(s_s).to(tl.float32)
        log_t = tl.log(s_t).to(tl.float32)
        log_h = tl.log(s_h).to(tl.float32)  # HARD_T only
        hw = hard_weight * hard_ratio if HARD_T else hard_weight  # d/dz_s of the CE is hw (p_h - onehot(y))
        # rkl: d = lp_s - lp_t is taken relative to its value c at the student's top token. The gradient
        # p_s (d - rkl) of a dominant token is a difference of two numbers of size |rkl| (~27 at logit scale
        # 140), where every fp32 rounding would land; with rkl = c + sum p_s (d - c) only small numbers cancel.
        pivot = (0.0 - log_s) - ((top_t - m_t) - log_t)
        pivot = tl.where((pivot == pivot) & (tl.abs(pivot) < float("inf")), pivot, 0.0)  # teacher -inf there

        acc_a, acc_b, ent = _row_terms(xs_row, xt_row, V, y, m_s, log_s, m_t, log_t, log_h, pivot, beta, inv_temp,
                                       temperature, softcap, inv_softcap, soft_weight, hard_ratio, hw, DIV, HARD,
                                       HARD_T, SOFTCAP, COMPUTE_GRAD and DIV == 0, BLOCK_V)
        if COMPUTE_GRAD and DIV != 0:
            _row_grad(xs_row, xt_row, V, y, m_s, log_s, m_t, log_t, log_h, pivot, acc_a if DIV == 1 else acc_b,
                      beta, inv_temp, temperature, softcap, inv_softcap, soft_weight, hard_ratio, hw, DIV, HARD,
                      HARD_T, SOFTCAP, BLOCK_V)

        if DIV == 2:
            soft = beta * acc_a + (1.0 - beta) * acc_b
        elif DIV == 1:
            soft = pivot + acc_a
        else:
            soft = acc_a
        row_loss = soft_weight * soft
        if HAS_LABELS:
            lp_s_y = (zs_y - m_s) - log_s
            lp_t_y = (zt_y - m_t) - log_t
            if HARD:
                lph_y = ((zs_y - m_s) * hard_ratio - log_h) if HARD_T else lp_s_y
                row_loss -= hard_weight * lph_y
        else:
            lp_s_y = 0.0
            lp_t_y = 0.0
        tl.store(loss_ptr + row, row_loss)
        tl.store(stats_ptr + row * 5 + 0, m_s + log_s)
        tl.store(stats_ptr + row * 5 + 1, m_t + log_t)
        tl.store(stats_ptr + row * 5 + 2, lp_s_y)
        tl.store(stats_ptr + row * 5 + 3, lp_t_y)
        tl.store(stats_ptr + row * 5 + 4, -ent)
    else:
        tl.store(loss_ptr + row, 0.0)
        five = tl.arange(0, 8)
        tl.store(stats_ptr + row * 5 + five, tl.zeros([8], dtype=tl.float32), mask=five < 5)
        if COMPUTE_GRAD:
            _zero_row(xs_row, V, BLOCK_V)


def _check(xs: torch.Tensor, xt: torch.Tensor, labels: torch.Tensor | None, loss: torch.Tensor,
           stats: torch.Tensor, divergence: int, temperature: float) -> None:
    if xs.dim() != 2 or xt.shape != xs.shape:
        raise ValueError(f"divergence_chunk_: xs and xt must be [C, V] of one shape, got {tuple(xs.shape)} and "
                         f"{tuple(xt.shape)}")
    for name, t in (("xs", xs), ("xt", xt)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"divergence_chunk_: {name} must be float32/bfloat16/float16, got {t.dtype}")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"divergence_chunk_: {name} rows must be contiguous, got strides {t.stride()}")
    c = xs.shape[0]
    if loss.shape != (c,) or loss.dtype != torch.float32 or not loss.is_contiguous():
        raise ValueError(f"divergence_chunk_: loss must be contiguous float32 [{c}], got {tuple(loss.shape)} "
                         f"{loss.dtype}")
    if stats.shape != (c, 5) or stats.dtype != torch.float32 or not stats.is_contiguous():
        raise ValueError(f"divergence_chunk_: stats must be contiguous float32 [{c}, 5], got {tuple(stats.shape)} "
                         f"{stats.dtype}")
    if labels is not None and (labels.shape != (c,) or labels.dtype != torch.int64 or not labels.is_contiguous()):
        raise ValueError(f"divergence_chunk_: labels must be contiguous int64 [{c}], got {tuple(labels.shape)} "
                         f"{labels.dtype}")
    for name, t in (("xt", xt), ("loss", loss), ("stats", stats), ("labels", labels)):
        if t is not None and t.device != xs.device:
            raise ValueError(f"divergence_chunk_: {name} is on {t.device} but xs on {xs.device}")
    if divergence not in (FKL, RKL, JSD):
        raise ValueError(f"divergence_chunk_: unknown divergence code {divergence}")
    if not temperature > 0.0:
        raise ValueError(f"divergence_chunk_: temperature must be positive, got {temperature}")


def launch_config(v: int, block_v: int | None, num_warps: int | None) -> tuple[int, int]:
    """(columns per block, warps) of a row-kernel launch over rows of `v` columns: 2048 and 8 unless given."""
    if block_v is None:
        block_v = min(DEFAULT_BLOCK_V, triton.next_power_of_2(max(v, 16)))
    if num_warps is None:
        num_warps = 8 if block_v >= 2048 else 4
    return block_v, num_warps


@on_tensor_device
def divergence_chunk_(xs: torch.Tensor, xt: torch.Tensor, labels: torch.Tensor | None, loss: torch.Tensor,
                      stats: torch.Tensor, divergence: int, beta: float, temperature: float, softcap: float,
                      soft_weight: float, hard_weight: float, ignore_index: int, compute_grad: bool,
                      hard_ratio: float = 1.0, *, block_v: int | None = None, num_warps: int | None = None) -> None:
    """Row-wise divergence of a chunk, in place. Same arguments and effects as `torch.ops.fastopd.divergence_chunk_`.

    Args:
        xs, xt: [C, V] raw logits (fp32; bf16/fp16 are upcast on load), rows contiguous. xs receives dL/dx_s
            (upstream gradient 1 per row) when `compute_grad`; xt is only read.
        labels: int64 [C] or None. loss: fp32 [C] (out). stats: fp32 [C, 5] (out): lse_s, lse_t, lp_s[y],
            lp_t[y], entropy_s.
        divergence: 0 fkl, 1 rkl, 2 jsd. softcap <= 0 means none.
        hard_ratio: temperature / hard-label temperature (the CE is of z * hard_ratio); 1 means the same.
        block_v, num_warps: launch configuration (defaults: 2048 columns per block, 8 warps).

    Raises:
        ValueError: on shapes, dtypes, devices or options the kernel does not take.
    """
    _check(xs, xt, labels, loss, stats, divergence, temperature)
    c, v = xs.shape
    if c == 0:
        return
    block_v, num_warps = launch_config(v, block_v, num_warps)
    use_cap = softcap > 0.0
    has_labels = labels is not None
    hard = has_labels and hard_weight != 0.0
    _divergence_row_kernel[(c,)](
        xs, xt, labels if has_labels else loss, loss, stats,
        v, xs.stride(0), xt.stride(0),
        float(beta), 1.0 / float(temperature), float(temperature), float(softcap),
        1.0 / float(softcap) if use_cap else 0.0, float(soft_weight), float(hard_weight), int(ignore_index),
        float(hard_ratio), DIV=int(divergence), HAS_LABELS=has_labels, HARD=hard,
        HARD_T=hard and float(hard_ratio) != 1.0, SOFTCAP=use_cap,
        COMPUTE_GRAD=bool(compute_grad), BLOCK_V=block_v, num_warps=num_warps,
    )
