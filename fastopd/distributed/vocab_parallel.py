"""Vocab-parallel divergence: each rank of a process group holds a contiguous vocabulary shard of both LM heads.

Tensor-parallel LM heads are sharded by rows ([V_r, D] on rank r, shards in rank order, sizes may differ). The
hidden states are replicated over the group. Per token row every rank computes its shard's logits and the ranks
exchange per-row numbers only, through three all-reduces per chunk of C rows (four for rkl):

    1. MAX  [C, 2]  the max of each model's (soft-capped, temperature-scaled) logits;
    2. SUM  [C, 3]  each shard's sum exp(z - its own max) rescaled to the row's max, of each model (and of the
                    hard-label CE's r z_s)  ->  global log-probs (z - max) - log(sum) on every shard;
       (rkl: MAX [C], log p_s - log p_t at the student's top token, the pivot the row kernels use too)
    3. SUM  [C, k]  the divergence's cross terms (sum p_t (log p_t - log p_s) for fkl, sum p_s (log p_s - log p_t)
                    for rkl, KL(t||m) and KL(s||m) for jsd), the student entropy, and log p(label) of both
                    models (the label lives on one shard; the others contribute 0).

Then each rank writes the loss (identical on every rank), the stats and dL/dz for its own columns, exactly the
contract of the single-process row kernels (`fastopd.losses.reference.divergence_chunk_`). The hidden-state
gradient G W_r of each shard is a partial sum: the loss sums it in fp32 through the kernel's `reduce_grad_hidden`
(called by the autograd Function before its cast to the hidden states' dtype, so a bf16 gradient is rounded once);
`copy_to_vocab_parallel` (identity forward, all-reduce backward, Megatron's "copy to tensor-parallel region") does
the same for callers of their own. Nothing O(tokens x vocab) crosses the wire.

The row math on the shard runs in three phases with the all-reduces between them: on CUDA tensors the Triton row
kernel's passes, one launch each (fastopd/kernels/vocab_parallel.py, no [C x V_r] temporary), elsewhere
`torch_phase_` in torch ops (the reference).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fastopd._numbers import as_int
from fastopd.losses.reference import FKL, JSD, RKL, _xlogy_ratio, scaled_logits, to_raw_logit_grad

_SIZES: dict[tuple, tuple[tuple[tuple[int, int], ...], torch.Tensor]] = {}


def _sizes_device(group: dist.ProcessGroup) -> tuple[torch.device, bool]:
    """Where the shard sizes are exchanged, and whether reading them back is free: the CPU when the group has a
    CPU backend (gloo: no device synchronization), else the current CUDA device (NCCL: a read synchronizes)."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu"), True
    return torch.device("cuda", torch.cuda.current_device()), False


