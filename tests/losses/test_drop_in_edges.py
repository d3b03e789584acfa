"""fused_linear_divergence dropped into a user's trainer: the edges a custom loop reaches (sliced, transposed and
expanded inputs, mixed dtypes, autocast, double backward, gradient accumulation, degenerate sizes), on every
backend and mode that runs here, against an independent float64 computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastopd
from fastopd import _dispatch

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _impl_modes(tiled: bool = True):
    out = []
    for impl in ("torch", "cpu", "triton"):
        why = _dispatch.available("divergence_chunk", impl, "cpu")
        marks = [pytest.mark.skip(reason=why)] if why else []
        out.append(pytest.param(impl, "chunked", id=f"{impl}-chunked", marks=marks))
        if impl == "triton" and tiled:
            out.append(pytest.param(impl, "tiled", id="triton-tiled", marks=marks))
    return out


IMPL_MODES = _impl_modes()


def _f64_loss(xs, xt, labels, divergence, beta, temperature, reduction):
    """Per-token divergence of float64 logits [N, V], masked and reduced (mean over valid tokens)."""
    lps, lpt = F.log_softmax(xs / temperature, -1), F.log_softmax(xt / temperature, -1)
    ps, pt = lps.exp(), lpt.exp()
    if divergence == "fkl":
        per = (pt * (lpt - lps)).sum(-1)
    elif divergence == "rkl":
        per = (ps * (lps - lpt)).sum(-1)
    else:
        lm = torch.log(beta * pt + (1 - beta) * ps)
        per = beta * (pt * (lpt - lm)).sum(-1) + (1 - beta) * (ps * (lps - lm)).sum(-1)
    valid = labels.reshape(-1) != -100
    per = torch.where(valid, per, 0.0)
    if reduction == "none":
        return per.reshape(labels.shape)
    return per.sum() / valid.sum().clamp_min(1) if reduction == "mean" else per.sum()


def _rel(a, b) -> float:
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("impl, mode", IMPL_MODES)
@pytest.mark.parametrize("divergence, beta, reduction", [
    pytest.param("fkl", 0.5, "mean", id="fkl-mean"),
    pytest.param("jsd", 0.3, "none", id="jsd0.3-none"),
    pytest.param("rkl", 0.5, "sum", id="rkl-sum"),
])
def test_sliced_transposed_and_expanded_inputs(impl, mode, divergence, beta, reduction):
    """hidden[:, :-1] (a non-contiguous 3-D slice), a head stored transposed ([D, V].t()), a teacher hidden state
    broadcast over the batch (stride 0) and a vocabulary (V=29) padded in the teacher's head: the loss and the
    gradients of the hidden states and of the [D, V] parameter match float64."""
    g = torch.Generator().manual_seed(3)
    b, t, ds, dt, v = 2, 6, 13, 7, 29
    hidden = torch.randn(b, t + 1, ds, generator=g, requires_grad=True)
    w_dv = torch.randn(ds, v, generator=g, requires_grad=True)        # the student head, stored [D, V]
    teacher_row = torch.randn(1, t, dt, generator=g)
    wt = torch.randn(v + 4, dt, generator=g)                           # padded teacher head
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 2] = labels[1, 5] = -100
    loss = fastopd.fused_linear_divergence(hidden[:, :-1], w_dv.t(), teacher_row.expand(b, t, dt), wt, labels,
                                           divergence=divergence, beta=beta, reduction=reduction, vocab_size=v,
                                           temperature=1.3, impl=impl, mode=mode, chunk_size=5)
    upstream = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    (loss * upstream).sum().backward()

    h64 = hidden.detach().double().requires_grad_(True)
    w64 = w_dv.detach().double().requires_grad_(True)
    xs = h64[:, :-1].reshape(-1, ds) @ w64
    xt = teacher_row.double().expand(b, t, dt).reshape(-1, dt) @ wt[:v].double().T
    ref = _f64_loss(xs, xt, labels, divergence, beta, 1.3, reduction)
    (ref * upstream.double()).sum().backward()
    assert loss.shape == ref.shape
    assert _rel(loss.detach(), ref.detach()) < 1e-5
    assert _rel(hidden.grad, h64.grad) < 1e-5
    assert float(hidden.grad[:, -1].abs().max()) == 0.0  # the sliced-off position gets nothing
    assert _rel(w_dv.grad, w64.grad) < 1e-5


@pytest.mark.parametrize("impl, mode", IMPL_MODES)
def test_bf16_student_beside_fp32_teacher(impl, mode):
    """Each model's hidden state and head share a dtype, the two models need not: the loss is the one of the
    student's bf16 values taken exactly (the CPU computes in fp32), gradients come back in bf16."""
    g = torch.Generator().manual_seed(4)
    hs = torch.randn(9, 12, generator=g).bfloat16().requires_grad_(True)
    ws = torch.randn(31, 12, generator=g).bfloat16().requires_grad_(True)
    ht, wt = torch.randn(9, 5, generator=g), torch.randn(31, 5, generator=g)
    loss = fastopd.fused_linear_divergence(hs, ws, ht, wt, divergence="jsd", beta=0.4, impl=impl, mode=mode)
    loss.backward()
    assert loss.dtype == torch.float32 and hs.grad.dtype == ws.grad.dtype == torch.bfloat16
    h64, w64 = hs.detach().double().requires_grad_(True), ws.detach().double().requires_grad_(True)
    ref = _f64_loss(h64 @ w64.T, ht.double() @ wt.double().T, torch.zeros(9, dtype=torch.long), "jsd", 0.4, 1.0,
                    "mean")
    ref.backward()
    assert _rel(loss.detach(), ref.detach()) < 1e-5
    assert _rel(hs.grad, h64.grad) < 1e-2 and _rel(ws.grad, w64.grad) < 1e-2  # bf16 rounding of the gradients


