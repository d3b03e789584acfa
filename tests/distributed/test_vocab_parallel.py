"""Vocab-parallel loss on 2, 3 and 4 gloo processes, with each phase backend, equals the single-process loss and
gradients (fp32, 1e-5).

Each rank holds a contiguous row shard of both heads (V not divisible by the world size, and a layout where one
rank's shard is all padding), the hidden states and labels are replicated; the loss, the stats, the hidden-state
gradient and each shard's weight and bias gradients must equal the single-process result on the same data.
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks

import fastopd
from fastopd import _dispatch

N, DS, DT, V = 13, 9, 11, 37

CASES = [
    pytest.param(dict(divergence="fkl"), id="fkl"),
    pytest.param(dict(divergence="rkl"), id="rkl"),
    pytest.param(dict(divergence="jsd", beta=0.3), id="jsd-b0.3"),
    pytest.param(dict(divergence="jsd", beta=0.5, temperature=2.0, softcap=3.0), id="jsd-T2-softcap3"),
    pytest.param(dict(divergence="fkl", hard_label_weight=0.5, return_stats=True), id="fkl-hard0.5-stats"),
    pytest.param(dict(divergence="rkl", reduction="none", return_stats=True, chunk_size=4), id="rkl-none-chunk4"),
    pytest.param(dict(divergence="jsd", reduction="sum", vocab_size=30, bias=True), id="jsd-sum-vocab30-bias"),
    pytest.param(dict(divergence="rkl", vocab_size=30, hard_label_weight=0.25, return_stats=True, temperature=0.7),
                 id="rkl-vocab30-hard-stats-T0.7"),
    pytest.param(dict(divergence="rkl", scale=30.0, return_stats=True), id="rkl-logit-scale-100"),
    pytest.param(dict(divergence="fkl", hard_label_weight=1.0, soft_label_weight=0.0, reduction="none",
                      return_stats=True, bias=True, chunk_size=5), id="ce-only-none-bias"),
    pytest.param(dict(divergence="jsd", beta=0.5, temperature=2.0, hard_label_weight=0.5, hard_label_temperature=1.0,
                      vocab_size=30, reduction="none"), id="jsd-T2-hardT1-vocab30-none"),
]
OPTIONS = [c.values[0] for c in CASES]


def _data(opts: dict):
    g = torch.Generator().manual_seed(1234)
    hs = torch.randn(N, DS, generator=g) * opts.get("scale", 1.0)
    ws = torch.randn(V, DS, generator=g) * 0.7
    ht = torch.randn(N, DT, generator=g)
    wt = torch.randn(V, DT, generator=g) * 0.7
    bs = torch.randn(V, generator=g) if opts.get("bias") else None
    bt = torch.randn(V, generator=g) if opts.get("bias") else None
    vocab = opts.get("vocab_size", V)
    labels = torch.randint(0, vocab, (N,), generator=g)
    labels[[2, 7]] = -100
    upstream = torch.rand(N, generator=g) + 0.5
    return hs, ws, ht, wt, bs, bt, labels, upstream


def _loss_kwargs(opts: dict) -> dict:
    return {k: v for k, v in opts.items() if k not in ("bias", "scale")}


def _run(hs, ws, ht, wt, bs, bt, labels, upstream, opts, group=None, impl="auto"):
    """Loss, stats, grads (h, W, b) of one call; a non-unit upstream gradient for reduction="none"."""
    hs = hs.clone().requires_grad_(True)
    ws = ws.clone().requires_grad_(True)
    bs = bs.clone().requires_grad_(True) if bs is not None else None
    out = fastopd.fused_linear_divergence(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt,
                                          vocab_parallel_group=group, impl=impl, **_loss_kwargs(opts))
    loss, stats = out if opts.get("return_stats") else (out, None)
    (loss * upstream).sum().backward() if loss.dim() else (3.0 * loss).backward()
    return dict(loss=loss.detach(), stats=None if stats is None else torch.stack(list(stats)),
                grad_h=hs.grad, grad_w=ws.grad, grad_b=None if bs is None else bs.grad)


def shards(world: int, layout: str) -> list[tuple[int, int]]:
    """Row ranges per rank: "even" = torch.tensor_split (V not divisible: sizes differ by one); "skewed" = the
    last rank holds only the padding rows beyond vocab_size=30 (and so none of the shared vocabulary)."""
    if layout == "even":
        bounds = [len(c) for c in torch.tensor_split(torch.arange(V), world)]
    else:
        first = [30 // (world - 1) + (1 if r < 30 % (world - 1) else 0) for r in range(world - 1)]
        bounds = first + [V - 30]
    starts = [sum(bounds[:r]) for r in range(world)]
    return [(s, s + b) for s, b in zip(starts, bounds)]


def vocab_parallel_worker(rank: int, world: int, layout: str, impl: str) -> list[dict]:
    import torch.distributed as dist

    a, b = shards(world, layout)[rank]
    results = []
    for opts in OPTIONS:
        if layout == "skewed" and opts.get("vocab_size") is None:
            continue
        hs, ws, ht, wt, bs, bt, labels, upstream = _data(opts)
        res = _run(hs, ws[a:b], ht, wt[a:b], bs[a:b] if bs is not None else None,
                   bt[a:b] if bt is not None else None, labels, upstream, opts, group=dist.group.WORLD, impl=impl)
        results.append(res)
    return results


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("world,layout", [pytest.param(2, "even", id="world2-even"),
                                          pytest.param(4, "even", id="world4-even"),
                                          pytest.param(3, "skewed", id="world3-last-rank-padding")])
def test_vocab_parallel_equals_single_process(world, layout, impl):
    """Each phase backend: torch ops, and the Triton phases (on the CPU under the interpreter)."""
    why = _dispatch.available("vocab_parallel_chunk", impl, "cpu")
    if why is not None:
        pytest.skip(f"vocab-parallel backend {impl!r} cannot run here: {why}")
    per_rank = run_ranks(vocab_parallel_worker, world, layout, impl)
    ranges = shards(world, layout)
    opts_run = [o for o in OPTIONS if layout != "skewed" or o.get("vocab_size") is not None]
    assert len(opts_run) >= 2
    for i, opts in enumerate(opts_run):
        ref = _run(*_data(opts), opts)
        case = "-".join(f"{k}={v}" for k, v in opts.items())
        for rank, (a, b) in enumerate(ranges):
            got = per_rank[rank][i]
            _close(got["loss"], ref["loss"], f"{case} rank {rank} loss")
            if ref["stats"] is not None:
                _close(got["stats"], ref["stats"], f"{case} rank {rank} stats")
            _close(got["grad_h"], ref["grad_h"], f"{case} rank {rank} grad_h")
            _close(got["grad_w"], ref["grad_w"][a:b], f"{case} rank {rank} grad_w shard [{a}, {b})")
            if ref["grad_b"] is not None:
                _close(got["grad_b"], ref["grad_b"][a:b], f"{case} rank {rank} grad_b shard [{a}, {b})")


def bad_layout_worker(rank: int, world: int) -> str:
    import torch.distributed as dist

    hs, ws, ht, wt, *_ = _data({})
    rows_t = [(0, 20), (20, V)][rank]
    rows_s = [(0, 18), (18, V)][rank]
    try:
        fastopd.fused_linear_divergence(hs, ws[slice(*rows_s)], ht, wt[slice(*rows_t)],
                                        vocab_parallel_group=dist.group.WORLD)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_vocab_parallel_mismatched_shards_raise_on_every_rank():
    msgs = run_ranks(bad_layout_worker, 2)
    for m in msgs:
        assert "sharded differently" in m and "[18, 19] vs [20, 17]" in m


def empty_vocab_worker(rank: int, world: int) -> str:
    import torch.distributed as dist

    hs, ws, ht, wt, *_ = _data({})
    try:
        fastopd.fused_linear_divergence(hs, ws[:0], ht, wt[:0], vocab_parallel_group=dist.group.WORLD)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_vocab_parallel_empty_vocabulary_raises_on_every_rank():
    """Heads of 0 rows on every rank (a vocabulary of 0 entries over the group) gave a loss of 0 and stats of
    -inf, where one process raises ValueError: the shard layout now refuses an empty shared vocabulary."""
    for m in run_ranks(empty_vocab_worker, 2):
        assert "vocabulary is empty" in m and "[0, 0]" in m, m


def bad_vocab_size_worker(rank: int, world: int) -> list[str]:
    import torch.distributed as dist

    hs, ws, ht, wt, *_ = _data({})
    rows = [(0, 20), (20, V)][rank]
    msgs = []
    for vocab_size in (20.5, True):
        try:
            fastopd.fused_linear_divergence(hs, ws[slice(*rows)], ht, wt[slice(*rows)], vocab_size=vocab_size,
                                            vocab_parallel_group=dist.group.WORLD)
            msgs.append("no error")
        except ValueError as exc:
            msgs.append(str(exc))
    return msgs


def test_vocab_parallel_vocab_size_must_be_an_int():
    """vocab_size=20.5 was truncated to 20 and True taken as 1, where one process refuses both."""
    for msgs in run_ranks(bad_vocab_size_worker, 2):
        assert [m.split(" must")[0] for m in msgs] == ["vocab_size=20.5", "vocab_size=True"], msgs
        assert all("must be an int in [1, " in m for m in msgs), msgs


def test_dtensor_head_without_group_is_refused():
    dtensor = pytest.importorskip("torch.distributed.tensor")
    _ = dtensor
    msgs = run_ranks(dtensor_worker, 2)
    for m in msgs:
        assert "is a DTensor" in m and "vocab_parallel_group" in m


def dtensor_worker(rank: int, world: int) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    hs, ws, ht, wt, *_ = _data({})
    ws_d = distribute_tensor(ws, mesh, [Shard(0)])
    try:
        fastopd.fused_linear_divergence(hs, ws_d, ht, wt)
    except ValueError as exc:
        return str(exc)
    return "no error"


def resharded_worker(rank: int, world: int) -> list[float]:
    """Heads of V=10 and then V=9 rows split as torch.chunk does: rank 0 holds 5 rows both times, rank 1 holds 5
    and then 4."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(7)
    losses = []
    for vocab in (10, 9, 10):
        hs, ws, ht, wt = (torch.randn(6, 4, generator=g), torch.randn(vocab, 4, generator=g),
                          torch.randn(6, 3, generator=g), torch.randn(vocab, 3, generator=g))
        a, b = [(0, 5), (5, vocab)][rank]
        losses.append(float(fastopd.fused_linear_divergence(hs, ws[a:b], ht, wt[a:b], divergence="jsd",
                                                            vocab_parallel_group=dist.group.WORLD)))
    return losses