def shard_sizes(student_rows: int, teacher_rows: int, group: dist.ProcessGroup) -> tuple[tuple[int, int], ...]:
    """Every rank's (student, teacher) head rows, in rank order.

    One SUM all-reduce of [world, 2] integers per call, on every rank whatever it has seen before, so the ranks
    always meet in the same collectives (a cache hit on one rank and a miss on another, e.g. heads of another
    vocabulary that changed only the other ranks' shards, would leave them waiting in different ones). On a CPU
    backend the sizes are read back at no cost. On a device backend they are read (a host sync) the first time
    this rank sees its sizes in the group; later calls use that layout, checked against the exchanged sizes on
    the device (`torch._assert_async`: no host sync), so a layout changed on another rank is not used silently.
    On CUDA that check is a device-side assert, fatal to the process (its CUDA context is lost, and peers may wait
    in the loss's collectives until the NCCL timeout): after re-sharding a head under a device-only backend, call
    `clear_layout_cache()` on every rank BEFORE the next loss call."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device, free_read = _sizes_device(group)
    exchanged = torch.zeros(world, 2, dtype=torch.int64, device=device)
    exchanged[rank, 0] = int(student_rows)  # scalar fills: no host-to-device copy to wait for
    exchanged[rank, 1] = int(teacher_rows)
    dist.all_reduce(exchanged, op=dist.ReduceOp.SUM, group=group)
    if free_read:
        return tuple(tuple(r) for r in exchanged.tolist())
    key = (id(group), world, device, int(student_rows), int(teacher_rows))
    if key not in _SIZES:
        _SIZES[key] = (tuple(tuple(r) for r in exchanged.tolist()), exchanged)
        return _SIZES[key][0]
    sizes, seen = _SIZES[key]
    torch._assert_async((exchanged == seen).all(),
                        "fastopd: the vocab-parallel head shards of other ranks changed since this rank last used "
                        "its shard sizes in this group (fatal on CUDA); call "
                        "fastopd.distributed.vocab_parallel.clear_layout_cache() on every rank before the first loss "
                        "call after re-sharding")
    return sizes


def clear_layout_cache() -> None:
    """Forgets the shard layouts `shard_sizes` remembered (device backends), e.g. after re-sharding a head."""
    _SIZES.clear()


def vocab_layout(student_rows: int, teacher_rows: int, vocab_size: int | None,
                 group: dist.ProcessGroup) -> tuple[int, int, int]:
    """(shared vocabulary, this rank's first global column, this rank's columns of it) for row-sharded heads.

    Every rank checks the whole layout, so a bad one raises the same ValueError on every rank (none is left
    waiting in a collective). Raises when the shared vocabulary is empty, or when the student and teacher shards
    do not cover it identically."""
    sizes = shard_sizes(student_rows, teacher_rows, group)
    total_s, total_t = sum(s for s, _ in sizes), sum(t for _, t in sizes)
    if vocab_size is None:
        if total_s != total_t:
            raise ValueError(f"student and teacher vocab sizes differ ({total_s} vs {total_t} over the "
                             "vocab-parallel group); pass vocab_size= for the shared leading part")
        if total_s == 0:
            raise ValueError(f"the vocabulary is empty (student and teacher head rows per rank "
                             f"{[s for s, _ in sizes]} over the vocab-parallel group): a divergence needs at "
                             "least one entry")
        vocab = total_s
    else:
        vocab = as_int(vocab_size)  # an int, as the single-process loss takes it (2.5 is not truncated, True is not 1)
        if vocab is None or not 0 < vocab <= min(total_s, total_t):
            raise ValueError(f"vocab_size={vocab_size!r} must be an int in [1, {min(total_s, total_t)}] for heads "
                             f"of {total_s} (student) and {total_t} (teacher) rows over the vocab-parallel group")
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


def check_replicated_rows(x: torch.Tensor, group: dist.ProcessGroup) -> None:
    """Checks that every rank of `group` holds hidden states of the same size: [N, D], or [..., D] with N the
    product of the leading dims (they are replicated over a tensor-parallel group): one SUM all-reduce of
    [world, 2] integers, the same collective on every rank whatever its N. Without it, ranks of different N run
    different numbers of chunks (or chunks of different sizes) and meet in mismatched collectives: gloo aborts the
    process ("Received data size doesn't match expected size") or the ranks wait for each other until the
    process-group timeout, and NCCL does not check sizes at all; a hidden size that differs breaks the all-reduce
    of the hidden-state gradient in the backward. On a CPU backend every rank reads the exchanged shapes (no
    device sync) and raises the same ValueError; on a device backend the check is a device-side assert (no host
    sync; fatal to the process on CUDA, with the message below)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    # rows: all leading dims together ([N, D] from the loss; [B, T, D] from a caller), so any shape whose gradient
    # the backward could not all-reduce across the group is caught
    n, d = (math.prod(x.shape[:-1]), int(x.shape[-1])) if x.dim() else (1, 1)
    device, free_read = _sizes_device(group)
    exchanged = torch.zeros(world, 2, dtype=torch.int64, device=device)
    exchanged[rank, 0] = n  # scalar fills: no host-to-device copy to wait for
    exchanged[rank, 1] = d
    dist.all_reduce(exchanged, op=dist.ReduceOp.SUM, group=group)
    what = ("fastopd: the vocab-parallel loss needs the same token rows on every rank of its group (hidden states "
            "and labels replicated over the tensor-parallel group)")
    if free_read:
        shapes = [tuple(r) for r in exchanged.tolist()]
        if any(s != shapes[0] for s in shapes):
            raise ValueError(f"{what}; got student hidden states of [rows, hidden] {[list(s) for s in shapes]} "
                             "per rank of the group, in rank order")
        return
    torch._assert_async((exchanged == exchanged[rank]).all(), what + "; got other shapes on other ranks")


