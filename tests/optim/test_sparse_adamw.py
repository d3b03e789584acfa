"""SparseMaskedAdamW against an independent float64 AdamW, against torch.optim.AdamW, and its edge cases."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fastopd import _dispatch
from fastopd.optim import SparseMaskedAdamW

BACKENDS = ("torch", "cpu", "triton")
LOW = (torch.bfloat16, torch.float16)


def _skip_unavailable(impl: str) -> None:
    why = _dispatch.available("sparse_adamw_step", impl, "cpu")
    if why is not None:
        pytest.skip(why)


def adamw_f64(p0, grads, mask, lr, betas, eps, wd):
    """Textbook AdamW (decoupled weight decay, bias correction) in float64 on the selected coordinates;
    the others are left alone. p0, grads: float64 tensors; mask: bool of p0's shape."""
    b1, b2 = betas
    p = p0.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        upd = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        upd = upd - lr * m_hat / (v_hat.sqrt() + eps)
        p = torch.where(mask, upd, p)
    return p


def _mask(shape, density, kind, gen):
    bool_mask = torch.rand(shape, generator=gen) < density
    if kind == "bool":
        return bool_mask, bool_mask
    idx = bool_mask.reshape(-1).nonzero().view(-1)
    if kind == "indices-unsorted":
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
    return idx, bool_mask


