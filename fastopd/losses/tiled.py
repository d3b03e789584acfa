"""The tiled mode of the fused divergence: logit tiles live on chip only (Triton kernels in fastopd.kernels.tiled).

Forward, for N rows and a vocabulary of V:
  1. lse pass: both models' row log-sum-exp and label logits, per vocabulary split, combined by a logsumexp
     over the splits ([SPLIT, N] tensors), and the teacher's logit at the student's top token, which gives
     the rkl pivot c = lp_s - lp_t there;
  2. sums pass: the divergence sums and the entropy with exact log-probs (rkl: S = sum p_s ((lp_s - lp_t) - c),
     rkl = c + S);
  3. with reduction "mean"/"sum" and a gradient wanted, the gradient for an upstream gradient of 1 is formed
     now (grad pass: recompute tiles, G = dL/dx_s, grad_h += G W, grad_W += G^T h), and scaled in backward.
     With "none" the backward runs the grad pass with the per-row upstream gradients. The rkl gradient is
     p_s (((lp_s - lp_t) - c) - S): for a dominant token p_s ((lp_s - lp_t) - rkl) would cancel two numbers
     of size |rkl|, where every fp32 rounding lands; relative to c only small numbers cancel.
Nothing of size N x V is allocated: the largest temporaries are the fp32 gradients of h_s, W_s, b_s and
O(SPLIT x N) statistics. Tiles whose largest |dL/dz_s|, p_s and p_t are all below `skip_threshold` skip their
gradient GEMMs (the vocabulary tail; a small |dL/dz_s| alone is no sign of a negligible tile: jsd at beta near 0
or 1, a high temperature or a small soft weight scale a row's whole gradient down).
"""

from __future__ import annotations

import os

import torch

from fastopd import _dispatch
from fastopd.losses.function import DivergenceConfig, apply_lift, lift_upstream, reduce_rows, refuse_double_backward

FKL, RKL, JSD = 0, 1, 2
# A tile's gradient GEMMs are skipped when every |dL/dz_s| (upstream gradient 1), p_s and p_t in it is below
# this. At 2^-20 a skipped tile changes any gradient entry by at most BLOCK_V * 2^-20 * max|W| (about 1e-4 max|W|
# for 128-wide tiles, with random signs far less): below bf16 resolution of the kept terms. FASTOPD_TILED_SKIP
# overrides it.
DEFAULT_SKIP_THRESHOLD = 2.0**-20


def _skip_threshold() -> float:
    return float(os.environ.get("FASTOPD_TILED_SKIP", DEFAULT_SKIP_THRESHOLD))


def _rows_stats(h_s, w_s, b_s, h_t, w_t, b_t, labels, cfg: DivergenceConfig, tcfg):
    """Forward statistics: rowstats [5, N] (max_s, log_s, max_t, log_t, rkl pivot c), label logits [2, N]
    (z_s[y], z_t[y]), the sums [3, N] (A, B, sum p_s lp_s; rkl: A = KL(s||t) - c), fp32, and log_h [N] (the
    hard-label CE's normalizer at its own temperature) or None."""
    from fastopd.kernels import tiled as tk

    ratio = _hard_ratio(cfg, labels)
    part, partial_sums = tk.tiled_row_lse(h_s, w_s, b_s, h_t, w_t, b_t, labels, temperature=cfg.temperature,
                                          softcap=cfg.softcap, ignore_index=cfg.ignore_index, cfg=tcfg,
                                          hard_ratio=ratio)
    rowstats, zy, log_h = tk.combine_lse(part, partial_sums, ratio)
    rowstats = rowstats.contiguous()
    sums = tk.tiled_row_sums(h_s, w_s, b_s, h_t, w_t, b_t, rowstats, divergence=cfg.divergence, beta=cfg.beta,
                             temperature=cfg.temperature, softcap=cfg.softcap, cfg=tcfg).sum(0)
    return rowstats, zy, sums, log_h


def _hard_ratio(cfg: DivergenceConfig, labels) -> float:
    """temperature / hard-label temperature where a hard term exists at a temperature of its own, else 1."""
    return cfg.hard_ratio if labels is not None and cfg.hard_weight != 0 else 1.0