def copy_to_vocab_parallel(x: torch.Tensor, group: dist.ProcessGroup, check: bool = True) -> torch.Tensor:
    """`x` itself in the forward; its gradient is all-reduced (summed) over `group` in the backward.

    That all-reduce, and the loss's per-chunk ones, need `x` of the same shape on every rank: with `check` (the
    default) `check_replicated_rows` makes sure of it first (a ValueError on every rank under gloo)."""
    if check:
        check_replicated_rows(x, group)
    return _CopyToVocabParallel.apply(x, group)


@torch.no_grad()
def torch_phase_(phase: int, xs: torch.Tensor, xt: torch.Tensor, y: torch.Tensor, info: torch.Tensor | None,
                 out: torch.Tensor | None, divergence: int, beta: float, temperature: float, softcap: float,
                 soft_weight: float, hard_weight: float, hard_ratio: float, hard: bool, compute_grad: bool) -> None:
    """One phase of the vocab-parallel row math in torch ops: the reference backend, with the contract of the
    Triton phases (fastopd/kernels/vocab_parallel.py): phase 1 this shard's (max, sum exp) of both models (and of
    the hard-label CE's r z_s, and rkl's teacher z at the student's top token) into fp64 out [C, 6]; phase 2 the
    divergence sums and sum p_s lp_s given the whole row's normalizers in info [C, 8] into out [C, 3] (fkl: also
    the gradient); phase 3 the rkl/jsd gradient given K = info[:, 6]. y: label column here (>= 0), elsewhere
    (-1), ignored row (-2)."""
    if phase == 3 and (not compute_grad or divergence == FKL):
        return
    zs, zt = scaled_logits(xs, softcap, temperature), scaled_logits(xt, softcap, temperature)
    hard_t = hard and hard_ratio != 1.0
    if phase == 1:
        m_s, m_t = zs.amax(-1, keepdim=True), zt.amax(-1, keepdim=True)
        safe_s = torch.where(torch.isfinite(m_s), m_s, torch.zeros_like(m_s))
        safe_t = torch.where(torch.isfinite(m_t), m_t, torch.zeros_like(m_t))
        parts = [m_s[:, 0].double(), (zs - safe_s).exp().double().sum(-1),
                 m_t[:, 0].double(), (zt - safe_t).exp().double().sum(-1)]
        parts.append(((zs - safe_s) * hard_ratio).exp().double().sum(-1) if hard_t else torch.zeros_like(parts[0]))
        parts.append(torch.where(zs == m_s, zt, -math.inf).amax(-1).double() if divergence == RKL
                     else torch.full_like(parts[0], -math.inf))
        out.copy_(torch.stack(parts, dim=1))
        return
    m_s, log_s, m_t, log_t, log_h, pivot, k = (info[:, i:i + 1] for i in range(7))
    lps, lpt = (zs - m_s) - log_s, (zt - m_t) - log_t
    ps, pt = lps.exp(), lpt.exp()
    valid = (y != -2)[:, None]
    if divergence == JSD:
        lm = torch.logaddexp(lpt + math.log(beta), lps + math.log1p(-beta))
    if phase == 2:
        zero = torch.zeros_like(ps[:, 0])
        if divergence == FKL:
            sums = [_xlogy_ratio(pt, lpt - lps).sum(-1), zero]
        elif divergence == RKL:
            sums = [_xlogy_ratio(ps, (lps - lpt) - pivot).sum(-1), zero]
        else:
            sums = [_xlogy_ratio(pt, lpt - lm).sum(-1), _xlogy_ratio(ps, lps - lm).sum(-1)]
        out.copy_(torch.where(valid, torch.stack([*sums, _xlogy_ratio(ps, lps).sum(-1)], dim=1), 0.0))
        if not (compute_grad and divergence == FKL):
            return
        g = ps - pt
    elif divergence == RKL:
        g = _xlogy_ratio(ps, ((lps - lpt) - pivot) - k)
    else:
        g = (1.0 - beta) * _xlogy_ratio(ps, (lps - lm) - k)
    g = soft_weight * g
    if hard:  # d/dz_s of the CE: hw (p_h - onehot(y)), hw = weight x ratio; -hw only on the shard with the label
        hw = hard_weight * hard_ratio if hard_t else hard_weight
        g = g + hw * (((zs - m_s) * hard_ratio - log_h).exp() if hard_t else ps)
        here = y >= 0
        g.scatter_add_(1, torch.where(here, y, 0)[:, None], (-hw * here.to(g.dtype))[:, None])
    xs.copy_(torch.where(valid, to_raw_logit_grad(g, zs, temperature, softcap), 0.0))


