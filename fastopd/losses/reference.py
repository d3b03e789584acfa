"""The pure-PyTorch row-wise divergence kernel: the reference backend and the fallback everywhere.

Same contract as the C++ op `torch.ops.fastopd.divergence_chunk_` (see csrc/cpu/divergence.cpp):
xs, xt are [C, V] fp32 raw logits; on return `loss` [C] and `stats` [C, 5] are filled and, when
`compute_grad`, xs holds dL/dx_s for an upstream gradient of 1 per row. Ignored rows get zeros.
It computes the closed-form gradients with whole-row torch ops (a few [C, V] temporaries).
"""

from __future__ import annotations

import math

import torch

FKL, RKL, JSD = 0, 1, 2


def _xlogy_ratio(p: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """p * log_ratio with 0 where p == 0 (so -inf log-probs of masked entries give 0, not NaN); a NaN p (a NaN
    logit in the row) stays NaN, so the row's loss shows it."""
    return torch.where(p != 0, p * log_ratio, torch.zeros((), dtype=p.dtype, device=p.device))


def scaled_logits(x: torch.Tensor, softcap: float, temperature: float) -> torch.Tensor:
    """z = softcap * tanh(x / softcap) (softcap > 0 only), divided by the temperature: what the divergence compares."""
    if softcap > 0:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def to_raw_logit_grad(g: torch.Tensor, zs: torch.Tensor, temperature: float, softcap: float) -> torch.Tensor:
    """dL/dx_s from dL/dz_s `g`, for z = softcap(x) / T: divide by T and, under a softcap, multiply by
    1 - (softcap(x) / softcap)^2 (softcap(x) = zs * T)."""
    chain = 1.0 / temperature
    if softcap > 0:
        chain = chain * (1.0 - (zs * temperature / softcap) ** 2)
    return g * chain


@torch.no_grad()
def divergence_chunk_(xs: torch.Tensor, xt: torch.Tensor, labels: torch.Tensor | None, loss: torch.Tensor,
                      stats: torch.Tensor, divergence: int, beta: float, temperature: float, softcap: float,
                      soft_weight: float, hard_weight: float, ignore_index: int, compute_grad: bool,
                      hard_ratio: float = 1.0) -> None:
    """`hard_ratio` = temperature / hard_temperature: the hard-label CE is taken of z * hard_ratio
    (softcap(x) / hard_temperature) when that differs from the divergence's temperature."""
    zs, zt = scaled_logits(xs, softcap, temperature), scaled_logits(xt, softcap, temperature)
    lse_s = torch.logsumexp(zs, dim=-1, keepdim=True)
    lse_t = torch.logsumexp(zt, dim=-1, keepdim=True)
    # log_softmax subtracts the max before the log-sum: z - lse would round log-probs near 0 to 0
    lps, lpt = torch.log_softmax(zs, dim=-1), torch.log_softmax(zt, dim=-1)
    ps, pt = lps.exp(), lpt.exp()

    if divergence == FKL:
        soft = _xlogy_ratio(pt, lpt - lps).sum(-1)
        dsoft = ps - pt
    elif divergence == RKL:
        # d = lp_s - lp_t relative to its value c at the student's top token: the gradient p_s (d - rkl) of a
        # dominant token is a difference of two numbers of size |rkl| (~27 at logit scale 140) and every fp32
        # rounding at that size would land in it; with r = d - c and rkl = c + sum p_s r, d - rkl = r - sum p_s r
        # is formed from small numbers only.
        d = lps - lpt
        c = d.gather(1, zs.argmax(-1, keepdim=True))
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))  # teacher -inf at the student's top: loss inf
        r = d - c
        s_rel = _xlogy_ratio(ps, r).sum(-1, keepdim=True)
        soft = (c + s_rel)[:, 0]
        dsoft = _xlogy_ratio(ps, r - s_rel)
    elif divergence == JSD:
        lm = torch.logaddexp(lpt + math.log(beta), lps + math.log1p(-beta))  # log(b p_t + (1-b) p_s), no underflow
        kl_t = _xlogy_ratio(pt, lpt - lm).sum(-1)
        term_s = _xlogy_ratio(ps, lps - lm)
        kl_s = term_s.sum(-1)
        soft = beta * kl_t + (1.0 - beta) * kl_s
        dsoft = (1.0 - beta) * (term_s - ps * kl_s[:, None])
    else:
        raise ValueError(f"unknown divergence code {divergence}")

    rows = torch.arange(xs.shape[0], device=xs.device)
    if labels is not None:
        valid = labels != ignore_index
        y = torch.where(valid, labels, torch.zeros_like(labels))
        lp_s_y, lp_t_y = lps[rows, y], lpt[rows, y]
    else:
        valid = torch.ones(xs.shape[0], dtype=torch.bool, device=xs.device)
        lp_s_y = lp_t_y = torch.zeros(xs.shape[0], dtype=xs.dtype, device=xs.device)

    hard_on = hard_weight != 0 and labels is not None
    if hard_on and hard_ratio != 1.0:
        lph = torch.log_softmax(zs * hard_ratio, dim=-1)  # the CE's own temperature
        lph_y, ph = lph[rows, y], lph.exp()
    else:
        lph_y, ph = lp_s_y, ps
    row_loss = soft_weight * soft
    if hard_on:
        row_loss = row_loss + hard_weight * (-lph_y)
    loss.copy_(torch.where(valid, row_loss, torch.zeros_like(row_loss)))
    entropy = -_xlogy_ratio(ps, lps).sum(-1)
    st = torch.stack([lse_s[:, 0], lse_t[:, 0], lp_s_y, lp_t_y, entropy], dim=1)
    stats.copy_(torch.where(valid[:, None], st, torch.zeros_like(st)))

    if compute_grad:
        g = soft_weight * dsoft
        if hard_on:  # d/dz of CE(z * hard_ratio) = hard_ratio (p_h - onehot(y))
            hw = hard_weight * hard_ratio
            g = g + hw * ph
            g[rows, y] -= hw
        g = to_raw_logit_grad(g, zs, temperature, softcap)
        xs.copy_(torch.where(valid[:, None], g, torch.zeros_like(g)))
