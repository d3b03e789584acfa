"""Float64 ground truth for the kernel tests, written independently of fastopd: the loss is spelled out with
log_softmax and the student-logit gradient comes from float64 autograd, not from the closed forms the kernels use.
"""

from __future__ import annotations

import torch


def _plogr(p: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """sum over the vocab of p * log_ratio, 0 where p == 0; safe for autograd (no inf * 0 in either branch)."""
    pos = p > 0
    return torch.where(pos, p * torch.where(pos, log_ratio, torch.zeros_like(log_ratio)), torch.zeros_like(p)).sum(-1)


def row_divergence64(xs: torch.Tensor, xt: torch.Tensor, labels: torch.Tensor | None, *, divergence: str,
                     beta: float = 0.5, temperature: float = 1.0, softcap: float | None = None,
                     soft_weight: float = 1.0, hard_weight: float = 0.0, ignore_index: int = -100,
                     hard_temperature: float | None = None):
    """Per-row loss [C], stats [C, 5] and dL/dx_s [C, V] (upstream gradient 1 per row), all float64.

    The hard-label CE is of softcap(x_s) / hard_temperature (default: the divergence's temperature).

    xs, xt: raw logits [C, V]. divergence: "fkl" | "rkl" | "jsd" (jsd with beta 0 / 1 is fkl / rkl, TRL's rule).
    """
    xs = xs.detach().double().requires_grad_(True)
    xt = xt.detach().double()
    zs, zt = xs, xt
    if softcap:
        zs, zt = softcap * torch.tanh(zs / softcap), softcap * torch.tanh(zt / softcap)
    ce_logp = torch.log_softmax(zs / (hard_temperature or temperature), -1)
    zs, zt = zs / temperature, zt / temperature
    lps, lpt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    ps, pt = lps.exp(), lpt.exp()
    if divergence == "jsd" and beta == 0.0:
        divergence = "fkl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "rkl"
    if divergence == "fkl":
        soft = _plogr(pt, lpt - lps)
    elif divergence == "rkl":
        soft = _plogr(ps, lps - lpt)
    else:
        mix = beta * pt + (1 - beta) * ps
        safe_mix = torch.where(mix > 0, mix, torch.ones_like(mix))
        lm = torch.where(mix > 0, safe_mix.log(), torch.full_like(mix, float("-inf")))
        soft = beta * _plogr(pt, lpt - lm) + (1 - beta) * _plogr(ps, lps - lm)
    c = xs.shape[0]
    if labels is not None:
        valid = labels != ignore_index
        y = torch.where(valid, labels, torch.zeros_like(labels))
        lps_y = lps.gather(1, y[:, None])[:, 0]
        lpt_y = lpt.gather(1, y[:, None])[:, 0]
    else:
        valid = torch.ones(c, dtype=torch.bool)
        lps_y = lpt_y = torch.zeros(c, dtype=torch.float64)
    row = soft_weight * soft
    if labels is not None and hard_weight:
        row = row - hard_weight * ce_logp.gather(1, y[:, None])[:, 0]
    row = torch.where(valid, row, torch.zeros_like(row))
    grad = torch.autograd.grad(row.sum(), xs)[0] if row.requires_grad else torch.zeros_like(xs)
    entropy = -_plogr(ps, lps)
    lse_s, lse_t = torch.logsumexp(zs, -1), torch.logsumexp(zt, -1)
    stats = torch.stack([lse_s, lse_t, lps_y, lpt_y, entropy], 1)
    stats = torch.where(valid[:, None], stats, torch.zeros_like(stats))
    return row.detach(), stats.detach(), grad.detach()


def rkl_dominant_logits(v: int = 301, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 logits [4, V] of a student with one dominant token (p = 1 - 1e-4 .. 1 - 1e-6) that the teacher
    puts 18..60 below its own top, so rkl is 20..61 and the top token's gradient p_s ((lp_s - lp_t) - rkl) is
    a difference of two numbers of that size. The top token sits in the last, a middle and the first 64-wide
    block; row 2 has it twice (a tie at the student's max, in two blocks)."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(4, v, generator=g, dtype=torch.float64) * 3
    xt = torch.randn(4, v, generator=g, dtype=torch.float64) * 3
    rows, top = torch.arange(4), torch.tensor([v - 1, 250, 3, 130])
    xs[rows, top] = xs.amax(1) + torch.tensor([9.0, 12.0, 7.0, 10.0], dtype=torch.float64)
    xt[rows, top] = xt.amax(1) - torch.tensor([25.0, 40.0, 18.0, 60.0], dtype=torch.float64)
    xs[2, 200] = xs[2, 3]
    return xs, xt