CASES = [
    pytest.param((37, 53), 0.3, "bool", 0.1, id="37x53-d0.3-bool-wd0.1"),
    pytest.param((37, 53), 0.3, "indices", 0.0, id="37x53-d0.3-idx-wd0"),
    pytest.param((1031,), 0.05, "indices-unsorted", 0.1, id="1031-d0.05-unsorted-wd0.1"),
    pytest.param((3, 5, 7), 2.0, "bool", 0.1, id="3x5x7-full-wd0.1"),
    pytest.param((129, 33), 0.9, "bool", 0.01, id="129x33-d0.9-wd0.01"),
]


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape,density,kind,wd", CASES)
def test_against_float64_adamw(impl, dtype, shape, density, kind, wd):
    """Masked coordinates follow AdamW within 2x the error of torch.optim.AdamW on fp32 copies of the same
    gradients; every other coordinate is bitwise unchanged; bf16/fp16 params hold round(master)."""
    _skip_unavailable(impl)
    gen = torch.Generator().manual_seed(hash((shape, kind)) % 2**31)
    lr, betas, eps, steps = 3e-2, (0.9, 0.95), 1e-8, 12
    p0 = torch.randn(shape, generator=gen).to(dtype)
    mask, bool_mask = _mask(shape, density, kind, gen)
    grads = [(torch.randn(shape, generator=gen) * 10 ** torch.empty(shape).uniform_(-3, 1, generator=gen)).to(dtype)
             for _ in range(steps)]

    p = torch.nn.Parameter(p0.clone())
    opt = SparseMaskedAdamW([("w", p)], masks={"w": mask}, lr=lr, betas=betas, eps=eps, weight_decay=wd, impl=impl)
    ref32 = torch.nn.Parameter(p0.float().clone())
    torch_opt = torch.optim.AdamW([ref32], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for g in grads:
        p.grad = g.clone()
        ref32.grad = g.float()
        opt.step()
        torch_opt.step()

    want = adamw_f64(p0.double(), grads, bool_mask, lr, betas, eps, wd)
    state = opt.state[p]
    got = state["master"] if dtype in LOW else p.detach().view(-1)[bool_mask.view(-1)]
    got = got.double().view(-1)
    want_sel = want.view(-1)[bool_mask.view(-1)]
    torch_sel = ref32.detach().double().view(-1)[bool_mask.view(-1)]
    torch_err = (torch_sel - want_sel).abs().max().item() if got.numel() else 0.0
    err = (got - want_sel).abs().max().item() if got.numel() else 0.0
    assert err <= 2 * torch_err + 1e-7, (err, torch_err)
    assert torch.equal(p.detach()[~bool_mask], p0[~bool_mask]), "an unmasked coordinate changed"
    if dtype in LOW:
        assert torch.equal(p.detach().view(-1)[bool_mask.view(-1)], state["master"].to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-master"])
def test_torch_backend_is_bitwise_torch_adamw(dtype):
    """The torch backend runs torch's own ops on the gathered coordinates: bitwise torch.optim.AdamW
    (fp32 params; for bf16 params the fp32 masters equal an fp32 torch run on the same gradients)."""
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(61, 47, generator=gen)
    mask = torch.rand(61, 47, generator=gen) < 0.4
    p = torch.nn.Parameter(p0.to(dtype))
    ref = torch.nn.Parameter(p0.to(dtype).float())
    opt = SparseMaskedAdamW([("w", p)], masks={"w": mask}, lr=1e-2, weight_decay=0.1, impl="torch")
    torch_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    for _ in range(25):
        g = torch.randn(61, 47, generator=gen).to(dtype)
        p.grad, ref.grad = g, g.float()
        opt.step()
        torch_opt.step()
    st, rst = opt.state[p], torch_opt.state[ref]
    assert torch.equal(st["exp_avg"], rst["exp_avg"][mask])
    assert torch.equal(st["exp_avg_sq"], rst["exp_avg_sq"][mask])
    got = st["master"] if dtype != torch.float32 else p.detach()[mask]
    assert torch.equal(got, ref.detach()[mask])


def _ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x.abs(), torch.full_like(x, math.inf)) - x.abs()


def test_cpu_kernel_matches_torch_adamw_per_step():
    """C++ kernel vs torch.optim.AdamW from the same state at every step: moments bitwise equal (same FMA forms
    as torch's CPU kernels); params within 1 ulp of the parameter plus 2 ulps of the update (torch's sqrt comes
    from MKL VML and is not always correctly rounded; ours is)."""
    _skip_unavailable("cpu")
    gen = torch.Generator().manual_seed(2)
    shape = (203, 77)
    p0 = torch.randn(shape, generator=gen)
    mask = torch.rand(shape, generator=gen) < 0.5
    p = torch.nn.Parameter(p0.clone())
    ref = torch.nn.Parameter(p0.clone())
    opt = SparseMaskedAdamW([("w", p)], masks={"w": mask}, lr=1e-2, weight_decay=0.1, impl="cpu")
    torch_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    for _ in range(20):
        g = torch.randn(shape, generator=gen)
        p.grad, ref.grad = g.clone(), g.clone()
        before = ref.detach()[mask].clone()
        opt.step()
        torch_opt.step()
        st, rst = opt.state[p], torch_opt.state[ref]
        assert torch.equal(st["exp_avg"], rst["exp_avg"][mask])
        assert torch.equal(st["exp_avg_sq"], rst["exp_avg_sq"][mask])
        want = ref.detach()[mask]
        upd = want - before * (1 - 1e-2 * 0.1)
        tol = _ulp(want) + 2 * _ulp(upd)
        assert ((p.detach()[mask] - want).abs() <= tol).all()
        with torch.no_grad():
            p.copy_(torch.where(mask, ref, p))  # same state for the next step
    assert torch.equal(p.detach()[~mask], p0[~mask])


@pytest.mark.parametrize("impl", BACKENDS)
def test_weight_decay_is_applied_to_masked_coordinates(impl):
    """With zero gradients the AdamW step is pure decoupled decay: p <- p * (1 - lr*wd) on the mask only
    (sparse optimizers that decay a boolean-indexed copy silently drop it)."""
    _skip_unavailable(impl)
    p0 = torch.linspace(-3, 3, 301)
    mask = torch.arange(301) % 3 == 0
    p = torch.nn.Parameter(p0.clone())
    opt = SparseMaskedAdamW([("w", p)], masks={"w": mask}, lr=0.1, weight_decay=0.5, impl=impl)
    for _ in range(3):
        p.grad = torch.zeros(301)
        opt.step()
    factor = torch.tensor(1 - 0.1 * 0.5, dtype=torch.float32)
    want = p0[mask] * factor * factor * factor
    assert torch.equal(p.detach()[mask], want)
    assert torch.equal(p.detach()[~mask], p0[~mask])


def test_dense_params_follow_torch_adamw_and_groups():
    """Parameters absent from `masks` go through torch's AdamW (bitwise); groups keep their own lr/wd."""
    gen = torch.Generator().manual_seed(3)
    a0, b0, c0 = torch.randn(13, 9, generator=gen), torch.randn(17, generator=gen), torch.randn(5, 11, generator=gen)
    a, b, c = (torch.nn.Parameter(x.clone()) for x in (a0, b0, c0))
    ra, rb, rc = (torch.nn.Parameter(x.clone()) for x in (a0, b0, c0))
    mask = torch.rand(5, 11, generator=gen) < 0.5
    opt = SparseMaskedAdamW([{"params": [("a", a), ("b", b)], "lr": 1e-2},
                             {"params": [("c", c)], "lr": 3e-2, "weight_decay": 0.2}],
                            masks={"c": mask}, lr=1e-3, weight_decay=0.05, impl="torch")
    torch_opt = torch.optim.AdamW([{"params": [ra, rb], "lr": 1e-2}, {"params": [rc], "lr": 3e-2, "weight_decay": 0.2}],
                                  lr=1e-3, weight_decay=0.05, foreach=True)
    for _ in range(7):
        for x, r in ((a, ra), (b, rb), (c, rc)):
            g = torch.randn(x.shape, generator=gen)
            x.grad, r.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    assert torch.equal(a, ra) and torch.equal(b, rb)
    assert torch.equal(c.detach()[mask], rc.detach()[mask]) and torch.equal(c.detach()[~mask], c0[~mask])
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[1]["weight_decay"] == 0.2


@pytest.mark.parametrize("impl", BACKENDS)
def test_grad_none_empty_and_full_masks(impl):
    _skip_unavailable(impl)
    gen = torch.Generator().manual_seed(4)
    x0, y0, z0 = torch.randn(8, 8, generator=gen), torch.randn(9, generator=gen), torch.randn(6, 4, generator=gen)
    x, y, z = (torch.nn.Parameter(t.clone()) for t in (x0, y0, z0))
    rz = torch.nn.Parameter(z0.clone())
    opt = SparseMaskedAdamW([("x", x), ("y", y), ("z", z)], lr=1e-2, impl=impl,
                            masks={"x": torch.zeros(8, 8, dtype=torch.bool), "y": torch.ones(9, dtype=torch.bool),
                                   "z": torch.arange(24)})
    torch_opt = torch.optim.AdamW([rz], lr=1e-2)
    assert opt.state[x]["exp_avg"].numel() == 0  # frozen: no state
    assert opt.state[z]["indices"] is None and opt.state[y]["indices"] is None  # full masks store no indices
    for _ in range(3):
        x.grad = torch.randn(8, 8, generator=gen)
        z.grad = torch.randn(6, 4, generator=gen)
        rz.grad = z.grad.clone()
        opt.step()  # y.grad is None: skipped
        torch_opt.step()
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert opt.state[y]["step"].item() == 0 and opt.state[z]["step"].item() == 3
    tol = 0 if impl == "torch" else 1e-6
    assert (z - rz).abs().max().item() <= tol


BAD_MASKS = [
    pytest.param(torch.zeros(4, 5, dtype=torch.bool), "shape", id="bool-wrong-shape"),
    pytest.param(torch.tensor([0, 30]), "out of range", id="index-out-of-range"),
    pytest.param(torch.tensor([-1, 3]), "out of range", id="index-negative"),
    pytest.param(torch.tensor([3, 1, 3]), "duplicated", id="index-duplicated"),
    pytest.param(torch.tensor([[1, 2]]), "1-D", id="index-2d"),
    pytest.param(torch.tensor([0.5, 1.0]), "bool", id="float-mask"),
]


@pytest.mark.parametrize("mask,message", BAD_MASKS)
def test_bad_masks_are_rejected(mask, message):
    p = torch.nn.Parameter(torch.randn(5, 6))
    with pytest.raises(ValueError, match=message):
        SparseMaskedAdamW([("w", p)], masks={"w": mask})


def test_bad_construction_is_rejected():
    p = torch.nn.Parameter(torch.randn(5, 6))
    with pytest.raises(ValueError, match="not optimized here"):
        SparseMaskedAdamW([("w", p)], masks={"v": torch.ones(5, 6, dtype=torch.bool)})
    opt = SparseMaskedAdamW([("w", p)], masks={"v": torch.ones(5, 6, dtype=torch.bool)}, strict=False)
    assert opt.mask_indices() == {}
    extra = torch.nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [("extra", extra)], "lr": 0.5})
    extra.grad = torch.ones(3)
    opt.step()
    assert "extra" in opt.export_delta()
    q = torch.nn.Parameter(torch.randn(6, 5).t())
    with pytest.raises(ValueError, match="contiguous"):
        SparseMaskedAdamW([("q", q)], masks={"q": torch.ones(5, 6, dtype=torch.bool)})
    with pytest.raises(ValueError, match="master_weights"):
        SparseMaskedAdamW([("w", p)], master_weights="yes")
    with pytest.raises(ValueError, match="impl"):
        SparseMaskedAdamW([("w", p)], impl="gpu")
    with pytest.raises(ValueError, match=r"impl must be one of .*'cuda'"):  # a loss backend, not an optimizer one
        SparseMaskedAdamW([("w", p)], impl="cuda")


def test_explicit_foreach_false_reaches_torch_adam(monkeypatch):
    """foreach=False is passed on as False (torch would otherwise pick foreach itself on CUDA)."""
    import fastopd.optim.sparse_adamw as module

    seen = []
    real = module._torch_adam
    monkeypatch.setattr(module, "_torch_adam", lambda *a, **k: (seen.append((k["foreach"], k["fused"])), real(*a, **k)))
    for foreach, want in ((False, False), (True, True), (None, True)):
        p = torch.nn.Parameter(torch.randn(3))
        opt = SparseMaskedAdamW([("d", p)], foreach=foreach)
        p.grad = torch.randn(3)
        opt.step()
        assert seen[-1] == (want, None), (foreach, seen[-1])