def test_heads_resharded_on_another_rank_only_give_the_single_process_loss():
    """The shard layout was cached per (group, this rank's rows): rank 0, whose rows did not change, reused the
    V=10 layout and went on to the loss's all-reduces while rank 1 gathered the new sizes, and the job hung until
    the process-group timeout. Every rank now takes part in the size exchange of every call."""
    per_rank = run_ranks(resharded_worker, 2, deadline_s=150)
    g = torch.Generator().manual_seed(7)
    for i, vocab in enumerate((10, 9, 10)):
        hs, ws, ht, wt = (torch.randn(6, 4, generator=g), torch.randn(vocab, 4, generator=g),
                          torch.randn(6, 3, generator=g), torch.randn(vocab, 3, generator=g))
        want = float(fastopd.fused_linear_divergence(hs, ws, ht, wt, divergence="jsd"))
        for rank in range(2):
            assert per_rank[rank][i] == pytest.approx(want, rel=1e-5), (rank, vocab)


def cached_layout_worker(rank: int, world: int) -> dict:
    """The device-backend path (NCCL: sizes read once per own sizes, then checked on the device) run on gloo by
    declaring the read not free. Layouts (rank 0 rows, rank 1 rows): (5, 4), (6, 5), (5, 4) again (both ranks hit
    their cache, which is right), then (5, 5): both ranks hold cached layouts for their own sizes that are stale."""
    import torch.distributed as dist

    from fastopd.distributed import vocab_parallel

    vocab_parallel._sizes_device = lambda group: (torch.device("cpu"), False)
    vocab_parallel.clear_layout_cache()
    g = torch.Generator().manual_seed(11)
    out: dict = {"losses": [], "refs": []}

    def call(rows):
        vocab = sum(rows)
        hs, ws, ht, wt = (torch.randn(6, 4, generator=g), torch.randn(vocab, 4, generator=g),
                          torch.randn(6, 3, generator=g), torch.randn(vocab, 3, generator=g))
        a = sum(rows[:rank])
        b = a + rows[rank]
        out["refs"].append(float(fastopd.fused_linear_divergence(hs, ws, ht, wt)))
        return float(fastopd.fused_linear_divergence(hs, ws[a:b], ht, wt[a:b], vocab_parallel_group=dist.group.WORLD))

    for rows in ((5, 4), (6, 5), (5, 4)):
        out["losses"].append(call(rows))
    state = g.get_state()
    try:
        call((5, 5))
        out["stale"] = "no error"
    except RuntimeError as exc:
        out["stale"] = str(exc)
    out["refs"].pop()
    vocab_parallel.clear_layout_cache()
    g.set_state(state)
    out["losses"].append(call((5, 5)))
    return out


def test_cached_layouts_of_a_device_backend_are_checked_on_every_call():
    for got in run_ranks(cached_layout_worker, 2, deadline_s=150):
        assert "clear_layout_cache" in got["stale"], got["stale"]
        assert got["losses"] == pytest.approx(got["refs"], rel=1e-5)
