"""Vocab-parallel loss on 3 gloo processes against a float64 reference written here (not fastopd's) and against
one process: V=1001 in shards of 334/334/333, Ds != Dt, biases (some entries masked with -inf in both heads),
every divergence, several JSD betas, temperature, softcap, the hard-label mix with its own temperature,
ignore_index rows, `vocab_size` padding, chunking, every reduction with a non-unit upstream gradient,
num_items_in_batch, bf16 inputs, DTensor heads and a tensor-parallel group that is not WORLD (ranks {0, 2} of 3).
Every rank's hidden-state gradient must be the full one, and each rank's weight and bias shard gradients its rows
of the full ones. Also: token rows that differ across the ranks of the group raise the same ValueError on every
rank (they used to abort the process inside gloo, or hang in mismatched collectives until the timeout).
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_harness import run_ranks

import fastopd
from fastopd import _dispatch

N, DS, DT, V = 15, 10, 7, 1001
WORLD = 3
ROWS = [334, 334, 333]

CASES = [
    dict(divergence="fkl"),
    dict(divergence="rkl"),
    dict(divergence="jsd", beta=0.1),
    dict(divergence="jsd", beta=0.5, temperature=1.7, softcap=2.5),
    dict(divergence="jsd", beta=0.9, masked=True),
    dict(divergence="rkl", temperature=0.6, softcap=4.0, masked=True),
    dict(divergence="jsd", beta=0.3, temperature=2.0, hard_label_weight=0.4, hard_label_temperature=1.0),
    dict(divergence="fkl", hard_label_weight=0.7, soft_label_weight=0.5, reduction="sum"),
    dict(divergence="rkl", reduction="none", chunk_size=4, hard_label_weight=0.3),
    dict(divergence="jsd", beta=0.7, reduction="none", vocab_size=990, chunk_size=3, ignore_index=-1),
    dict(divergence="fkl", num_items_in_batch=40, vocab_size=700),
    dict(divergence="jsd", beta=0.5, dtype=torch.bfloat16),
    dict(divergence="rkl", hard_label_weight=0.5, group=(0, 2), rows=[500, 501]),
    dict(divergence="jsd", beta=0.5, dtensor=True),
]
DATA_KEYS = ("dtype", "masked", "group", "rows", "dtensor")


def _data(case: dict):
    g = torch.Generator().manual_seed(2024)
    dtype = case.get("dtype", torch.float32)
    hs = torch.randn(N, DS, generator=g).to(dtype)
    ws = (torch.randn(V, DS, generator=g) * 0.5).to(dtype)
    ht = torch.randn(N, DT, generator=g).to(dtype)
    wt = (torch.randn(V, DT, generator=g) * 0.5).to(dtype)
    bs, bt = torch.randn(V, generator=g), torch.randn(V, generator=g)
    if case.get("masked"):  # tokens masked out of both models (an -inf bias), one of them in every shard
        for i in (5, 400, 999):
            bs[i] = bt[i] = -math.inf
    vocab = case.get("vocab_size", V)
    labels = torch.randint(0, vocab, (N,), generator=g)
    if case.get("masked"):
        labels[(labels == 5) | (labels == 400) | (labels == 999)] = 6
    labels[[1, 8]] = case.get("ignore_index", -100)
    upstream = torch.rand(N, generator=g) + 0.5
    return hs, ws, ht, wt, bs.to(dtype), bt.to(dtype), labels, upstream


def _backward(loss: torch.Tensor, upstream: torch.Tensor) -> None:
    (loss * upstream.to(loss.dtype)).sum().backward() if loss.dim() else (2.5 * loss).backward()


def _run(case, hs, ws, ht, wt, bs, bt, labels, upstream, group=None, impl="auto") -> dict:
    hs = hs.clone().requires_grad_(True)
    if not hasattr(ws, "placements"):  # a DTensor shard comes in as a leaf already
        ws, bs = ws.detach().clone().requires_grad_(True), bs.detach().clone().requires_grad_(True)
    opts = {k: v for k, v in case.items() if k not in DATA_KEYS}
    loss, stats = fastopd.fused_linear_divergence(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt,
                                                  return_stats=True, vocab_parallel_group=group, impl=impl, **opts)
    _backward(loss, upstream)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  (a DTensor's own rows)
    return dict(loss=loss.detach(), stats=torch.stack(list(stats)), grad_h=hs.grad, grad_w=local(ws.grad),
                grad_b=local(bs.grad))


def _reference64(case, hs, ws, ht, wt, bs, bt, labels, upstream) -> dict:
    """The loss, the stats and the gradients in float64 from the definitions (design.md), by autograd."""
    # -inf biases as -1e4: exp underflows to exactly 0 in float64 (the same distributions), and autograd meets
    # no inf - inf
    bs, bt = (t.double().clamp_min(-1e4) for t in (bs, bt))
    hs, ws, bs = (t.double().requires_grad_(True) for t in (hs, ws, bs))
    xs, xt = hs @ ws.T + bs, ht.double() @ wt.double().T + bt
    vocab = case.get("vocab_size", V)
    cap, temp = case.get("softcap"), case.get("temperature", 1.0)
    if cap:
        xs, xt = cap * torch.tanh(xs / cap), cap * torch.tanh(xt / cap)
    xs, xt = xs[:, :vocab], xt[:, :vocab]
    zs, zt = xs / temp, xt / temp
    lps, lpt = zs.log_softmax(-1), zt.log_softmax(-1)
    ps, pt = lps.exp(), lpt.exp()
    kl = lambda p, lp, lq: (p * (lp - lq)).sum(-1)  # noqa: E731
    div, beta = case["divergence"], case.get("beta", 0.5)
    if div == "fkl":
        soft = kl(pt, lpt, lps)
    elif div == "rkl":
        soft = kl(ps, lps, lpt)
    else:
        lm = torch.logaddexp(lpt + math.log(beta), lps + math.log(1 - beta))
        soft = beta * kl(pt, lpt, lm) + (1 - beta) * kl(ps, lps, lm)
    valid = labels != case.get("ignore_index", -100)
    y = torch.where(valid, labels, 0)[:, None]
    row = case.get("soft_label_weight", 1.0) * soft
    if case.get("hard_label_weight"):
        zh = xs / (case.get("hard_label_temperature") or temp)
        row = row + case["hard_label_weight"] * (zh.logsumexp(-1) - zh.gather(1, y)[:, 0])
    row = torch.where(valid, row, 0.0)
    stats = torch.stack([zs.logsumexp(-1), zt.logsumexp(-1), lps.gather(1, y)[:, 0], lpt.gather(1, y)[:, 0],
                         -(ps * lps).sum(-1)])
    stats = torch.where(valid, stats, 0.0)
    red = case.get("reduction", "mean")
    loss = row if red == "none" else row.sum()
    if red == "mean":
        loss = loss / (case.get("num_items_in_batch") or valid.sum())
    _backward(loss, upstream.double())
    return dict(loss=loss.detach(), stats=stats.detach(), grad_h=hs.grad, grad_w=ws.grad, grad_b=bs.grad)


def _bounds(rows: list[int]) -> list[tuple[int, int]]:
    starts = [sum(rows[:r]) for r in range(len(rows))]
    return [(s, s + n) for s, n in zip(starts, rows)]


def float64_worker(rank: int, world: int, impl: str) -> list:
    import torch.distributed as dist

    sub = dist.new_group([0, 2])  # every rank takes part in creating a group, members or not
    mesh = None
    out = []
    for case in CASES:
        members = case.get("group", tuple(range(world)))
        if rank not in members:
            out.append(None)
            continue
        group = sub if "group" in case else dist.group.WORLD
        a, b = _bounds(case.get("rows", ROWS))[dist.get_rank(group)]
        hs, ws, ht, wt, bs, bt, labels, upstream = _data(case)
        if case.get("dtensor"):  # Shard(0) of the full heads: torch.chunk's split of 1001 rows, 334/334/333
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Shard, distribute_tensor

            mesh = mesh or init_device_mesh("cpu", (world,))
            heads = tuple(distribute_tensor(t, mesh, [Shard(0)]).requires_grad_(grad)
                          for t, grad in ((ws, True), (wt, False), (bs, True), (bt, False)))
            group = mesh.get_group()
        else:
            heads = (ws[a:b], wt[a:b], bs[a:b], bt[a:b])
        out.append(_run(case, hs, heads[0], ht, heads[1], heads[2], heads[3], labels, upstream, group=group,
                        impl=impl))
    return out


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), "inf/nan at other places"
    return float((got - want)[finite].abs().max() / want[finite].abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_vocab_parallel_matches_float64_and_one_process(impl):
    why = _dispatch.available("vocab_parallel_chunk", impl, "cpu")
    if why is not None:
        pytest.skip(f"vocab-parallel backend {impl!r} cannot run here: {why}")
    per_rank = run_ranks(float64_worker, WORLD, impl, deadline_s=400)
    for i, case in enumerate(CASES):
        data = _data(case)
        single = _run(case, *data, impl="torch")
        ref = _reference64(case, *data)
        bf16 = case.get("dtype") == torch.bfloat16
        members = case.get("group", tuple(range(WORLD)))
        for idx, (a, b) in enumerate(_bounds(case.get("rows", ROWS))):
            got = per_rank[members[idx]][i]
            for key in ("loss", "stats", "grad_h", "grad_w", "grad_b"):
                shard = key in ("grad_w", "grad_b")  # this rank's rows of the full gradient
                one, want = (single[key][a:b], ref[key][a:b]) if shard else (single[key], ref[key])
                what = f"{case} rank {members[idx]} {key}"
                torch.testing.assert_close(got[key], one, rtol=1e-5, atol=1e-6, msg=f"{what}: against one process")
                if bf16 and key.startswith("grad"):  # bf16 gradients: at most 2x the rounding of the exact ones
                    limit = 2 * _rel(want.to(torch.bfloat16), want) + 1e-6
                else:
                    limit = 1e-5
                err = _rel(got[key], want)
                assert err <= limit, f"{what}: relative error {err:.2e} against float64 (limit {limit:.1e})"


def rows_worker(rank: int, world: int) -> list[str]:
    """Token rows (or hidden sizes) that differ across the group; on the CPU path and on the device-backend path
    (a device-side assert, run on gloo by declaring the read of the exchanged shapes not free)."""
    import torch.distributed as dist

    from fastopd.distributed import vocab_parallel

    g = torch.Generator().manual_seed(0)
    msgs = []
    for n, ds, chunk, device_path in (((13, 9), (6, 6), None, False), ((8, 7), (6, 6), 4, False),
                                      ((8, 8), (6, 7), None, False), ((8, 7), (6, 6), 4, True)):
        if device_path:
            vocab_parallel._sizes_device = lambda group: (torch.device("cpu"), False)
        hs = torch.randn(n[rank], ds[rank], generator=g, requires_grad=True)
        ws = torch.randn(16 if rank == 0 else 15, ds[rank], generator=g, requires_grad=True)
        ht, wt = torch.randn(n[rank], 5, generator=g), torch.randn(ws.shape[0], 5, generator=g)
        try:
            loss = fastopd.fused_linear_divergence(hs, ws, ht, wt, divergence="rkl", chunk_size=chunk,
                                                   vocab_parallel_group=dist.group.WORLD)
            loss.backward()
            msgs.append(f"no error: loss {float(loss)}")
        except (ValueError, RuntimeError) as exc:
            msgs.append(str(exc))
    return msgs


def test_token_rows_that_differ_across_the_group_raise_on_every_rank():
    """Before the check, 13 vs 9 rows aborted a rank inside gloo ("Received data size doesn't match expected
    size"); 8 vs 7 rows in chunks of 4 (a last chunk of 4 rows against one of 3) left the ranks waiting in
    mismatched collectives until the process-group timeout; hidden sizes 6 vs 7 passed the forward and broke the
    hidden-state gradient's all-reduce in the backward."""
    for rank, msgs in enumerate(run_ranks(rows_worker, 2, deadline_s=150)):
        assert "[[13, 6], [9, 6]]" in msgs[0], (rank, msgs[0])
        assert "[[8, 6], [7, 6]]" in msgs[1], (rank, msgs[1])
        assert "[[8, 6], [8, 7]]" in msgs[2], (rank, msgs[2])
        for m in msgs:
            assert "same token rows on every rank" in m, (rank, m)


def copy_shapes_worker(rank: int, world: int) -> list[str]:
    """`copy_to_vocab_parallel` on [B, T, D] hidden states whose T differs across the group (3 vs 5), and on
    [N, D] ones that agree; the backward runs only where the check passed."""
    import torch.distributed as dist

    from fastopd.distributed import copy_to_vocab_parallel

    msgs = []
    for shape in ((2, (3, 5)[rank], 4), (6, 4)):
        x = torch.ones(shape, requires_grad=True)
        try:
            copy_to_vocab_parallel(x, dist.group.WORLD).sum().backward()
            msgs.append(f"no error: grad {float(x.grad.sum())}")
        except ValueError as exc:
            msgs.append(str(exc))
    return msgs


def test_copy_to_vocab_parallel_checks_every_leading_dim():
    """The check compared only x.shape[0] and x.shape[-1]: [2, 3, 4] against [2, 5, 4] passed it, and the
    backward's all-reduce of gradients of different sizes aborted inside gloo (or waited until the timeout)."""
    for rank, msgs in enumerate(run_ranks(copy_shapes_worker, 2, deadline_s=150)):
        assert "same token rows on every rank" in msgs[0] and "[[6, 4], [10, 4]]" in msgs[0], (rank, msgs[0])
        assert msgs[1] == "no error: grad 48.0", (rank, msgs[1])


def replicated_head_worker(rank: int, world: int) -> list[str]:
    """DTensor heads that are not row shards of the group: Replicate(), and Shard(1) (columns)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(5, 6, generator=g), torch.randn(5, 4, generator=g)
    ws, wt = torch.randn(12, 6, generator=g), torch.randn(12, 4, generator=g)
    msgs = []
    for placement in (Replicate(), Shard(1)):
        heads = [distribute_tensor(w, mesh, [placement]) for w in (ws, wt)]
        try:
            fastopd.fused_linear_divergence(hs, heads[0], ht, heads[1], vocab_parallel_group=dist.group.WORLD)
            msgs.append("no error")
        except ValueError as exc:
            msgs.append(str(exc))
    return msgs


def test_dtensor_heads_that_are_not_row_shards_are_refused():
    """A Replicate() head was taken shard-locally as one shard of a vocabulary world times as large: a silently
    wrong loss (the student's log-sum-exp off by log(world))."""
    for rank, msgs in enumerate(run_ranks(replicated_head_worker, 2, deadline_s=150)):
        for m in msgs:
            assert "takes row shards of the head" in m, (rank, m)


def test_the_hidden_gradient_is_summed_over_the_shards_in_fp32_before_its_cast():
    """On CUDA the hidden states stay bf16, so the shards' partial G W_r were cast to bf16 by the Function and then
    summed in bf16 (copy_to_vocab_parallel's all-reduce): two roundings per share and one per partial sum. The
    Function now hands its fp32 gradient to the kernel's reduce_grad_hidden first. Here one shard is the whole
    vocabulary (the SUM is recorded, not exchanged), with bf16 hidden states kept bf16 as on CUDA."""
    from fastopd.distributed.vocab_parallel import torch_phase_, vocab_parallel_kernel
    from fastopd.losses.function import DivergenceConfig, FusedLinearDivergenceFunction

    gen = torch.Generator().manual_seed(7)
    n, d, v = 11, 24, 37
    hs = torch.randn(n, d, generator=gen).bfloat16().requires_grad_()
    ws, ht, wt = (torch.randn(v, d, generator=gen).bfloat16(), torch.randn(n, d, generator=gen).bfloat16(),
                  torch.randn(v, d, generator=gen).bfloat16())
    labels = torch.randint(0, v, (n,), generator=gen)
    summed = []

    def record(t, op):
        if t.shape == (n, d):
            summed.append((op, t.dtype))

    cfg = DivergenceConfig(divergence=0, beta=0.5, temperature=1.0, softcap=0.0, soft_weight=1.0, hard_weight=0.0,
                           ignore_index=-100, reduction="mean", chunk_rows=4)
    kernel = vocab_parallel_kernel(None, 0, torch_phase_, all_reduce=record)
    loss, _ = FusedLinearDivergenceFunction.apply(hs, ws, None, ht, wt, None, labels, None, cfg, kernel)
    loss.backward()
    assert summed == [(torch.distributed.ReduceOp.SUM, torch.float32)]
    want = hs.detach().float().requires_grad_()
    fastopd.fused_linear_divergence(want, ws.float(), ht.float(), wt.float(), labels, impl="torch").backward()
    torch.testing.assert_close(hs.grad, want.grad.bfloat16(), rtol=1e-2, atol=1e-3)