def _masked(x: torch.Tensor, keep: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    return torch.where(keep, x, torch.full_like(x, fill))


def vocab_parallel_kernel(group: dist.ProcessGroup | None, vocab_start: int, phase=torch_phase_, all_reduce=None):
    """A row kernel with the `divergence_chunk_` contract for shards starting at global column `vocab_start`.

    `phase` is a backend's phase function (`torch_phase_`, or the Triton one); the all-reduces between the
    phases, and the [C]-sized combination of their results, happen here. `all_reduce(tensor, op)` replaces
    `torch.distributed.all_reduce` over `group` (tests run one shard as the whole vocabulary with a no-op)."""
    if all_reduce is None:
        def all_reduce(t: torch.Tensor, op) -> None:
            dist.all_reduce(t, op=op, group=group)

    @torch.no_grad()
    def divergence_chunk_(xs: torch.Tensor, xt: torch.Tensor, labels: torch.Tensor | None, loss: torch.Tensor,
                          stats: torch.Tensor, divergence: int, beta: float, temperature: float, softcap: float,
                          soft_weight: float, hard_weight: float, ignore_index: int, compute_grad: bool,
                          hard_ratio: float = 1.0) -> None:
        c_rows, width = xs.shape
        dev = xs.device
        hard = hard_weight != 0 and labels is not None
        hard_t = hard and hard_ratio != 1.0
        # Where each row's label is (a column here, elsewhere, or an ignored row), and its logits, read before a
        # gradient overwrites xs.
        if labels is not None:
            valid = labels != ignore_index
            local = labels - vocab_start
            here = valid & (local >= 0) & (local < width)
            y = torch.where(here, local, torch.where(valid, -1, -2))
            if width:
                col = torch.where(here, local, 0)[:, None]
                z_y = scaled_logits(torch.cat([xs.gather(1, col), xt.gather(1, col)], dim=1).float(), softcap,
                                    temperature)
            else:
                z_y = torch.zeros(c_rows, 2, dtype=torch.float32, device=dev)
        else:
            valid = torch.ones(c_rows, dtype=torch.bool, device=dev)
            here = torch.zeros_like(valid)
            y = torch.full((c_rows,), -1, dtype=torch.int64, device=dev)
            z_y = torch.zeros(c_rows, 2, dtype=torch.float32, device=dev)
        args = (divergence, beta, temperature, softcap, soft_weight, hard_weight, hard_ratio, hard, compute_grad)

        # Phase 1, then MAX and SUM all-reduces: the whole row's max and sums (each shard's rescaled to the max).
        part = torch.empty(c_rows, 6, dtype=torch.float64, device=dev)
        if width:
            phase(1, xs, xt, y, None, part, *args)
        else:  # a rank whose shard holds no column of the shared vocabulary
            part.zero_()
            part[:, 0:4:2] = -math.inf  # no max, empty sums
            part[:, 5] = -math.inf
        # (column slices, not index lists: a list would be copied to the device for every chunk)
        maxima = part[:, 0:4:2]  # each model's max on this shard
        m = maxima.contiguous()
        all_reduce(m, dist.ReduceOp.MAX)
        m = _masked(m, torch.isfinite(m))
        shift = _masked(maxima - m, torch.isfinite(maxima), -math.inf)
        sums = torch.stack([part[:, 1] * shift[:, 0].exp(), part[:, 3] * shift[:, 1].exp(),
                            part[:, 4] * (shift[:, 0] * hard_ratio).exp()], dim=1)
        all_reduce(sums, dist.ReduceOp.SUM)
        log_sums = sums.log()
        # rkl's pivot: lp_s - lp_t at the student's top token, from the rank that holds the row's max (one more
        # MAX all-reduce; ties pick the largest candidate). Teacher -inf there: the loss is inf anyway.
        pivot = torch.zeros(c_rows, dtype=torch.float64, device=dev)
        if divergence == RKL:
            pivot = _masked((0.0 - log_sums[:, 0]) - ((part[:, 5] - m[:, 1]) - log_sums[:, 1]),
                            torch.isfinite(part[:, 0]) & (part[:, 0] == m[:, 0]), -math.inf)
            all_reduce(pivot, dist.ReduceOp.MAX)
            pivot = _masked(pivot, torch.isfinite(pivot))
        info = torch.zeros(c_rows, 8, dtype=torch.float32, device=dev)
        info[:, :6] = torch.stack([m[:, 0], log_sums[:, 0], m[:, 1], log_sums[:, 1], log_sums[:, 2], pivot], dim=1)

        # Phase 2, then one SUM all-reduce of the divergence sums, the entropy and the label's log-probs.
        terms = torch.zeros(c_rows, 3, dtype=torch.float32, device=dev)
        if width:
            phase(2, xs, xt, y, info, terms, *args)
        lp_y = _masked((z_y - info[:, 0:4:2]) - info[:, 1:4:2], here[:, None])
        lph_y = _masked((z_y[:, 0] - info[:, 0]) * hard_ratio - info[:, 4], here)
        terms = torch.cat([terms, lp_y, lph_y[:, None]], dim=1)
        all_reduce(terms, dist.ReduceOp.SUM)
        acc_a, acc_b, ent, lp_s_y, lp_t_y, lph_y = terms.unbind(1)

        # Phase 3 (rkl, jsd): the gradient, given the row's K.
        if width and compute_grad and divergence != FKL:
            info[:, 6] = acc_a if divergence == RKL else acc_b
            phase(3, xs, xt, y, info, None, *args)

        if divergence == JSD:
            soft = beta * acc_a + (1.0 - beta) * acc_b
        elif divergence == RKL:
            soft = info[:, 5] + acc_a
        else:
            soft = acc_a
        row_loss = soft_weight * soft
        if hard:
            row_loss = row_loss - hard_weight * (lph_y if hard_t else lp_s_y)
        loss.copy_(_masked(row_loss, valid))
        lse = (m + log_sums[:, :2]).float()
        stats.copy_(_masked(torch.stack([lse[:, 0], lse[:, 1], lp_s_y, lp_t_y, -ent], dim=1), valid[:, None]))

    def reduce_grad_hidden(grad_h: torch.Tensor) -> None:
        """Sums each shard's partial hidden-state gradient G W_r over the group, in place (called by the autograd
        Function on its fp32 gradient, before the cast to the hidden states' dtype)."""
        all_reduce(grad_h, dist.ReduceOp.SUM)

    divergence_chunk_.reduce_grad_hidden = reduce_grad_hidden

    return divergence_chunk_