class TiledLinearDivergenceFunction(torch.autograd.Function):
    """loss, stats = f(h_s [N, Ds], w_s [V, Ds], b_s [V]?, h_t [N, Dt], w_t [V, Dt], b_t [V]?, labels [N]?).

    Same semantics as FusedLinearDivergenceFunction; gradients flow to h_s, w_s, b_s only.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, num_items, cfg: DivergenceConfig, skip_threshold: float,
                splits: int | None):
        from fastopd.kernels import tiled as tk

        n, v = h_s.shape[0], w_s.shape[0]
        device = h_s.device
        need = ctx.needs_input_grad
        want_grad = need[0] or need[1] or need[2]
        form_now = want_grad and cfg.reduction != "none"
        tcfg = tk.default_config(n, v, device, tk.tile_dtype(h_s, h_t), splits)

        rowstats, zy, sums, log_h = _rows_stats(h_s, w_s, b_s, h_t, w_t, b_t, labels, cfg, tcfg)
        lse_s, lse_t = rowstats[0] + rowstats[1], rowstats[2] + rowstats[3]
        acc_a, acc_b, plogp = sums[0], sums[1], sums[2]
        if cfg.divergence == JSD:
            soft = cfg.beta * acc_a + (1.0 - cfg.beta) * acc_b
        elif cfg.divergence == RKL:
            soft = rowstats[4] + acc_a  # rkl = c + S
        else:
            soft = acc_a
        valid = labels != cfg.ignore_index if labels is not None else torch.ones(n, dtype=torch.bool, device=device)
        row_loss = cfg.soft_weight * soft
        if labels is not None:
            # (z - max) - log(sum), as in the kernels: exact for log-probs near 0
            lp_s_y = (zy[0] - rowstats[0]) - rowstats[1]
            lp_t_y = (zy[1] - rowstats[2]) - rowstats[3]
            if cfg.hard_weight != 0:
                ratio = _hard_ratio(cfg, labels)
                lph_y = lp_s_y if log_h is None else (zy[0] - rowstats[0]) * ratio - log_h  # CE at its own T
                row_loss = row_loss - cfg.hard_weight * lph_y
        else:
            lp_s_y = lp_t_y = torch.zeros(n, dtype=torch.float32, device=device)
        zero = torch.zeros((), dtype=torch.float32, device=device)
        loss_rows = torch.where(valid, row_loss, zero)
        stats = torch.where(valid[:, None], torch.stack([lse_s, lse_t, lp_s_y, lp_t_y, -plogp], 1), zero)
        k_row = acc_a if cfg.divergence == RKL else acc_b  # rkl: S = KL(s||t) - c; unused for fkl

        loss, divisor = reduce_rows(loss_rows, cfg, labels, num_items)

        ctx.mark_non_differentiable(stats)
        ctx.cfg, ctx.form_now, ctx.skip_threshold, ctx.tcfg = cfg, form_now, skip_threshold, tcfg
        ctx.dtypes = (h_s.dtype, w_s.dtype, b_s.dtype if b_s is not None else None)
        # [8, N]; row 6: the row scale; row 7: the hard-label CE's normalizer at its own temperature (or unused)
        rowinfo = torch.cat([rowstats, torch.stack([k_row, valid.to(torch.float32),
                                                    log_h if log_h is not None else torch.zeros_like(k_row)])])
        if form_now:
            grads = _grad_pass(h_s, w_s, b_s, h_t, w_t, b_t, labels, rowinfo, need, cfg, skip_threshold, tcfg)
            ctx.save_for_backward(*grads, divisor)
        elif want_grad:
            ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, labels, rowinfo)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        refuse_double_backward()
        dt_h, dt_w, dt_b = ctx.dtypes
        none = (None,) * 8
        if ctx.form_now:
            grad_h, grad_w, grad_b, divisor = ctx.saved_tensors
            scale = grad_loss.to(torch.float32)
            if ctx.cfg.reduction == "mean":
                scale = scale / divisor
            return ((grad_h * scale).to(dt_h) if grad_h is not None else None,
                    (grad_w * scale).to(dt_w) if grad_w is not None else None,
                    (grad_b * scale).to(dt_b) if grad_b is not None else None, *none)
        h_s, w_s, b_s, h_t, w_t, b_t, labels, rowinfo = ctx.saved_tensors
        rowinfo = rowinfo.clone()
        upstream, lift = lift_upstream(grad_loss.to(torch.float32), h_s.dtype)
        rowinfo[6] *= upstream  # per-row upstream gradients, 0 on ignored rows
        grad_h, grad_w, grad_b = _grad_pass(h_s, w_s, b_s, h_t, w_t, b_t, labels, rowinfo, ctx.needs_input_grad,
                                            ctx.cfg, ctx.skip_threshold, ctx.tcfg)
        apply_lift(lift, grad_h, grad_w, grad_b)
        return (grad_h.to(dt_h) if grad_h is not None else None, grad_w.to(dt_w) if grad_w is not None else None,
                grad_b.to(dt_b) if grad_b is not None else None, *none)


def _grad_pass(h_s, w_s, b_s, h_t, w_t, b_t, labels, rowinfo, need, cfg: DivergenceConfig, skip_threshold: float,
               tcfg):
    from fastopd.kernels import tiled as tk

    n, v, ds = h_s.shape[0], w_s.shape[0], h_s.shape[1]
    dev = h_s.device
    grad_h = torch.zeros(n, ds, dtype=torch.float32, device=dev) if need[0] else None
    grad_w = torch.zeros(v, ds, dtype=torch.float32, device=dev) if need[1] else None
    grad_b = torch.zeros(v, dtype=torch.float32, device=dev) if need[2] and b_s is not None else None
    tk.tiled_grad(h_s, w_s, b_s, h_t, w_t, b_t, labels, rowinfo.contiguous(), grad_h, grad_w, grad_b,
                  divergence=cfg.divergence, beta=cfg.beta, temperature=cfg.temperature, softcap=cfg.softcap,
                  soft_weight=cfg.soft_weight, hard_weight=cfg.hard_weight, ignore_index=cfg.ignore_index,
                  skip_threshold=skip_threshold, cfg=tcfg, hard_ratio=_hard_ratio(cfg, labels))
    return grad_h, grad_w, grad_b


def tiled_linear_divergence(h_s: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor | None, h_t: torch.Tensor,
                            w_t: torch.Tensor, b_t: torch.Tensor | None, labels: torch.Tensor | None,
                            num_items: torch.Tensor | None, cfg: DivergenceConfig, *,
                            skip_threshold: float | None = None,
                            splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled-mode fused divergence (called by `fused_linear_divergence(..., mode="tiled")`, which validates).

    Args:
        h_s: [N, Ds] student hidden states; w_s: [V, Ds] student head (already cut to the vocabulary);
            b_s: [V] or None. h_t, w_t, b_t: the teacher's ([N, Dt], [V, Dt], [V]), detached.
        labels: int64 [N] or None. num_items: 0-d tensor or None (the "mean" divisor).
        cfg: the DivergenceConfig (divergence code, beta, temperature, softcap, weights, reduction).
        skip_threshold: gradient tiles with every |dL/dz_s|, p_s and p_t below it skip their GEMMs (default 2^-20, or
            FASTOPD_TILED_SKIP; 0 disables skipping). splits: vocabulary splits of the grid (default: by size).

    Returns:
        loss (fp32: scalar for "mean"/"sum", [N] for "none") and stats [N, 5] fp32 (lse_s, lse_t, log p_s(y),
        log p_t(y), entropy_s; zeros on ignored rows).

    Raises:
        ValueError: when the tensors are not on a device the Triton kernels run on (CUDA, or the CPU under
            TRITON_INTERPRET=1, where the interpreter works with this Triton and NumPy), or their dtypes differ
            between hidden states and weights.
    """
    why = _dispatch.available("divergence_chunk", "triton", h_s.device)  # the row kernel's Triton, the same needs
    if why is not None:
        raise ValueError(f"mode='tiled' runs Triton kernels (on CUDA tensors, or CPU tensors under "
                         f"TRITON_INTERPRET=1), which cannot run on {h_s.device} here: {why}")
    if h_s.dtype != w_s.dtype or h_t.dtype != w_t.dtype:
        raise ValueError(f"mode='tiled': hidden/weight dtypes must match, got student {h_s.dtype}/{w_s.dtype} and "
                         f"teacher {h_t.dtype}/{w_t.dtype}")
    if skip_threshold is None:
        skip_threshold = _skip_threshold()
    h_s, w_s, h_t, w_t = h_s.contiguous(), w_s.contiguous(), h_t.contiguous(), w_t.contiguous()
    b_s = b_s.contiguous() if b_s is not None else None
    b_t = b_t.contiguous() if b_t is not None else None
    return TiledLinearDivergenceFunction.apply(h_s, w_s, b_s, h_t, w_t, b_t, labels, num_items, cfg,
                                               float(skip_threshold), splits)
