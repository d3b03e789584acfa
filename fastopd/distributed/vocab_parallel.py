"""Vocab-parallel divergence: each rank of a process group holds a contiguous vocabulary shard of both LM heads.

Tensor-parallel LM heads are sharded by rows ([V_r, D] on rank r, shards in rank order, sizes may differ). The
hidden states are replicated over the group. Per token row every rank computes its shard's logits and the ranks
exchange per-row numbers only, through three all-reduces per chunk of C rows (four for rkl):

    1. MAX  [C, 2]  the max of each model's (soft-capped, temperature-scaled) logits;
    2. SUM  [C, 2]  sum exp(z - max) of each model  ->  global log-probs (z - max) - log(sum) on every shard;
       (rkl: MAX [C], log p_s - log p_t at the student's top token, the pivot the row kernels use too)
    3. SUM  [C, k]  the divergence's cross terms (sum p_t (log p_t - log p_s) for fkl, sum p_s (log p_s - log p_t)
                    for rkl, KL(t||m) and KL(s||m) for jsd), the student entropy, and log p(label) of both
                    models (the label lives on one shard; the others contribute 0).

Then each rank writes the loss (identical on every rank), the stats and dL/dz for its own columns, exactly the
contract of the single-process row kernels (`fastopd.losses.reference.divergence_chunk_`). The hidden-state
gradient G W_r of each shard is a partial sum: `copy_to_vocab_parallel` (identity forward, all-reduce backward,
Megatron's "copy to tensor-parallel region") sums it. Nothing O(tokens x vocab) crosses the wire.

The row math runs in torch ops on the shard (on a GPU, several elementwise passes rather than one fused kernel).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fastopd.losses.reference import FKL, JSD, RKL, _xlogy_ratio, scaled_logits

_SIZES: dict[tuple, tuple[tuple[int, int], ...]] = {}


def shard_sizes(student_rows: int, teacher_rows: int, group: dist.ProcessGroup) -> tuple[tuple[int, int], ...]:
    """Every rank's (student, teacher) head rows, in rank order.

    Gathered once per (group, sizes) and cached: later calls need no communication (and no host sync)."""
    key = (id(group), student_rows, teacher_rows)
    if key not in _SIZES:
        sizes: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(sizes, (int(student_rows), int(teacher_rows)), group=group)
        _SIZES[key] = tuple(tuple(s) for s in sizes)
    return _SIZES[key]


def vocab_layout(student_rows: int, teacher_rows: int, vocab_size: int | None,
                 group: dist.ProcessGroup) -> tuple[int, int, int]:
    """(shared vocabulary, this rank's first global column, this rank's columns of it) for row-sharded heads.

    Every rank checks the whole layout, so a bad one raises the same ValueError on every rank (none is left
    waiting in a collective). Raises when the student and teacher shards do not cover the shared vocabulary
    identically."""
    sizes = shard_sizes(student_rows, teacher_rows, group)
    total_s, total_t = sum(s for s, _ in sizes), sum(t for _, t in sizes)
    if vocab_size is None:
        if total_s != total_t:
            raise ValueError(f"student and teacher vocab sizes differ ({total_s} vs {total_t} over the "
                             "vocab-parallel group); pass vocab_size= for the shared leading part")
        vocab = total_s
    elif not 0 < vocab_size <= min(total_s, total_t):
        raise ValueError(f"vocab_size={vocab_size} must lie in [1, {min(total_s, total_t)}] for heads of "
                         f"{total_s} (student) and {total_t} (teacher) rows over the vocab-parallel group")
    else:
        vocab = int(vocab_size)
    ends_s, ends_t, es, et = [], [], 0, 0
    for s, t in sizes:
        es, et = es + s, et + t
        ends_s.append(min(es, vocab))
        ends_t.append(min(et, vocab))
    if ends_s != ends_t:
        raise ValueError(f"student and teacher heads are sharded differently over the vocab-parallel group "
                         f"(rows per rank {[s for s, _ in sizes]} vs {[t for _, t in sizes]}): shard both alike")
    rank = dist.get_rank(group)
    start = ends_s[rank - 1] if rank > 0 else 0
    return vocab, start, ends_s[rank] - start


class _CopyToVocabParallel(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (each shard's G W_r is a partial sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def copy_to_vocab_parallel(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """`x` itself in the forward; its gradient is all-reduced (summed) over `group` in the backward."""
    return _CopyToVocabParallel.apply(x, group)


def _row_max(z: torch.Tensor) -> torch.Tensor:
    if z.shape[1] == 0:  # a rank whose shard holds no column of the shared vocabulary
        return torch.full((z.shape[0],), -math.inf, dtype=z.dtype, device=z.device)
    return z.amax(dim=-1)


def vocab_parallel_kernel(group: dist.ProcessGroup, vocab_start: int):
    """A row kernel with the `divergence_chunk_` contract for shards starting at global column `vocab_start`."""

    @torch.no_grad()
    def divergence_chunk_(xs: torch.Tensor, xt: torch.Tensor, labels: torch.Tensor | None, loss: torch.Tensor,
                          stats: torch.Tensor, divergence: int, beta: float, temperature: float, softcap: float,
                          soft_weight: float, hard_weight: float, ignore_index: int, compute_grad: bool,
                          hard_ratio: float = 1.0) -> None:
        zs, zt = scaled_logits(xs, softcap, temperature), scaled_logits(xt, softcap, temperature)
        # The hard-label CE at its own temperature: of z_s * hard_ratio, whose max is hard_ratio * max(z_s),
        # so its normalizer rides in the same SUM all-reduce.
        hard_t = hard_weight != 0 and labels is not None and hard_ratio != 1.0
        c_rows, width = zs.shape

        m = torch.stack([_row_max(zs), _row_max(zt)], dim=1)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        ds, dt = zs - m[:, :1], zt - m[:, 1:]
        sums = torch.stack([ds.exp().sum(-1), dt.exp().sum(-1)] + ([(ds * hard_ratio).exp().sum(-1)] if hard_t else []),
                           dim=1)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        log_sums = sums.log()
        lph = ds * hard_ratio - log_sums[:, 2:] if hard_t else None
        lps, lpt = ds - log_sums[:, :1], dt - log_sums[:, 1:2]  # (z - max) - log(sum): precise near log p = 0
        ps, pt = lps.exp(), lpt.exp()

        if divergence == FKL:
            cross = [_xlogy_ratio(pt, lpt - lps).sum(-1)]
        elif divergence == RKL:
            # As the row kernels do: d = lp_s - lp_t relative to its value c at the student's top token, so the
            # gradient p_s ((d - c) - S) of a dominant token cancels small numbers only (rkl = c + S). c comes from
            # the rank holding the global max (one more MAX all-reduce; ties pick the largest candidate).
            d = lps - lpt
            if width:
                top = zs.argmax(-1, keepdim=True)
                c = torch.where(zs.gather(1, top)[:, 0] == m[:, 0], d.gather(1, top)[:, 0],
                                torch.full((c_rows,), -math.inf, dtype=zs.dtype, device=zs.device))
            else:
                c = torch.full((c_rows,), -math.inf, dtype=zs.dtype, device=zs.device)
            dist.all_reduce(c, op=dist.ReduceOp.MAX, group=group)
            c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))[:, None]  # teacher -inf there: loss inf
            r = d - c
            cross = [_xlogy_ratio(ps, r).sum(-1)]
        elif divergence == JSD:
            lm = torch.logaddexp(lpt + math.log(beta), lps + math.log1p(-beta))
            cross = [_xlogy_ratio(pt, lpt - lm).sum(-1), _xlogy_ratio(ps, lps - lm).sum(-1)]
        else:
            raise ValueError(f"unknown divergence code {divergence}")

        rows = torch.arange(c_rows, device=xs.device)
        zero = torch.zeros(c_rows, dtype=zs.dtype, device=zs.device)
        if labels is not None:
            valid = labels != ignore_index
            local = labels - vocab_start
            here = valid & (local >= 0) & (local < width)
            y = torch.where(here, local, torch.zeros_like(local))
            lp_s_y = torch.where(here, lps[rows, y], zero) if width else zero
            lp_t_y = torch.where(here, lpt[rows, y], zero) if width else zero
            lph_y = (torch.where(here, lph[rows, y], zero) if width else zero) if hard_t else None
        else:
            valid = torch.ones(c_rows, dtype=torch.bool, device=xs.device)
            here = None
            lp_s_y = lp_t_y = zero
        terms = torch.stack([*cross, -_xlogy_ratio(ps, lps).sum(-1), lp_s_y, lp_t_y] + ([lph_y] if hard_t else []),
                            dim=1)
        dist.all_reduce(terms, op=dist.ReduceOp.SUM, group=group)
        if hard_t:
            lph_y, terms = terms[:, -1], terms[:, :-1]
        entropy, lp_s_y, lp_t_y = terms[:, -3], terms[:, -2], terms[:, -1]

        if divergence == JSD:
            kl_t, kl_s = terms[:, 0], terms[:, 1]
            soft = beta * kl_t + (1.0 - beta) * kl_s
        elif divergence == RKL:
            s_rel = terms[:, 0]
            soft = c[:, 0] + s_rel
        else:
            soft = terms[:, 0]
        row_loss = soft_weight * soft
        if hard_weight != 0 and labels is not None:
            row_loss = row_loss - hard_weight * (lph_y if hard_t else lp_s_y)
        loss.copy_(torch.where(valid, row_loss, torch.zeros_like(row_loss)))
        lse = m + log_sums[:, :2]
        st = torch.stack([lse[:, 0], lse[:, 1], lp_s_y, lp_t_y, entropy], dim=1)
        stats.copy_(torch.where(valid[:, None], st, torch.zeros_like(st)))

        if not compute_grad:
            return
        if divergence == FKL:
            g = ps - pt
        elif divergence == RKL:
            g = _xlogy_ratio(ps, r - s_rel[:, None])
        else:
            g = (1.0 - beta) * _xlogy_ratio(ps, (lps - lm) - kl_s[:, None])
        g = soft_weight * g
        if hard_weight != 0 and labels is not None:  # d/dz_s of the CE: hw (p_h - onehot(y)), hw = weight x ratio
            hw = hard_weight * hard_ratio if hard_t else hard_weight
            g = g + hw * (lph.exp() if hard_t else ps)
            if width:  # -hw at the label's column, on the rank that holds it (no host sync)
                g.scatter_add_(1, y[:, None], (-hw * here.to(g.dtype))[:, None])
        chain = 1.0 / temperature
        if softcap > 0:
            chain = chain * (1.0 - (zs * temperature / softcap) ** 2)
        g = g * chain
        xs.copy_(torch.where(valid[:, None], g, torch.zeros_like(g)))

    return divergence_chunk_
