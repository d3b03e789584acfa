"""Triton kernels of the tiled divergence (Cut Cross-Entropy style): logits never reach global memory.

A logit tile X[rows, cols] = h[rows] @ W[cols]^T (+ b[cols]) is computed on chip with tl.dot over the hidden
dimension, for the student and the teacher, and consumed at once. Three kernels, each over a grid of
(row block, vocabulary split) programs; a program walks its share of the vocabulary in BLOCK_V tiles:

  _tiled_lse_kernel    per split: partial log-sum-exp of both models (online over its tiles), the label's
                       logits and the teacher's z at the student's top token; the host side combines splits
                       with a logsumexp over [SPLIT, N] (no sync) and forms the rkl pivot from that z.
  _tiled_sums_kernel   with the row normalizers known: per split, the divergence sums and the entropy with
                       exact log-probs (partials [SPLIT, N, 3], summed on the host side).
  _tiled_grad_kernel   the gradient tile G = dL/dx_s (upstream `row_scale`), then grad_h[rows] += G W[cols]
                       and grad_W[cols] += G^T h[rows] (grad_b[cols] += colsum G) with fp32 atomics. A tile
                       whose largest |dL/dz_s| (before the upstream scale) and largest p_s, p_t are all
                       below `skip_threshold` adds nothing measurable and its two gradient GEMMs are skipped.

GEMM work for N tokens: each pass recomputes both models' tiles (2 N V (Ds + Dt) flops per pass); the
gradient adds 2 x 2 N V Ds. Global memory holds only the inputs, the gradients and O(SPLIT x N) statistics.
These are raw kernels plus launchers; fastopd/losses/tiled.py holds the autograd Function.

rkl is taken relative to the pivot c = lp_s - lp_t at the student's top token, as in the row kernels
(kernels/divergence.py): the sums pass accumulates S = sum p_s ((lp_s - lp_t) - c), rkl = c + S, and the grad pass
forms p_s (((lp_s - lp_t) - c) - S). The gradient of a dominant token, p_s ((lp_s - lp_t) - rkl), is otherwise
a difference of two numbers of size |rkl| (~27 at logit scale 140), where every fp32 rounding would land.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastopd.kernels import on_tensor_device
from fastopd.kernels.divergence import TINY_P, _p_diff, _tanh


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, D, stride_h, stride_w,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    """X[BLOCK_N, BLOCK_V] = h[rows] @ W[cols]^T (+ b[cols]), fp32 accumulation."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    dk = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        kk = d0 + dk
        kmask = kk < D
        a = tl.load(h_ptr + rows[:, None] * stride_h + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_w + kk[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _scaled_tile(x, cmask, inv_temp, softcap, inv_softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        x = softcap * _tanh(x * inv_softcap)
    return tl.where(cmask[None, :], x * inv_temp, float("-inf"))


@triton.jit
def _tiled_lse_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, labels_ptr, part_ptr, sums_ptr,
    N, V, Ds, Dt, stride_hs, stride_ws, stride_ht, stride_wt, blocks_per_split,
    inv_temp, softcap, inv_softcap, ignore_index, hard_ratio,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr, HAS_LABELS: tl.constexpr, SOFTCAP: tl.constexpr,
    HARD_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """part[split, :, row] = (max_s, max_t, z_s[y], z_t[y], z_t at the student's top) ([SPLIT, 5, N] fp32) and
    sums[split, :2, row] = (sum exp(z_s - max_s), sum exp(z_t - max_t)) ([SPLIT, 3, N] fp64) of this split's
    vocabulary share. The student's top is in the first tile holding the largest z_s; among ties there the
    largest z_t is taken. HARD_T (the hard-label CE at its own temperature, of r z_s with r = hard_ratio):
    sums[split, 2, row] = sum exp(r (z_s - max_s)) too (left untouched otherwise)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    if HAS_LABELS:
        y = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index)
        y = tl.where(y == ignore_index, -1, y)
    m_s = tl.full([BLOCK_N], float("-inf"), tl.float32)
    m_t = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_s = tl.zeros([BLOCK_N], tl.float64)  # fp64: log(sum) must resolve log-probs near 0 (see divergence.py)
    s_t = tl.zeros([BLOCK_N], tl.float64)
    s_h = tl.zeros([BLOCK_N], tl.float64)
    zs_y = tl.zeros([BLOCK_N], tl.float32)
    zt_y = tl.zeros([BLOCK_N], tl.float32)
    top_t = tl.full([BLOCK_N], float("-inf"), tl.float32)  # the teacher's z at the student's top token
    v_begin = split * blocks_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + blocks_per_split * BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        cmask = cols < v_end
        xs = _logit_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, rmask, cmask, Ds, stride_hs, stride_ws, HAS_BIAS_S,
                         BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
        xt = _logit_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, rmask, cmask, Dt, stride_ht, stride_wt, HAS_BIAS_T,
                         BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
        zs = _scaled_tile(xs, cmask, inv_temp, softcap, inv_softcap, SOFTCAP)
        zt = _scaled_tile(xt, cmask, inv_temp, softcap, inv_softcap, SOFTCAP)
        tile_max_s = tl.max(zs, 1)
        new_s = tl.maximum(m_s, tile_max_s)
        safe_s = tl.where(new_s == float("-inf"), 0.0, new_s)
        e_s = tl.exp(zs - safe_s[:, None])
        s_s = s_s * tl.exp(m_s - safe_s).to(tl.float64) + tl.sum(e_s.to(tl.float64), 1)
        if HARD_T:
            s_h = s_h * tl.exp((m_s - safe_s) * hard_ratio).to(tl.float64) + tl.sum(
                tl.exp((zs - safe_s[:, None]) * hard_ratio).to(tl.float64), 1)
        # A tile that raises the max holds the student's top where e_s == 1 (also at near-ties within 2^-24 of
        # it, none dominant, where any pivot serves). Selecting on e_s keeps the fp32 variant free of spills.
        top_t = tl.where(tile_max_s > m_s, tl.max(tl.where(e_s == 1.0, zt, float("-inf")), 1), top_t)
        m_s = new_s
        new_t = tl.maximum(m_t, tl.max(zt, 1))
        safe_t = tl.where(new_t == float("-inf"), 0.0, new_t)
        s_t = s_t * tl.exp(m_t - safe_t).to(tl.float64) + tl.sum(tl.exp(zt - safe_t[:, None]).to(tl.float64), 1)
        m_t = new_t
        if HAS_LABELS:
            hit = cols[None, :] == y[:, None]
            zs_y += tl.sum(tl.where(hit, zs, 0.0), 1)
            zt_y += tl.sum(tl.where(hit, zt, 0.0), 1)
    base = part_ptr + split * 5 * N + rows
    tl.store(base, m_s, mask=rmask)  # -inf for an empty split, whose sums are 0
    tl.store(base + N, m_t, mask=rmask)
    tl.store(base + 2 * N, zs_y, mask=rmask)
    tl.store(base + 3 * N, zt_y, mask=rmask)
    tl.store(base + 4 * N, top_t, mask=rmask)
    tl.store(sums_ptr + split * 3 * N + rows, s_s, mask=rmask)
    tl.store(sums_ptr + split * 3 * N + N + rows, s_t, mask=rmask)
    if HARD_T:
        tl.store(sums_ptr + split * 3 * N + 2 * N + rows, s_h, mask=rmask)


@triton.jit
def _tile_probs(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, rows, cols, rmask, cmask, Ds, Dt,
                stride_hs, stride_ws, stride_ht, stride_wt, m_s, log_s, m_t, log_t, inv_temp, softcap, inv_softcap,
                HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr, SOFTCAP: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Scaled student logits and both models' log-probs, (z - max) - log(sum), and probs of one tile."""
    xs = _logit_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, rmask, cmask, Ds, stride_hs, stride_ws, HAS_BIAS_S,
                     BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
    xt = _logit_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, rmask, cmask, Dt, stride_ht, stride_wt, HAS_BIAS_T,
                     BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
    zs = _scaled_tile(xs, cmask, inv_temp, softcap, inv_softcap, SOFTCAP)
    zt = _scaled_tile(xt, cmask, inv_temp, softcap, inv_softcap, SOFTCAP)
    lps = (zs - m_s[:, None]) - log_s[:, None]
    lpt = (zt - m_t[:, None]) - log_t[:, None]
    return zs, lps, lpt, tl.exp(lps), tl.exp(lpt)


@triton.jit
def _tiled_sums_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, row_ptr, part_ptr,
    N, V, Ds, Dt, stride_hs, stride_ws, stride_ht, stride_wt, blocks_per_split,
    beta, omb, inv_temp, softcap, inv_softcap,
    DIV: tl.constexpr, HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """part[split, :, row] = (A, B, sum p_s lp_s) over this split's vocabulary; row_ptr holds the rows' max and log
    sum-exp of both models and the rkl pivot [5, N] (max_s, log_s, max_t, log_t, c).

    fkl: A = KL(t||s); rkl: A = KL(s||t) - c = sum p_s ((lp_s - lp_t) - c); jsd: A = KL(t||m), B = KL(s||m).
    """
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    m_s = tl.load(row_ptr + rows, mask=rmask, other=0.0)
    log_s = tl.load(row_ptr + N + rows, mask=rmask, other=0.0)
    m_t = tl.load(row_ptr + 2 * N + rows, mask=rmask, other=0.0)
    log_t = tl.load(row_ptr + 3 * N + rows, mask=rmask, other=0.0)
    if DIV == 1:
        pivot = tl.load(row_ptr + 4 * N + rows, mask=rmask, other=0.0)
    acc_a = tl.zeros([BLOCK_N], tl.float32)
    acc_b = tl.zeros([BLOCK_N], tl.float32)
    ent = tl.zeros([BLOCK_N], tl.float32)
    v_begin = split * blocks_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + blocks_per_split * BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        cmask = cols < v_end
        zs, lps, lpt, ps, pt = _tile_probs(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, rows, cols, rmask, cmask,
                                           Ds, Dt, stride_hs, stride_ws, stride_ht, stride_wt, m_s, log_s, m_t, log_t,
                                           inv_temp, softcap, inv_softcap, HAS_BIAS_S, HAS_BIAS_T, SOFTCAP,
                                           BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
        ent += tl.sum(tl.where(ps != 0.0, ps * lps, 0.0), 1)
        if DIV == 0:
            acc_a += tl.sum(tl.where(pt != 0.0, pt * (lpt - lps), 0.0), 1)
        elif DIV == 1:
            acc_a += tl.sum(tl.where(ps != 0.0, ps * ((lps - lpt) - pivot[:, None]), 0.0), 1)
        else:
            lm = tl.log(beta * pt + omb * ps)
            acc_a += tl.sum(tl.where(pt > TINY_P, pt * (lpt - lm), 0.0), 1)
            acc_b += tl.sum(tl.where(ps > TINY_P, ps * (lps - lm), 0.0), 1)
    base = part_ptr + split * 3 * N + rows
    tl.store(base, acc_a, mask=rmask)
    tl.store(base + N, acc_b, mask=rmask)
    tl.store(base + 2 * N, ent, mask=rmask)


@triton.jit
def _tiled_grad_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, labels_ptr, row_ptr, gh_ptr, gw_ptr, gb_ptr, skip_ptr,
    N, V, Ds, Dt, stride_hs, stride_ws, stride_ht, stride_wt, blocks_per_split,
    beta, omb, inv_temp, temperature, softcap, inv_softcap, soft_weight, hard_weight, ignore_index, skip_threshold,
    hard_ratio,
    DIV: tl.constexpr, HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr, HAS_LABELS: tl.constexpr,
    HARD: tl.constexpr, HARD_T: tl.constexpr, SOFTCAP: tl.constexpr, GRAD_H: tl.constexpr, GRAD_W: tl.constexpr,
    GRAD_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulates grad_h [N, Ds], grad_W [V, Ds], grad_b [V] (fp32, atomics) of sum_r row_scale[r] * loss[r].

    row_ptr holds [max_s; log_s; max_t; log_t; c; K; row_scale; log_h] [8, N]: c is the rkl pivot (lp_s - lp_t
    at the student's top token), K the row's KL(s||t) - c (rkl) or KL(s||m) (jsd); row_scale is 0 on ignored
    rows; log_h (HARD_T) = log sum exp(r (z_s - max_s)), the hard-label CE's normalizer at r = hard_ratio.
    skip_ptr counts the tiles skipped under skip_threshold (int32 [1]).
    """
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    m_s = tl.load(row_ptr + rows, mask=rmask, other=0.0)
    log_s = tl.load(row_ptr + N + rows, mask=rmask, other=0.0)
    m_t = tl.load(row_ptr + 2 * N + rows, mask=rmask, other=0.0)
    log_t = tl.load(row_ptr + 3 * N + rows, mask=rmask, other=0.0)
    if DIV == 1:
        pivot = tl.load(row_ptr + 4 * N + rows, mask=rmask, other=0.0)
    k_row = tl.load(row_ptr + 5 * N + rows, mask=rmask, other=0.0)
    scale = tl.load(row_ptr + 6 * N + rows, mask=rmask, other=0.0)
    if HARD_T:
        log_h = tl.load(row_ptr + 7 * N + rows, mask=rmask, other=0.0)
        hw = hard_weight * hard_ratio  # d/dz_s of the CE of r z_s: r hard_weight (p_h - onehot(y))
    else:
        hw = hard_weight
    if HAS_LABELS:
        y = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index)
        valid = rmask & (y != ignore_index)
        y = tl.where(valid, y, -1)
    else:
        valid = rmask
    dk = tl.arange(0, BLOCK_D)
    v_begin = split * blocks_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + blocks_per_split * BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        cmask = cols < v_end
        zs, lps, lpt, ps, pt = _tile_probs(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, rows, cols, rmask, cmask,
                                           Ds, Dt, stride_hs, stride_ws, stride_ht, stride_wt, m_s, log_s, m_t, log_t,
                                           inv_temp, softcap, inv_softcap, HAS_BIAS_S, HAS_BIAS_T, SOFTCAP,
                                           BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
        if DIV == 0:
            g = soft_weight * _p_diff(ps, pt, lps, lpt)
        elif DIV == 1:
            # (lp_s - lp_t) - c is 0 at the student's top token (c was formed with this arithmetic): only small
            # numbers cancel.
            g = soft_weight * tl.where(ps != 0.0, ps * (((lps - lpt) - pivot[:, None]) - k_row[:, None]), 0.0)
        else:
            lm = tl.log(beta * pt + omb * ps)
            term = tl.where(ps > TINY_P, ps * (lps - lm), 0.0)
            coef = soft_weight * omb
            g = coef * (term - ps * k_row[:, None])
        mass = tl.maximum(ps, pt)
        if HARD:
            if HARD_T:
                ph = tl.exp((zs - m_s[:, None]) * hard_ratio - log_h[:, None])
                g += hw * ph
                mass = tl.maximum(mass, ph)
            else:
                g += hw * ps
            g = tl.where(cols[None, :] == y[:, None], g - hw, g)
        if SOFTCAP:
            c = zs * (temperature * inv_softcap)
            g = g * (inv_temp * (1.0 - c * c))
        else:
            g = g * inv_temp
        keep = valid[:, None] & cmask[None, :]
        g = tl.where(keep, g, 0.0)
        # A tile is skipped only where its gradient AND both models' probabilities are below the threshold: the
        # vocabulary tail neither model puts mass on. A small |dL/dz| alone is no sign of a negligible tile: jsd
        # at beta near 0 or 1, a high temperature or a small soft_label_weight scale every |dL/dz| of the row
        # down (and a student that has caught up with its teacher has p_s - p_t small everywhere), and skipping
        # on it dropped whole gradients to 0. NaN counts as large: a NaN tile must reach the gradients (tl.max
        # would drop NaN on a GPU and NaN compares false everywhere), so that a NaN row shows in them as in the loss.
        size = tl.maximum(tl.abs(g), tl.where(keep, mass, 0.0))
        if tl.max(tl.max(tl.where(g == g, size, float("inf")), 1), 0) >= skip_threshold:
            g = g * scale[:, None]
            if GRAD_B:
                tl.atomic_add(gb_ptr + cols, tl.sum(g, 0), mask=cmask)
            gl = g.to(hs_ptr.dtype.element_ty)
            for d0 in range(0, Ds, BLOCK_D):
                kk = d0 + dk
                kmask = kk < Ds
                if GRAD_H:
                    w = tl.load(ws_ptr + cols[:, None] * stride_ws + kk[None, :], mask=cmask[:, None] & kmask[None, :],
                                other=0.0)
                    tl.atomic_add(gh_ptr + rows[:, None] * Ds + kk[None, :], tl.dot(gl, w, input_precision=PRECISION),
                                  mask=rmask[:, None] & kmask[None, :])
                if GRAD_W:
                    h = tl.load(hs_ptr + rows[:, None] * stride_hs + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                                other=0.0)
                    tl.atomic_add(gw_ptr + cols[:, None] * Ds + kk[None, :],
                                  tl.dot(tl.trans(gl), h, input_precision=PRECISION),
                                  mask=cmask[:, None] & kmask[None, :])
        else:
            tl.atomic_add(skip_ptr, 1)


class TiledConfig:
    """Launch configuration of the tiled kernels: tile sizes, warps and the number of vocabulary splits."""

    def __init__(self, block_n: int, block_v: int, block_d: int, num_warps: int, num_stages: int, splits: int):
        self.block_n, self.block_v, self.block_d = block_n, block_v, block_d
        self.num_warps, self.num_stages, self.splits = num_warps, num_stages, splits

    def __repr__(self) -> str:
        return (f"TiledConfig(block_n={self.block_n}, block_v={self.block_v}, block_d={self.block_d}, "
                f"num_warps={self.num_warps}, num_stages={self.num_stages}, splits={self.splits})")


# One fixed configuration per input width on sm_90 (no autotuning), checked free of register spills by
# tests/kernels/test_triton_sm90_compile.py: fp32 tiles take no tensor-core path and need a narrower row block;
# their K step is 16 (at 32 the gradient kernel spilled 16-20 bytes under ptxas, Triton 3.6 and 3.8).
GPU_CONFIG_16BIT = (64, 64, 32, 8, 3)
GPU_CONFIG_FP32 = (32, 128, 16, 8, 2)
CPU_CONFIG = (16, 32, 16, 1, 1)  # the interpreter: small tiles keep numpy fast


def default_config(n: int, v: int, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                   splits: int | None = None) -> TiledConfig:
    """The launch configuration for N rows and V columns on `device`; splits the vocabulary until the grid holds
    about two programs per SM (or takes `splits`)."""
    if device.type == "cuda":
        cfg = TiledConfig(*(GPU_CONFIG_FP32 if dtype == torch.float32 else GPU_CONFIG_16BIT), 1)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cfg = TiledConfig(*CPU_CONFIG, 1)
        sms = 2
    row_blocks = triton.cdiv(n, cfg.block_n)
    vblocks = triton.cdiv(v, cfg.block_v)
    if splits is None:
        splits = max(1, min(vblocks, triton.cdiv(2 * sms, max(1, row_blocks))))  # N = 0: no row block
    cfg.splits = max(1, min(vblocks, splits))
    return cfg


def tile_dtype(h_s: torch.Tensor, h_t: torch.Tensor) -> torch.dtype:
    """The dtype the tiles are sized and their products made for: float32 when either model is float32 (a bf16
    student may have an fp32 teacher), else the student's."""
    return torch.float32 if torch.float32 in (h_s.dtype, h_t.dtype) else h_s.dtype


def _precision(h_s: torch.Tensor, h_t: torch.Tensor) -> str | None:
    # fp32 products exactly (IEEE, no TF32, which Triton would pick by default on NVIDIA) whenever either model is
    # fp32, also for a bf16 student beside an fp32 teacher; bf16/fp16 products need no choice
    return "ieee" if tile_dtype(h_s, h_t) == torch.float32 else None


def _geometry(v: int, cfg: TiledConfig) -> int:
    vblocks = triton.cdiv(v, cfg.block_v)
    return triton.cdiv(vblocks, cfg.splits)


@on_tensor_device
def tiled_row_lse(h_s, w_s, b_s, h_t, w_t, b_t, labels, *, temperature: float, softcap: float, ignore_index: int,
                  cfg: TiledConfig, hard_ratio: float = 1.0) -> torch.Tensor:
    """Per-split partials of each vocabulary share: [SPLIT, 5, N] fp32 (max_s, max_t, z_s[y], z_t[y], z_t at the
    student's top) and [SPLIT, 3, N] fp64 (sum exp(z - max) of both models; with hard_ratio != 1 also
    sum exp(hard_ratio (z_s - max_s)), else 0). `combine_lse` turns them into row statistics."""
    n, ds = h_s.shape
    v, dt = w_s.shape[0], h_t.shape[1]
    part = torch.empty(cfg.splits, 5, n, dtype=torch.float32, device=h_s.device)
    sums = torch.zeros(cfg.splits, 3, n, dtype=torch.float64, device=h_s.device)
    use_cap = softcap > 0
    grid = (triton.cdiv(n, cfg.block_n), cfg.splits)
    _tiled_lse_kernel[grid](
        h_s, w_s, b_s if b_s is not None else h_s, h_t, w_t, b_t if b_t is not None else h_t,
        labels if labels is not None else part, part, sums,
        n, v, ds, dt, h_s.stride(0), w_s.stride(0), h_t.stride(0), w_t.stride(0), _geometry(v, cfg),
        1.0 / temperature, softcap, 1.0 / softcap if use_cap else 0.0, ignore_index, float(hard_ratio),
        HAS_BIAS_S=b_s is not None, HAS_BIAS_T=b_t is not None, HAS_LABELS=labels is not None, SOFTCAP=use_cap,
        HARD_T=float(hard_ratio) != 1.0, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        PRECISION=_precision(h_s, h_t),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return part, sums


def combine_lse(part: torch.Tensor, sums: torch.Tensor,
                hard_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row statistics from the per-split partials: ([5, N] fp32 = max_s, log_s, max_t, log_t, c with
    lse = max + log_s, log-probs (z - max) - log_s and c = lp_s - lp_t at the student's top token, the rkl
    pivot), the label logits [2, N] (z_s[y], z_t[y]) and, with hard_ratio != 1, log_h [N] = log sum
    exp(hard_ratio (z_s - max_s)) (else None)."""
    m = part[:, :2].amax(0)                                        # [2, N]
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)   # all -inf rows: keep NaN out
    scale = torch.exp((part[:, :2] - m_safe).double())            # empty splits: exp(-inf) = 0
    log_sum = torch.log((sums[:, :2] * scale).sum(0)).float()      # fp64 sum: exact near log p = 0
    log_h = None
    if hard_ratio != 1.0:
        scale_h = torch.exp((part[:, 0] - m_safe[0]).double() * hard_ratio)
        log_h = torch.log((sums[:, 2] * scale_h).sum(0)).float()
    # The teacher's z at the student's top: from the split holding the max (ties: the largest z_t, as in a tile).
    # c is formed with the grad kernel's arithmetic, ((z - max) - log_s) - ((z_t - max_t) - log_t) with z = max,
    # so that (lp_s - lp_t) - c is exactly 0 there.
    top_t = torch.where(part[:, 0] == m[0], part[:, 4], float("-inf")).amax(0)
    pivot = (0.0 - log_sum[0]) - ((top_t - m_safe[1]) - log_sum[1])
    pivot = torch.where(torch.isfinite(pivot), pivot, torch.zeros_like(pivot))  # teacher -inf there: the loss is inf
    rowstats = torch.stack([m_safe[0], log_sum[0], m_safe[1], log_sum[1], pivot])
    return rowstats, part[:, 2:4].sum(0), log_h                    # the label lies in exactly one split


@on_tensor_device
def tiled_row_sums(h_s, w_s, b_s, h_t, w_t, b_t, rowstats: torch.Tensor, *, divergence: int, beta: float,
                   temperature: float, softcap: float, cfg: TiledConfig) -> torch.Tensor:
    """Per-split partial sums [SPLIT, 3, N] (A, B, sum p_s lp_s; for rkl A = KL(s||t) - c) given rowstats [5, N]
    from `combine_lse`."""
    n, ds = h_s.shape
    v, dt = w_s.shape[0], h_t.shape[1]
    part = torch.empty(cfg.splits, 3, n, dtype=torch.float32, device=h_s.device)
    use_cap = softcap > 0
    grid = (triton.cdiv(n, cfg.block_n), cfg.splits)
    _tiled_sums_kernel[grid](
        h_s, w_s, b_s if b_s is not None else h_s, h_t, w_t, b_t if b_t is not None else h_t, rowstats, part,
        n, v, ds, dt, h_s.stride(0), w_s.stride(0), h_t.stride(0), w_t.stride(0), _geometry(v, cfg),
        beta, 1.0 - beta, 1.0 / temperature, softcap, 1.0 / softcap if use_cap else 0.0,  # 1 - beta in double
        DIV=divergence, HAS_BIAS_S=b_s is not None, HAS_BIAS_T=b_t is not None, SOFTCAP=use_cap,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, PRECISION=_precision(h_s, h_t),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return part


@on_tensor_device
def tiled_grad(h_s, w_s, b_s, h_t, w_t, b_t, labels, rowinfo: torch.Tensor, grad_h, grad_w, grad_b, *,
               divergence: int, beta: float, temperature: float, softcap: float, soft_weight: float,
               hard_weight: float, ignore_index: int, skip_threshold: float, cfg: TiledConfig,
               hard_ratio: float = 1.0) -> torch.Tensor:
    """Adds the student gradients into grad_h [N, Ds], grad_w [V, Ds], grad_b [V] (fp32, any may be None).

    rowinfo: [8, N] fp32 = max_s, log_s, max_t, log_t, c (from `combine_lse`), K (KL(s||t) - c for rkl, KL(s||m)
    for jsd, unused for fkl), row_scale, log_h (used with hard_ratio != 1: the hard-label CE's normalizer).
    Returns the number of skipped tiles as an int32 [1] device tensor (read it only where a sync is fine).
    """
    n, ds = h_s.shape
    v, dt = w_s.shape[0], h_t.shape[1]
    skipped = torch.zeros(1, dtype=torch.int32, device=h_s.device)
    use_cap = softcap > 0
    hard = labels is not None and hard_weight != 0.0
    grid = (triton.cdiv(n, cfg.block_n), cfg.splits)
    dummy = rowinfo
    _tiled_grad_kernel[grid](
        h_s, w_s, b_s if b_s is not None else h_s, h_t, w_t, b_t if b_t is not None else h_t,
        labels if labels is not None else dummy, rowinfo,
        grad_h if grad_h is not None else dummy, grad_w if grad_w is not None else dummy,
        grad_b if grad_b is not None else dummy, skipped,
        n, v, ds, dt, h_s.stride(0), w_s.stride(0), h_t.stride(0), w_t.stride(0), _geometry(v, cfg),
        beta, 1.0 - beta, 1.0 / temperature, temperature, softcap, 1.0 / softcap if use_cap else 0.0, soft_weight,
        hard_weight, ignore_index, skip_threshold, float(hard_ratio),
        DIV=divergence, HAS_BIAS_S=b_s is not None, HAS_BIAS_T=b_t is not None, HAS_LABELS=labels is not None,
        HARD=hard, HARD_T=hard and float(hard_ratio) != 1.0, SOFTCAP=use_cap, GRAD_H=grad_h is not None,
        GRAD_W=grad_w is not None, GRAD_B=grad_b is not None,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, PRECISION=_precision(h_s, h_t),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return skipped