def test_unsorted_indices_are_sorted_and_int32():
    p = torch.nn.Parameter(torch.randn(5, 6))
    opt = SparseMaskedAdamW([("w", p)], masks={"w": torch.tensor([7, 2, 29])})
    idx = opt.state[p]["indices"]
    assert idx.dtype == torch.int32 and idx.tolist() == [2, 7, 29]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("impl", BACKENDS)
def test_state_dict_round_trip_resumes_bitwise(impl):
    """Save after 4 steps, load into a fresh optimizer (constructed with another mask: the checkpoint's wins),
    continue 4 steps: bitwise the same as 8 uninterrupted steps, bf16 masters and fp32 moments included."""
    _skip_unavailable(impl)
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(19, 23, generator=gen).to(torch.bfloat16)
    b0 = torch.randn(23, generator=gen)
    mask = torch.rand(19, 23, generator=gen) < 0.3
    grads = [(torch.randn(19, 23, generator=gen).to(torch.bfloat16), torch.randn(23, generator=gen)) for _ in range(8)]

    def make(m):
        w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
        return w, b, SparseMaskedAdamW([("w", w), ("b", b)], masks={"w": m}, lr=1e-2, impl=impl)

    w, b, opt = make(mask)
    _run(opt, [w, b], grads)

    w2, b2, opt2 = make(mask)
    _run(opt2, [w2, b2], grads[:4])
    buf = io.BytesIO()
    torch.save({"w": w2.detach(), "b": b2.detach(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    w3, b3, opt3 = make(torch.ones(19, 23, dtype=torch.bool))
    with torch.no_grad():
        w3.copy_(ckpt["w"])
        b3.copy_(ckpt["b"])
    opt3.load_state_dict(ckpt["opt"])
    assert opt3.state[w3]["exp_avg"].dtype == torch.float32 and opt3.state[w3]["master"].dtype == torch.float32
    assert torch.equal(opt3.state[w3]["indices"].long(), mask.view(-1).nonzero().view(-1))
    _run(opt3, [w3, b3], grads[4:])
    assert torch.equal(w3, w) and torch.equal(b3, b)
    for key in ("exp_avg", "exp_avg_sq", "master", "swallowed"):
        assert torch.equal(opt3.state[w3][key], opt.state[w][key])


def test_load_state_dict_rejects_mismatch():
    p = torch.nn.Parameter(torch.randn(4, 4))
    q = torch.nn.Parameter(torch.randn(3))
    opt = SparseMaskedAdamW([("w", p)], masks={"w": torch.tensor([1, 2])})
    other = SparseMaskedAdamW([("w", p), ("q", q)])
    with pytest.raises(ValueError, match="parameters"):
        other.load_state_dict(opt.state_dict())
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="exp_avg"):
        SparseMaskedAdamW([("w", p)]).load_state_dict(sd)
    for bad in ([2, 1], [1, 1]):  # a corrupted checkpoint: unsorted, or a repeated coordinate
        sd = SparseMaskedAdamW([("w", p)], masks={"w": torch.tensor([1, 2])}).state_dict()
        sd["state"][0]["indices"] = torch.tensor(bad, dtype=sd["state"][0]["indices"].dtype)
        with pytest.raises(ValueError, match="sorted and unique"):
            SparseMaskedAdamW([("w", p)]).load_state_dict(sd)


def test_export_delta_reproduces_weights():
    gen = torch.Generator().manual_seed(6)
    w0 = torch.randn(30, 20, generator=gen)
    mask = torch.rand(30, 20, generator=gen) < 0.2
    w = torch.nn.Parameter(w0.clone())
    d = torch.nn.Parameter(torch.randn(7, generator=gen))
    opt = SparseMaskedAdamW([("w", w), ("d", d)], masks={"w": mask}, lr=1e-2, impl="torch")
    full = opt.export_delta(reset=False)  # no reference point: everything the optimizer may touch
    assert torch.equal(full["w"][0], mask.view(-1).nonzero().view(-1)) and full["d"][0].numel() == 7
    opt.mark_reference()
    synced_w, synced_d = w.detach().clone(), d.detach().clone()
    for _ in range(2):
        for _ in range(3):
            w.grad = torch.randn(30, 20, generator=gen)
            w.grad[0, 0] = 0.0
            d.grad = torch.randn(7, generator=gen)
            opt.step()
        delta = opt.export_delta()
        for target, (name, param) in ((synced_w, ("w", w)), (synced_d, ("d", d))):
            idx, vals = delta[name]
            assert idx.dtype == torch.int64 and vals.dtype == param.dtype
            target.view(-1)[idx] = vals
            assert torch.equal(target, param.detach())
        assert set(delta["w"][0].tolist()) <= set(mask.view(-1).nonzero().view(-1).tolist())
    assert all(v[0].numel() == 0 for v in opt.export_delta().values())  # nothing changed since the last export


def test_rounding_report_counts_swallowed_updates():
    """bf16 weights of magnitude ~1 with lr 1e-5: every bf16 update rounds away (bf16 ulp at 1 is 2^-7), so the
    count is k * steps exactly; the fp32 masters still accumulate them."""
    p0 = torch.full((40, 10), 1.0, dtype=torch.bfloat16)
    mask = torch.zeros(40, 10, dtype=torch.bool)
    mask[::3] = True
    k = int(mask.sum())
    for impl in BACKENDS:
        if _dispatch.available("sparse_adamw_step", impl, "cpu") is not None:
            continue
        p = torch.nn.Parameter(p0.clone())
        opt = SparseMaskedAdamW([("w", p)], masks={"w": mask}, lr=1e-5, weight_decay=0.0, impl=impl)
        for _ in range(5):
            p.grad = torch.ones(40, 10, dtype=torch.bfloat16)
            opt.step()
        assert opt.rounding_report() == {"w": 5 * k}, impl
        assert torch.equal(p, p0)
        assert (opt.state[p]["master"] < 1.0).all()


def test_state_bytes_are_compact():
    p = torch.nn.Parameter(torch.randn(1000, 100))
    mask = torch.rand(1000, 100) < 0.05
    opt = SparseMaskedAdamW([("w", p)], masks={"w": mask})
    k = int(mask.sum())
    assert opt.state_bytes() == 12 * k + 4  # int32 index + two fp32 moments per coordinate, fp32 step


def _kernel_args(gen, numel, density, dtype, index_dtype, master, count):
    p = torch.randn(numel, generator=gen).to(dtype)
    g = (torch.randn(numel, generator=gen) * 10 ** torch.empty(numel).uniform_(-4, 1, generator=gen)).to(dtype)
    idx = None if density >= 1 else (torch.rand(numel, generator=gen) < density).nonzero().view(-1).to(index_dtype)
    k = numel if idx is None else idx.numel()
    m = torch.randn(k, generator=gen) * 1e-2
    v = torch.rand(k, generator=gen) * 1e-3
    w = (p.float() if idx is None else p.float()[idx.long()]).clone() if master else None
    c = torch.zeros((), dtype=torch.int64) if count else None
    return [p], [g], [idx], [m], [v], [w], [c]


def test_cpu_op_passes_opcheck():
    """Schema, fake (meta) kernel and functionalization of the C++ op: what torch.compile needs."""
    _skip_unavailable("cpu")
    gen = torch.Generator().manual_seed(7)
    a = _kernel_args(gen, 50, 0.3, torch.float32, torch.int32, False, False)
    b = _kernel_args(gen, 12, 1.0, torch.bfloat16, torch.int32, True, True)
    masters = [torch.empty(0), b[5][0]]
    counters = [torch.empty(0, dtype=torch.int64), b[6][0]]
    args = ([a[0][0], b[0][0]], [a[1][0], b[1][0]], [a[2][0], None], [a[3][0], b[3][0]], [a[4][0], b[4][0]],
            masters, counters, [1e-3, 2e-3], [0.3, 0.4], 1e-3, 0.9, 0.999, 1e-8, 0.1)
    torch.library.opcheck(torch.ops.fastopd.sparse_adamw_step_.default, args)


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(numel=st.integers(1, 5000), density=st.sampled_from([0.01, 0.3, 0.97, 1.0]),
                  dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
                  index_dtype=st.sampled_from([torch.int32, torch.int64]), master=st.booleans(),
                  wd=st.sampled_from([0.0, 0.1]), beta1=st.sampled_from([0.9, 0.3]), seed=st.integers(0, 2**16))
def test_cpu_kernel_matches_torch_reference_kernel(numel, density, dtype, index_dtype, master, wd, beta1, seed):
    """Kernel level, any size/density/dtype/index type: the C++ op against the torch reference from the same
    state. Moments bitwise; parameters/masters within 1 ulp of the value plus 2 ulps of the update."""
    _skip_unavailable("cpu")
    from fastopd.optim.kernels import sparse_adamw_step_cpu
    from fastopd.optim.reference import sparse_adamw_step_

    master = master and dtype != torch.float32
    count = dtype != torch.float32
    a = _kernel_args(torch.Generator().manual_seed(seed), numel, density, dtype, index_dtype, master, count)
    b = [[t.clone() if t is not None else None for t in lst] for lst in a]
    hyper = ([3e-3], [0.7], 1e-2, beta1, 0.999, 1e-8, wd)
    p_before = (a[5][0] if master else a[0][0].float()).clone()
    sparse_adamw_step_cpu(*a, *hyper)
    sparse_adamw_step_(*b, *hyper)
    assert torch.equal(a[3][0], b[3][0]) and torch.equal(a[4][0], b[4][0])
    idx = a[2][0]
    got = a[5][0] if master else (a[0][0].float() if idx is None else a[0][0].float()[idx.long()])
    want = b[5][0] if master else (b[0][0].float() if idx is None else b[0][0].float()[idx.long()])
    if not master and idx is not None:
        p_before = p_before[idx.long()]
    upd = (want - p_before).abs()
    tol = _ulp(want) + 2 * _ulp(upd)
    if dtype != torch.float32 and not master:  # a one-rounding difference can flip the final bf16/fp16 rounding
        fi = torch.finfo(dtype)
        tol = tol + fi.eps * want.abs() + fi.smallest_normal
    assert ((got - want).abs() <= tol).all()
    untouched = torch.ones(numel, dtype=torch.bool)
    if idx is not None:
        untouched[idx.long()] = False
        assert torch.equal(a[0][0][untouched], b[0][0][untouched])


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_group_kernel_mixed_variants_match_reference_kernel(impl):
    """One call over a group mixing dtypes, index dtypes, full/empty masks, masters, counters and per-tensor
    bias corrections (different step counts): every tensor as the torch reference kernel updates it."""
    _skip_unavailable(impl)
    from fastopd.optim.reference import sparse_adamw_step_ as reference

    kernel = _dispatch.kernel("sparse_adamw_step", impl)
    gen = torch.Generator().manual_seed(8)
    # Several tensors per variant (one launch each for Triton), with different step counts.
    specs = [(3000, 0.05, torch.float32, torch.int32, False), (1, 1.0, torch.float32, torch.int32, False),
             (2500, 0.5, torch.bfloat16, torch.int64, True), (700, 1.0, torch.float16, torch.int32, True),
             (513, 0.0, torch.float32, torch.int64, False), (4097, 0.3, torch.bfloat16, torch.int32, False),
             (1500, 0.2, torch.float32, torch.int32, False), (999, 0.7, torch.bfloat16, torch.int64, True),
             (2049, 1.0, torch.float32, torch.int32, False), (3001, 0.4, torch.float32, torch.int32, False)]
    cols = [[] for _ in range(7)]
    for numel, density, dtype, index_dtype, master in specs:
        for c, v in zip(cols, _kernel_args(gen, numel, density, dtype, index_dtype, master, dtype != torch.float32)):
            c.append(v[0])
    ref = [[t.clone() if t is not None else None for t in c] for c in cols]
    # Scale of each moment update's terms: the Triton interpreter's fma rounds twice (a true fma on a GPU).
    scale = []
    for n in range(len(specs)):
        g = cols[1][n].float().view(-1)
        g = g if cols[2][n] is None else g[cols[2][n].long()]
        p0 = cols[5][n] if cols[5][n] is not None else cols[0][n].float().view(-1)
        p0 = p0 if cols[5][n] is not None or cols[2][n] is None else p0[cols[2][n].long()]
        scale.append((cols[3][n].abs() + g.abs(), cols[4][n].abs() + g * g, p0.clone()))
    steps = [1, 7, 3, 1, 2, 40, 12, 5, 100, 2]
    hyper = ([1e-2 / (1 - 0.9**t) for t in steps], [(1 - 0.999**t) ** 0.5 for t in steps], 1e-2, 0.9, 0.999,
             1e-8, 0.05)
    kernel(*cols, *hyper)
    reference(*ref, *hyper)
    for n in range(len(specs)):
        for j in (3, 4):  # moments: the C++ kernel is bitwise, Triton (CUDA foreach forms) within roundings
            tol = 0 if impl == "cpu" else _ulp(ref[j][n]) + 2 * _ulp(scale[n][j - 3])
            assert ((cols[j][n] - ref[j][n]).abs() <= tol).all(), (n, j)
        got, want = cols[5][n], ref[5][n]
        if got is None:  # no masters: compare the stored values at the selected coordinates
            sel = slice(None) if cols[2][n] is None else cols[2][n].long()
            got, want = cols[0][n].float().view(-1)[sel], ref[0][n].float().view(-1)[sel]
        update = (want - scale[n][2] * (1 - 1e-2 * 0.05)).abs()
        tol = 2 * _ulp(want) + 4 * _ulp(update)
        if cols[5][n] is None and cols[0][n].dtype != torch.float32:  # the final rounding may flip
            tol = tol + torch.finfo(cols[0][n].dtype).eps * want.abs()
        assert ((got - want).abs() <= tol).all(), n
        if cols[6][n] is not None:
            assert abs(int(cols[6][n]) - int(ref[6][n])) <= max(2, int(ref[6][n]) // 100), n


def test_load_dense_torch_adamw_checkpoint_onto_a_mask():
    """A torch.optim.AdamW checkpoint loads onto the constructor's mask: its moments are gathered at the mask and
    training continues exactly as torch's AdamW does on those coordinates; a parameter without saved state
    keeps its mask."""
    gen = torch.Generator().manual_seed(9)
    w0 = torch.randn(23, 17, generator=gen)
    mask = torch.rand(23, 17, generator=gen) < 0.3
    grads = [torch.randn(23, 17, generator=gen) for _ in range(6)]
    ref = torch.nn.Parameter(w0.clone())
    torch_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    for g in grads[:3]:
        ref.grad = g.clone()
        torch_opt.step()
    w = torch.nn.Parameter(ref.detach().clone())
    extra = torch.nn.Parameter(torch.randn(5, generator=gen))
    opt = SparseMaskedAdamW([("w", w), ("extra", extra)], masks={"w": mask, "extra": torch.tensor([1, 3])},
                            lr=1e-2, weight_decay=0.1, impl="torch")
    sd = torch_opt.state_dict()
    sd["param_groups"][0]["params"] = [0, 1]
    opt.load_state_dict(sd)
    assert opt.state[w]["step"].item() == 3 and opt.state[w]["exp_avg"].numel() == int(mask.sum())
    assert opt.state[extra]["indices"].tolist() == [1, 3] and opt.state[extra]["step"].item() == 0
    for g in grads[3:]:
        ref.grad, w.grad = g.clone(), g.clone()
        torch_opt.step()
        opt.step()
    assert torch.equal(w.detach()[mask], ref.detach()[mask])


def test_dense_fp32_moments_onto_a_masked_bf16_parameter_stay_fp32():
    """torch AdamW's fp32 moments gathered onto a bf16 parameter's mask are not rounded through bf16 first."""
    gen = torch.Generator().manual_seed(10)
    w32 = torch.nn.Parameter(torch.randn(8, 8, generator=gen))
    torch_opt = torch.optim.AdamW([w32], lr=1e-3)
    for _ in range(3):
        w32.grad = torch.randn(8, 8, generator=gen)
        torch_opt.step()
    wb = torch.nn.Parameter(w32.detach().bfloat16())
    mask = torch.rand(8, 8, generator=gen) < 0.5
    opt = SparseMaskedAdamW([("w", wb)], masks={"w": mask}, lr=1e-3)
    opt.load_state_dict(torch_opt.state_dict())
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt.state[wb][key].dtype == torch.float32
        assert torch.equal(opt.state[wb][key], torch_opt.state[w32][key][mask]), key


def test_load_state_dict_drops_the_export_reference_point():
    """After a checkpoint's mask replaces the constructor's, export_delta no longer compares against values taken
    at the old indices (which crashed for another size and reported wrong coordinates for the same size): it
    returns every selectable coordinate until mark_reference() is called again."""
    w = torch.nn.Parameter(torch.randn(6, 6))
    sd = SparseMaskedAdamW([("w", w)], masks={"w": torch.arange(0, 12)}).state_dict()
    for other in (torch.arange(20, 30), torch.arange(24, 36)):
        opt = SparseMaskedAdamW([("w", w)], masks={"w": other})
        opt.mark_reference()
        opt.load_state_dict(sd)
        idx, vals = opt.export_delta()["w"]
        assert idx.tolist() == list(range(12)) and torch.equal(vals, w.detach().view(-1)[:12])
        assert opt.export_delta()["w"][0].numel() == 0  # export reset the reference point at the new mask


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton backend's home)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-master"])
def test_triton_on_cuda_matches_torch_foreach_adamw(dtype):
    """On a GPU, from the same state at every step: Triton vs torch.optim.AdamW(foreach) on fp32 copies at real
    shapes. Moments within an ulp (the kernel uses the CUDA foreach expression forms), parameters/masters
    within an ulp of the value plus two of the update; unmasked coordinates bitwise unchanged."""
    gen = torch.Generator(device="cuda").manual_seed(10)
    shape = (2816, 1024)
    p0 = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    mask = torch.rand(shape, generator=gen, device="cuda") < 0.05
    p = torch.nn.Parameter(p0.clone())
    ref = torch.nn.Parameter(p0.float())
    opt = SparseMaskedAdamW([("w", p)], masks={"w": mask}, lr=1e-3, weight_decay=0.1, impl="triton")
    torch_opt = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.1, foreach=True)
    for _ in range(10):
        g = torch.randn(shape, generator=gen, device="cuda").to(dtype)
        p.grad, ref.grad = g, g.float()
        before = ref.detach()[mask].clone()
        opt.step()
        torch_opt.step()
        st, rst = opt.state[p], torch_opt.state[ref]
        for key in ("exp_avg", "exp_avg_sq"):
            assert ((st[key] - rst[key][mask]).abs() <= _ulp(rst[key][mask])).all(), key
        want = ref.detach()[mask]
        got = st["master"] if dtype != torch.float32 else p.detach()[mask]
        tol = _ulp(want) + 2 * _ulp(want - before * (1 - 1e-3 * 0.1))
        assert ((got - want).abs() <= tol).all()
        with torch.no_grad():  # same state for the next step
            if dtype == torch.float32:
                p.copy_(torch.where(mask, ref, p))
            else:
                st["master"].copy_(want)
            st["exp_avg"].copy_(rst["exp_avg"][mask])
            st["exp_avg_sq"].copy_(rst["exp_avg_sq"][mask])
    assert torch.equal(p.detach()[~mask], p0[~mask])


@pytest.mark.parametrize("impl", BACKENDS)
def test_step_bumps_version_counters_so_stale_graphs_raise(impl):
    """The C++ and Triton kernels write through data pointers; the step must still tell autograd, as a native
    in-place op does, so backward through a graph that saved the pre-step weight raises instead of using the new
    values silently."""
    _skip_unavailable(impl)
    w = torch.nn.Parameter(torch.randn(5, 7))
    opt = SparseMaskedAdamW([("w", w)], lr=1e-2, impl=impl, masks={"w": torch.rand(5, 7) < 0.5})
    w.grad = torch.randn(5, 7)
    before = (w._version, opt.state[w]["exp_avg"]._version, opt.state[w]["exp_avg_sq"]._version)
    loss = (w * w).sum()  # saves w for backward
    opt.step()
    after = (w._version, opt.state[w]["exp_avg"]._version, opt.state[w]["exp_avg_sq"]._version)
    assert all(a > b for a, b in zip(after, before)), (before, after)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_refused_step_changes_nothing(monkeypatch):
    """A step whose backend cannot run (impl='triton' on CPU tensors without the interpreter) raises before any
    state moves: the step count stays 0, so a retry on a usable backend has the right bias correction."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = torch.nn.Parameter(torch.randn(5, 6))
    q = torch.nn.Parameter(torch.randn(7))
    d = torch.nn.Parameter(torch.randn(3))  # a dense parameter in a group of its own, stepped first
    opt = SparseMaskedAdamW([{"params": [("d", d)]}, {"params": [("w", p), ("b", q)], "lr": 0.1}],
                            masks={"w": torch.rand(5, 6) < 0.5, "b": torch.rand(7) < 0.5}, impl="triton")
    p.grad, q.grad, d.grad = torch.randn(5, 6), torch.randn(7), torch.randn(3)
    before = (p.detach().clone(), q.detach().clone(), d.detach().clone())
    with pytest.raises(ValueError, match="triton"):
        opt.step()
    assert all(float(opt.state[t]["step"]) == 0 for t in (p, q))
    assert not opt.state[d]  # the dense group, before the refused one, did not step either
    assert torch.equal(p, before[0]) and torch.equal(q, before[1]) and torch.equal(d, before[2])
    opt.impl = "torch"
    opt.step()
    assert all(float(opt.state[t]["step"]) == 1 for t in (p, q, d))


@pytest.mark.parametrize("first_masked", [pytest.param(True, id="masked-group-first"),
                                          pytest.param(False, id="dense-group-first")])
def test_a_gradient_refused_in_a_later_group_leaves_the_earlier_groups_unstepped(first_masked):
    """Every group's gradients are checked before any group steps: a refused gradient in the second group used to
    leave the first group stepped, so a retry stepped it twice (and with the wrong bias correction)."""
    a = torch.nn.Parameter(torch.randn(6))
    b = torch.nn.Parameter(torch.randn(4))
    opt = SparseMaskedAdamW([{"params": [("a", a)]}, {"params": [("b", b)]}],
                            masks={"b": torch.tensor([2]), **({"a": torch.tensor([0, 3])} if first_masked else {})})
    a.grad = torch.randn(6)
    b.grad = torch.randn(4)
    b.grad.data = torch.randn(4, dtype=torch.float64)  # what the grad setter would refuse, e.g. a hook's gradient
    before = a.detach().clone()
    with pytest.raises(ValueError, match="gradient of 'b'"):
        opt.step()
    assert torch.equal(a, before)
    assert float(opt.state[a].get("step", 0)) == 0
    b.grad = torch.randn(4)
    opt.step()
    assert float(opt.state[a]["step"]) == float(opt.state[b]["step"]) == 1

@pytest.mark.parametrize("shape,mask", [
    pytest.param((2,), torch.tensor([0, 1], dtype=torch.uint8), id="1d-01-read-as-all"),
    pytest.param((5,), torch.tensor([0, 1, 0, 0, 1], dtype=torch.uint8), id="1d-read-as-duplicates"),
    pytest.param((5, 6), torch.ones(5, 6, dtype=torch.uint8), id="2d"),
])
def test_uint8_masks_are_refused_not_read_as_indices(shape, mask):
    """A 0/1 uint8 mask (what `(x > t).to(torch.uint8)` or an old torch mask gives) is not flat indices 0 and 1:
    [0, 1] for a 2-coordinate bias would have selected both coordinates instead of the second."""
    p = torch.nn.Parameter(torch.randn(shape))
    with pytest.raises(ValueError, match=r"uint8.*mask\.bool\(\)"):
        SparseMaskedAdamW([("b", p)], masks={"b": mask})


def _stepped(dtype, master_weights="auto"):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 5).to(dtype))
    opt = SparseMaskedAdamW([("w", p)], masks={"w": torch.arange(0, 20, 3)}, lr=1e-2, impl="torch",
                            master_weights=master_weights)
    for _ in range(2):
        p.grad = torch.randn(4, 5).to(dtype)
        opt.step()
    return p, opt


def test_loaded_state_follows_the_parameters_dtype_and_master_weights():
    """A checkpoint of bf16 parameters with masters loaded for fp32 parameters (training continued in fp32) must
    not keep the masters: they would override the fp32 parameter's own values at every step. Loaded under
    master_weights=False they go too; a bf16 parameter loaded from an fp32 run gets its swallowed-update count."""
    p16, opt16 = _stepped(torch.bfloat16)
    assert "master" in opt16.state[p16]
    q = torch.nn.Parameter(torch.randn(4, 5) + 10.0)  # fp32 weights of its own (e.g. another checkpoint)
    fresh = SparseMaskedAdamW([("w", q)], masks={"w": torch.arange(0, 20, 3)}, lr=1e-2, impl="torch")
    fresh.load_state_dict(opt16.state_dict())
    assert "master" not in fresh.state[q] and "swallowed" not in fresh.state[q]
    before = q.detach().clone()
    q.grad = torch.zeros(4, 5)
    fresh.step()
    assert (q - before).abs().max() < 0.1  # an AdamW step from q's own values, not a jump to the bf16 run's
    assert fresh.rounding_report() == {}

    no_masters = SparseMaskedAdamW([("w", torch.nn.Parameter(p16.detach().clone()))],
                                   masks={"w": torch.arange(0, 20, 3)}, impl="torch", master_weights=False)
    no_masters.load_state_dict(opt16.state_dict())
    assert all("master" not in st and "swallowed" in st for st in no_masters.state.values())

    p32, opt32 = _stepped(torch.float32)
    r = torch.nn.Parameter(p32.detach().bfloat16())
    low = SparseMaskedAdamW([("w", r)], masks={"w": torch.arange(0, 20, 3)}, lr=1e-2, impl="torch")
    low.load_state_dict(opt32.state_dict())
    r.grad = torch.randn(4, 5).bfloat16()
    low.step()
    assert set(low.rounding_report()) == {"w"}


def test_a_mask_loaded_onto_a_parameter_it_cannot_update_is_refused():
    p, opt = _stepped(torch.float32)
    d = torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
    dense = SparseMaskedAdamW([("w", d)])  # float64 trains densely; a checkpoint's mask cannot make it masked
    with pytest.raises(ValueError, match=r"'w'.*float64.*cannot be masked"):
        dense.load_state_dict(opt.state_dict())
    assert not dense.state


def test_adam_options_it_does_not_implement_are_refused_not_ignored():
    """torch.optim.Adam(W) options SparseMaskedAdamW lacks, in a param-group dict or in a torch checkpoint being
    resumed, raise instead of silently changing the algorithm (amsgrad dropped, maximize minimizing, Adam's L2
    penalty turned into decoupled decay)."""
    p = torch.nn.Parameter(torch.randn(3))
    for group in ({"amsgrad": True}, {"maximize": True}):
        with pytest.raises(ValueError, match=f"{next(iter(group))}=True"):
            SparseMaskedAdamW([{"params": [("w", p)], **group}])
    for torch_opt, match in ((torch.optim.AdamW([p], amsgrad=True), "amsgrad"),
                             (torch.optim.AdamW([p], maximize=True), "maximize"),
                             (torch.optim.Adam([p], weight_decay=0.1), "decoupled_weight_decay=False")):
        p.grad = torch.randn(3)
        torch_opt.step()
        opt = SparseMaskedAdamW([("w", p)], masks={"w": torch.tensor([0, 2])})
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(torch_opt.state_dict())
        assert float(opt.state[p]["step"]) == 0  # nothing loaded
    plain = torch.optim.Adam([p])  # Adam without weight decay is AdamW: loads
    plain.step()
    SparseMaskedAdamW([("w", p)], masks={"w": torch.tensor([0, 2])}).load_state_dict(plain.state_dict())


def test_masks_for_unnamed_parameters_say_to_pass_names():
    model = torch.nn.Linear(3, 2)
    hint = r"'weight'.*without names.*named_parameters\(\).*optimizers=\(optimizer, None\)"  # the HF recipe too
    with pytest.raises(ValueError, match=hint):
        SparseMaskedAdamW(model.parameters(), masks={"weight": torch.tensor([0])})


def test_mask_indices_build_an_equal_optimizer():
    """`mask_indices()` gives None for a full mask; passed back as `masks=` it raised "must be a tensor"."""
    p, q = torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(3))
    first = SparseMaskedAdamW([("p", p), ("q", q)], masks={"p": torch.tensor([2, 7]), "q": torch.ones(3, dtype=bool)})
    second = SparseMaskedAdamW([("p", p), ("q", q)], masks=first.mask_indices())
    assert second.masks_digest() == first.masks_digest() and second.mask_indices()["q"] is None


# ---------------------------------------------------------------------- plugged into torch / Hugging Face training
@pytest.mark.parametrize("params,masks", [
    pytest.param([("emb.weight", "W"), ("head.weight", "W")], {"emb.weight": torch.tensor([1, 4])}, id="tied-masked"),
    pytest.param([("emb.weight", "W"), ("head.weight", "W")], {}, id="tied-dense"),
    pytest.param(["W", "W"], {}, id="unnamed-twice"),
])
def test_a_tensor_given_twice_is_refused(params, masks):
    """A tied weight under both names (named_parameters(remove_duplicate=False)): torch only warns and steps it twice
    per step; here it was stepped twice too, and a mask keyed by the first name was refused as unknown."""
    w = torch.nn.Parameter(torch.randn(7, 3))
    given = [(p[0], w) if isinstance(p, tuple) else w for p in params]
    with pytest.raises(ValueError, match="already given as"):
        SparseMaskedAdamW(given, masks=masks)


def test_hf_style_named_groups_schedule_clip_accumulate_and_weights_only_resume():
    """Hugging Face Trainer's recipe with (name, tensor) groups: decay / no-decay groups (per-group weight decay),
    warmup-cosine LambdaLR, gradient accumulation, clip_grad_norm_, checkpoint through torch.save/torch.load
    (weights_only=True): the resumed run is bitwise the uninterrupted one."""
    gen = torch.Generator().manual_seed(11)
    w0 = torch.randn(9, 5, generator=gen).bfloat16()
    b0, n0 = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    mask = torch.rand(9, 5, generator=gen) < 0.4
    data = [torch.randn(3, 9, generator=gen) for _ in range(12)]

    def lr_lambda(step: int) -> float:  # get_cosine_schedule_with_warmup(warmup=2, total=6)
        return (step + 1) / 3 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / 4))

    def make():
        w, b, n = (torch.nn.Parameter(t.clone()) for t in (w0, b0, n0))
        opt = SparseMaskedAdamW([{"params": [("w", w)], "weight_decay": 0.1},
                                 {"params": [("b", b), ("norm", n)], "weight_decay": 0.0}],
                                masks={"w": mask, "norm": torch.tensor([4, 0])}, lr=1e-2, impl="cpu")
        return (w, b, n), opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    def train(params, opt, sched, batches):
        w, b, n = params
        for i in range(0, len(batches), 2):
            for x in batches[i:i + 2]:
                ((x @ w.float() + b) * n).square().mean().div(2).backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
            sched.step()
            opt.zero_grad()

    full = make()
    train(*full, data)
    first = make()
    train(*first, data[:6])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first[0]], "opt": first[1].state_dict(),
                "sched": first[2].state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = make()
    with torch.no_grad():
        for p, saved in zip(resumed[0], ckpt["params"]):
            p.copy_(saved)
    resumed[1].load_state_dict(ckpt["opt"])
    resumed[2].load_state_dict(ckpt["sched"])
    train(*resumed, data[6:])
    for p, q in zip(full[0], resumed[0]):
        assert torch.equal(p, q)
    assert [g["lr"] for g in resumed[1].param_groups] == [g["lr"] for g in full[1].param_groups]
    assert [g["weight_decay"] for g in resumed[1].param_groups] == [0.1, 0.0]


def test_full_masks_follow_torch_adamw_under_onecycle_and_a_skipping_grad_scaler():
    """Every coordinate selected, torch backend: bitwise torch.optim.AdamW under OneCycleLR (which also sets
    group["betas"]) and GradScaler, whose inf step is skipped by both (no count, moment or weight moves)."""
    gen = torch.Generator().manual_seed(3)
    w0, b0 = torch.randn(11, 3, generator=gen), torch.randn(3, generator=gen)
    w, b, rw, rb = (torch.nn.Parameter(t.clone()) for t in (w0, b0, w0, b0))
    opt = SparseMaskedAdamW([("w", w), ("b", b)], masks={"w": None, "b": torch.ones(3, dtype=torch.bool)},
                            lr=1e-2, weight_decay=0.1, impl="torch")
    ref = torch.optim.AdamW([rw, rb], lr=1e-2, weight_decay=0.1)
    runs = []
    for o in (opt, ref):
        runs.append((o, torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=8),
                     torch.amp.GradScaler("cpu", init_scale=8.0)))
    xs = [torch.randn(4, 11, generator=gen) for _ in range(6)]
    xs[2] = xs[2].clone().fill_(float("inf"))
    for x in xs:
        for (o, sched, scaler), (p, q) in zip(runs, ((w, b), (rw, rb))):
            o.zero_grad()
            scaler.scale((x @ p + q).square().sum()).backward()
            scaler.step(o)
            scaler.update()
            sched.step()
    assert float(opt.state[w]["step"]) == float(ref.state[rw]["step"]) == 5
    assert opt.param_groups[0]["betas"] == ref.param_groups[0]["betas"]
    assert torch.equal(w, rw) and torch.equal(b, rb)
    assert torch.equal(opt.state[w]["exp_avg_sq"], ref.state[rw]["exp_avg_sq"].view(-1))


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_compiled_step_equals_eager_with_dense_and_masked_params(impl):
    """torch.compile(opt.step) with a parameter left dense raised in dynamo's fake-tensor run of torch's foreach
    AdamW ("Expected scalars to be on CPU"); it now runs that part eagerly and matches the eager step bitwise."""
    _skip_unavailable(impl)
    results = []
    for compiled in (False, True):
        gen = torch.Generator().manual_seed(2)
        w = torch.nn.Parameter(torch.randn(13, 7, generator=gen).bfloat16())
        b = torch.nn.Parameter(torch.randn(7, generator=gen))
        opt = SparseMaskedAdamW([("w", w), ("b", b)], masks={"w": torch.tensor([0, 5, 90])}, lr=1e-2, impl=impl)
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        for _ in range(3):
            w.grad, b.grad = torch.randn(13, 7, generator=gen).bfloat16(), torch.randn(7, generator=gen)
            step()
        results.append((w.detach().clone(), b.detach().clone(), opt.state[w]["master"], opt.state[b]["exp_avg"]))
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled)


# ---------------------------------------------------------------------- review: a user's fine-tuning script
@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_a_tensor_lr_steps_masked_and_dense_params_as_torch_adamw_does(impl):
    """torch.optim.AdamW takes `lr` as a Tensor (torch.compile'd steps use one to avoid recompiles) and then does not
    default its dense step to foreach. Here the dense parameters' foreach step raised "lr as a Tensor is not supported
    for capturable=False and foreach=True" after the masked parameters of the group had already stepped."""
    _skip_unavailable(impl)
    gen = torch.Generator().manual_seed(11)
    w0, b0 = torch.randn(7, 13, generator=gen), torch.randn(13, generator=gen)
    mask = torch.rand(7, 13, generator=gen) < 0.4
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    rw, rb = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = SparseMaskedAdamW([("w", w), ("b", b)], masks={"w": mask}, lr=torch.tensor(3e-2), weight_decay=0.1,
                            impl=impl)
    ref = torch.optim.AdamW([rw, rb], lr=torch.tensor(3e-2), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)
    ref_sched = torch.optim.lr_scheduler.ExponentialLR(ref, 0.5)
    for _ in range(3):
        gw, gb = torch.randn(7, 13, generator=gen), torch.randn(13, generator=gen)
        w.grad, b.grad, rw.grad, rb.grad = gw.clone(), gb.clone(), gw.clone(), gb.clone()
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
    assert torch.equal(b, rb)  # dense: torch's own step
    tol = 0 if impl == "torch" else 1e-6  # the C++ kernel's correctly rounded sqrt (docs/optim.md)
    assert (w.detach()[mask] - rw.detach()[mask]).abs().max().item() <= tol
    assert torch.equal(w.detach()[~mask], w0[~mask])


@pytest.mark.parametrize("saved_shape,shape", [
    pytest.param((5,), (6,), id="dense-5-onto-6"),
    pytest.param((3, 7), (7, 3), id="dense-3x7-onto-7x3"),
])
def test_a_dense_state_of_another_size_is_refused_at_load(saved_shape, shape):
    """docs/optim.md: load_state_dict raises ValueError on mismatched sizes. A dense parameter's moments of another
    shape loaded silently, and the next step raised torch's "The size of tensor a (5) must match ..."."""
    p = torch.nn.Parameter(torch.randn(saved_shape))
    opt = SparseMaskedAdamW([("w", p)])
    p.grad = torch.randn(saved_shape)
    opt.step()
    q = torch.nn.Parameter(torch.randn(shape))
    other = SparseMaskedAdamW([("w", q)])
    with pytest.raises(ValueError, match=rf"'w'.*exp_avg.*{saved_shape[0]}.*{shape[0]}"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("names,other,where", [
    pytest.param([["n0", "n1", "n2", "n3", "n4", "n5"]], [["n0", "n1", "n2", "n3", "n4", "x"]],
                 r"group 0.*position 5.*'n5'.*'x'", id="6-names-last-differs"),
    pytest.param([["e"], ["n0", "n1", "n2", "n3", "n4"]], [["e"], ["n0", "n1", "n2", "n3"]],
                 r"group 1.*5 parameters.*4.*'n4'", id="group1-one-fewer"),
])
def test_a_param_group_change_names_what_differs(names, other, where):
    """Resuming after the param groups changed: the error showed the first four names of both sides, identical when
    the difference lies further on, and did not say which group."""
    def make(groups):
        return SparseMaskedAdamW([{"params": [(n, torch.nn.Parameter(torch.randn(2))) for n in g]} for g in groups])

    with pytest.raises(ValueError, match=where):
        make(other).load_state_dict(make(names).state_dict())


@pytest.mark.parametrize("prefix", [
    pytest.param("_orig_mod.", id="torch-compile"),
    pytest.param("module.", id="ddp-module"),
])
def test_masks_one_prefix_away_from_the_parameter_names_say_so(prefix):
    """A torch.compile'd model names its parameters "_orig_mod.<name>", so masks made on the model itself (or read
    from a file) are all unknown. The error suggested strict=False, which ignores every mask and trains the whole
    model densely; it should name the prefix and the renaming instead."""
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    named = [(prefix + n, p) for n, p in model.named_parameters()]
    mask = {"0.weight": torch.tensor([1, 4]), "1.bias": torch.tensor([2])}
    with pytest.raises(ValueError, match=rf"prefix {prefix!r}.*match_param_names") as info:
        SparseMaskedAdamW(named, masks=mask)
    assert "strict=False ignores" not in str(info.value)
    from fastopd.analysis import match_param_names
    opt = SparseMaskedAdamW(named, masks=match_param_names(mask, [n for n, _ in named]))
    assert sorted(opt.mask_indices()) == [prefix + "0.weight", prefix + "1.bias"]


@pytest.mark.parametrize("late", [pytest.param(False, id="groups-at-construction"),
                                  pytest.param(True, id="add_param_group")])
def test_one_name_for_two_tensors_is_refused(late):
    """Groups built from submodules' named_parameters() (encoder and decoder both give "weight"): a mask "weight"
    went to whichever tensor came last, the other was trained densely without a word, and export_delta /
    mask_indices (dicts by name) kept only one of them."""
    enc, dec = torch.nn.Linear(3, 4), torch.nn.Linear(4, 5)
    groups = [{"params": list(enc.named_parameters())}, {"params": list(dec.named_parameters()), "lr": 0.1}]
    with pytest.raises(ValueError, match=r"'weight'.*group 0.*group 1"):
        if late:
            SparseMaskedAdamW(groups[:1]).add_param_group(groups[1])
        else:
            SparseMaskedAdamW(groups, masks={"weight": torch.tensor([0, 2])})


def test_loaded_param_group_values_are_copies_as_in_torch():
    """torch.optim deep-copies the loaded groups. Here a Tensor lr (which torch's schedulers update in place) was
    shared with the checkpoint, so a scheduler of the resumed optimizer also moved the lr of the one it was
    loaded from."""
    w = torch.nn.Parameter(torch.randn(3, 5))
    source = SparseMaskedAdamW([("w", w)], masks={"w": torch.tensor([2, 11])}, lr=torch.tensor(1e-2))
    resumed = SparseMaskedAdamW([("w", w)], lr=torch.tensor(1e-2))
    sd = source.state_dict()
    resumed.load_state_dict(sd)
    sched = torch.optim.lr_scheduler.ExponentialLR(resumed, 0.5)
    w.grad = torch.randn(3, 5)
    resumed.step()
    sched.step()
    assert float(resumed.param_groups[0]["lr"]) == pytest.approx(5e-3)
    assert float(source.param_groups[0]["lr"]) == pytest.approx(1e-2)
    assert float(sd["param_groups"][0]["lr"]) == pytest.approx(1e-2)