@pytest.mark.parametrize("impl, mode", IMPL_MODES)
def test_autocast_casts_hidden_and_heads_as_f_linear_does(impl, mode):
    """Inside torch.autocast a bf16 hidden state beside an fp32 head (or bias) is taken as `lm_head(hidden)` takes
    it there: both in bf16 (fp32 accumulation). The loss equals the call on those bf16 casts outside autocast, and
    every gradient arrives in its input's dtype."""
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(2, 5, 12, generator=g).bfloat16().requires_grad_(True)
    ws = torch.randn(23, 12, generator=g, requires_grad=True)   # fp32 master weight, as under AMP
    bs = torch.randn(23, generator=g, requires_grad=True)
    ht, wt = torch.randn(2, 5, 7, generator=g), torch.randn(23, 7, generator=g).bfloat16()
    labels = torch.randint(0, 23, (2, 5), generator=g)
    opts = dict(divergence="rkl", hard_label_weight=0.3, impl=impl, mode=mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fastopd.fused_linear_divergence(hs, ws, ht, wt, labels, student_bias=bs, **opts)
    loss.backward()
    assert loss.dtype == torch.float32
    assert (hs.grad.dtype, ws.grad.dtype, bs.grad.dtype) == (torch.bfloat16, torch.float32, torch.float32)

    leaves = [t.detach().bfloat16().requires_grad_(True) for t in (hs, ws, bs)]
    want = fastopd.fused_linear_divergence(leaves[0], leaves[1], ht.bfloat16(), wt, labels, student_bias=leaves[2],
                                           **opts)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    for got, ref in zip((hs.grad, ws.grad, bs.grad), leaves):
        torch.testing.assert_close(got, ref.grad.to(got.dtype), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl, mode", IMPL_MODES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_refused(impl, mode, reduction):
    """The gradients are closed forms with no graph behind them: create_graph=True (a gradient penalty, a
    Hessian-vector product) raises instead of differentiating them to zero."""
    g = torch.Generator().manual_seed(6)
    hs = torch.randn(5, 8, generator=g, requires_grad=True)
    ws = torch.randn(17, 8, generator=g, requires_grad=True)
    loss = fastopd.fused_linear_divergence(hs, ws, torch.randn(5, 3, generator=g), torch.randn(17, 3, generator=g),
                                           reduction=reduction, impl=impl, mode=mode)
    with pytest.raises(RuntimeError, match="once differentiable"):
        torch.autograd.grad(loss.sum(), (hs, ws), create_graph=True)


def test_double_backward_is_refused_from_logits():
    s = torch.randn(4, 11, requires_grad=True)
    loss = fastopd.divergence(s, torch.randn(4, 11), impl="torch")
    with pytest.raises(RuntimeError, match="once differentiable"):
        torch.autograd.grad(loss, s, create_graph=True)


def test_torch_func_transforms_are_refused():
    """torch.func (grad, vmap) needs a setup_context-style Function: torch refuses it with its own message."""
    ws, ht, wt = torch.randn(13, 6), torch.randn(4, 3), torch.randn(13, 3)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda h: fastopd.fused_linear_divergence(h, ws, ht, wt, impl="torch"))(torch.randn(4, 6))


@pytest.mark.parametrize("impl, mode", IMPL_MODES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_accumulation_and_run_to_run_determinism(impl, mode, reduction):
    """Two calls and two backwards add up to twice one call's gradients, and a repeated call is bitwise equal."""
    g = torch.Generator().manual_seed(7)
    hs0, ws0 = torch.randn(11, 9, generator=g), torch.randn(19, 9, generator=g)
    ht, wt = torch.randn(11, 4, generator=g), torch.randn(19, 4, generator=g)
    labels = torch.randint(0, 19, (11,), generator=g)
    labels[3] = -100

    def step(hs, ws):
        loss = fastopd.fused_linear_divergence(hs, ws, ht, wt, labels, divergence="jsd", beta=0.3,
                                               reduction=reduction, impl=impl, mode=mode, chunk_size=4)
        loss.sum().backward()
        return loss.detach()

    runs = []
    for _ in range(2):
        hs, ws = hs0.clone().requires_grad_(True), ws0.clone().requires_grad_(True)
        runs.append((step(hs, ws), hs.grad.clone(), ws.grad.clone()))
        step(hs, ws)
        torch.testing.assert_close(hs.grad, 2 * runs[-1][1], rtol=1e-6, atol=0)
        torch.testing.assert_close(ws.grad, 2 * runs[-1][2], rtol=1e-6, atol=1e-9)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl, mode", _impl_modes(tiled=False))
def test_empty_vocabulary_is_refused(impl, mode):
    h, wt = torch.randn(3, 4), torch.randn(0, 2)
    with pytest.raises(ValueError, match=r"vocabulary is empty.*\(0, 4\)"):
        fastopd.fused_linear_divergence(h, torch.randn(0, 4), torch.randn(3, 2), wt, impl=impl, mode=mode)
    with pytest.raises(ValueError, match=r"vocabulary is empty.*\(3, 0\)"):
        fastopd.divergence(torch.randn(3, 0), torch.randn(3, 0), impl=impl)


@pytest.mark.parametrize("impl, mode", IMPL_MODES)
def test_zero_width_student_hidden(impl, mode):
    """Ds = 0 (a bias-only student head): the student's logits are its bias, and the bias gets the gradient."""
    g = torch.Generator().manual_seed(8)
    bs = torch.randn(13, generator=g, requires_grad=True)
    ht, wt = torch.randn(2, 3, 5, generator=g), torch.randn(13, 5, generator=g)
    hs = torch.zeros(2, 3, 0, requires_grad=True)
    loss = fastopd.fused_linear_divergence(hs, torch.zeros(13, 0), ht, wt, student_bias=bs, impl=impl, mode=mode)
    loss.backward()
    b64 = bs.detach().double().requires_grad_(True)
    ref = _f64_loss(b64.expand(6, 13), ht.reshape(6, 5).double() @ wt.double().T, torch.zeros(2, 3), "fkl", 0.5,
                    1.0, "mean")
    ref.backward()
    assert _rel(loss.detach(), ref.detach()) < 1e-5 and _rel(bs.grad, b64.grad) < 1e-5
    assert hs.grad.shape == (2, 3, 0)


@pytest.mark.parametrize("ignore_index", [pytest.param(2**70, id="beyond-int64"), pytest.param(-100.0, id="float"),
                                          pytest.param(True, id="bool")])
def test_ignore_index_must_be_an_int64(ignore_index):
    h, w = torch.randn(3, 4), torch.randn(7, 4)
    with pytest.raises(ValueError, match="ignore_index"):
        fastopd.fused_linear_divergence(h, w, h, w, torch.zeros(3, dtype=torch.long), ignore_index=ignore_index)
