"""fused_linear_divergence and divergence against an independent float64 implementation, on every backend
that can run here (torch reference, C++ CPU kernel, Triton under the interpreter, CUDA on a GPU)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastopd
from fastopd import _dispatch

# ----------------------------------------------------------------------------------------------------------
# Independent float64 reference: materialized logits, log_softmax, autograd for the gradients.
# ----------------------------------------------------------------------------------------------------------


def _plogq(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum p * (a - b) with 0 where p == 0; the inputs are sanitized so autograd never sees inf - inf."""
    keep = p > 0
    zero = torch.zeros((), dtype=p.dtype)
    return torch.where(keep, p * (torch.where(keep, a, zero) - torch.where(keep, b, zero)), zero).sum(-1)


def ref_per_token(zs: torch.Tensor, zt: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    lps, lpt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    ps, pt = lps.exp(), lpt.exp()
    if divergence == "fkl" or (divergence == "jsd" and beta == 0):
        return _plogq(pt, lpt, lps)
    if divergence == "rkl" or (divergence == "jsd" and beta == 1):
        return _plogq(ps, lps, lpt)
    lm = torch.logsumexp(torch.stack([lps + math.log(1 - beta), lpt + math.log(beta)]), dim=0)
    return beta * _plogq(pt, lpt, lm) + (1 - beta) * _plogq(ps, lps, lm)


def reference(hs, ws, ht, wt, labels=None, *, divergence="fkl", beta=0.5, temperature=1.0, ignore_index=-100,
              reduction="mean", student_bias=None, teacher_bias=None, vocab_size=None, softcap=None,
              hard_label_weight=0.0, soft_label_weight=1.0, num_items_in_batch=None, chunk_size=None, mode=None,
              hard_label_temperature=None):
    """Returns (loss, per-token stats dict) in float64, differentiable w.r.t. the student's float64 leaves.
    `chunk_size` and `mode` are accepted (and ignored) so that one options dict serves both implementations."""
    del chunk_size, mode
    v = vocab_size or ws.shape[0]
    xs = hs.reshape(-1, hs.shape[-1]) @ ws[:v].T
    xt = ht.reshape(-1, ht.shape[-1]) @ wt[:v].T
    if student_bias is not None:
        xs = xs + student_bias[:v]
    if teacher_bias is not None:
        xt = xt + teacher_bias[:v]
    if softcap is not None:
        xs, xt = softcap * torch.tanh(xs / softcap), softcap * torch.tanh(xt / softcap)
    zs, zt = xs / temperature, xt / temperature
    per = soft_label_weight * ref_per_token(zs, zt, divergence, beta)
    n = zs.shape[0]
    lps, lpt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    if labels is not None:
        lab = labels.reshape(-1)
        valid = lab != ignore_index
        y = torch.where(valid, lab, torch.zeros_like(lab))
        lp_s_y = lps.gather(1, y[:, None])[:, 0]
        lp_t_y = lpt.gather(1, y[:, None])[:, 0]
        if hard_label_weight:
            lp_ce = F.log_softmax(xs / (hard_label_temperature or temperature), -1)
            per = per - hard_label_weight * lp_ce.gather(1, y[:, None])[:, 0]
    else:
        valid = torch.ones(n, dtype=torch.bool)
        lp_s_y = lp_t_y = torch.zeros(n, dtype=zs.dtype)
    per = torch.where(valid, per, torch.zeros((), dtype=per.dtype))
    if reduction == "none":
        loss = per.reshape(hs.shape[:-1])
    elif reduction == "sum":
        loss = per.sum()
    else:
        denom = num_items_in_batch if num_items_in_batch is not None else max(int(valid.sum()), 1)
        loss = per.sum() / denom
    ent = -_plogq(lps.exp(), lps, torch.zeros_like(lps))
    zero = torch.zeros((), dtype=zs.dtype)
    stats = {
        "lse_student": torch.logsumexp(zs, -1), "lse_teacher": torch.logsumexp(zt, -1),
        "logp_student": lp_s_y, "logp_teacher": lp_t_y, "entropy_student": ent,
    }
    stats = {k: torch.where(valid, s, zero).reshape(hs.shape[:-1]) for k, s in stats.items()}
    return loss, stats


# ----------------------------------------------------------------------------------------------------------
# Backends and helpers
# ----------------------------------------------------------------------------------------------------------


def _backend_params():
    params = []
    for impl in ("torch", "cpu", "triton", "cuda"):
        device = "cuda" if impl == "cuda" or (impl == "triton" and torch.cuda.is_available()) else "cpu"
        why = _dispatch.available("divergence_chunk", impl, device)
        if why is None and impl == "triton" and importlib.util.find_spec("fastopd.kernels.divergence") is None:
            why = "fastopd.kernels.divergence is not present"
        marks = [pytest.mark.skip(reason=why)] if why else []
        params.append(pytest.param((impl, device), id=impl, marks=marks))
    return params


BACKENDS = _backend_params()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def assert_matches_reference(out, ref, grads, ref_grads, tol: float = 1e-5) -> None:
    """Loss and every gradient finite and within `tol` relative (norm-wise) of the float64 reference."""
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= tol
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) <= tol


def make_inputs(n, ds, dt, vs, vt, *, lead=None, seed=0, scale=1.0, dtype=torch.float32, bias=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (n,)
    hs = torch.randn(*shape, ds, generator=g) * scale / math.sqrt(ds) ** 0.5
    ws = torch.randn(vs, ds, generator=g) / math.sqrt(ds) ** 0.5
    ht = torch.randn(*shape, dt, generator=g) * scale / math.sqrt(dt) ** 0.5
    wt = torch.randn(vt, dt, generator=g) / math.sqrt(dt) ** 0.5
    bs = torch.randn(vs, generator=g) if bias else None
    bt = torch.randn(vt, generator=g) if bias else None
    conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return conv(hs), conv(ws), conv(ht), conv(wt), conv(bs), conv(bt)


def run_both(inputs, labels, opts, impl_device, grad_seed=1):
    """fastopd's loss and grads (fp32 path) and the float64 reference's, for the same upstream gradient."""
    impl, device = impl_device
    hs, ws, ht, wt, bs, bt = inputs
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (hs, ws, bs)]
    out = fastopd.fused_linear_divergence(leaves[0].to(device), leaves[1].to(device), ht.to(device), wt.to(device),
                                          labels.to(device) if labels is not None else None,
                                          student_bias=leaves[2].to(device) if bs is not None else None,
                                          teacher_bias=bt.to(device) if bt is not None else None, impl=impl, **opts)
    ref_leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (hs, ws, bs)]
    ref, _ = reference(ref_leaves[0], ref_leaves[1], ht.double(), wt.double(), labels, student_bias=ref_leaves[2],
                       teacher_bias=bt.double() if bt is not None else None, **opts)
    gen = torch.Generator().manual_seed(grad_seed)
    upstream = torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5  # non-unit upstream gradient
    out.backward(upstream.to(device=out.device, dtype=out.dtype))
    ref.backward(upstream)
    grads = [t.grad for t in leaves if t is not None]
    ref_grads = [t.grad for t in ref_leaves if t is not None]
    return out.detach().cpu(), ref.detach(), [g.cpu() for g in grads], ref_grads


# ----------------------------------------------------------------------------------------------------------
# Correctness in fp32
# ----------------------------------------------------------------------------------------------------------

N, DS, DT, V = 37, 67, 45, 1001

CASES = [
    pytest.param(dict(), dict(divergence="fkl"), id="N37-V1001-fkl"),
    pytest.param(dict(), dict(divergence="rkl"), id="N37-V1001-rkl"),
    pytest.param(dict(), dict(divergence="jsd", beta=0.3), id="N37-V1001-jsd-b0.3"),
    pytest.param(dict(), dict(divergence="jsd", beta=0.0), id="N37-V1001-jsd-b0"),
    pytest.param(dict(), dict(divergence="jsd", beta=1.0), id="N37-V1001-jsd-b1"),
    pytest.param(dict(bias=True), dict(divergence="fkl", temperature=1.7), id="bias-T1.7-fkl"),
    pytest.param(dict(bias=True), dict(divergence="jsd", beta=0.3, temperature=0.6), id="bias-T0.6-jsd"),
    pytest.param(dict(scale=4.0), dict(divergence="rkl", softcap=3.0), id="softcap3-rkl"),
    pytest.param(dict(scale=4.0), dict(divergence="jsd", beta=0.7, softcap=5.0, temperature=2.0), id="softcap5-T2-jsd"),
    # A softcap far above the logits: tanh of tiny arguments, where 1 - exp(-2|x|) would lose every digit.
    pytest.param(dict(scale=4.0), dict(divergence="jsd", beta=0.3, softcap=1e4), id="softcap1e4-jsd"),
    pytest.param(dict(scale=4.0), dict(divergence="rkl", softcap=1e8, hard_label_weight=0.5), id="softcap1e8-rkl-hard"),
    pytest.param(dict(vs=1010, vt=1003), dict(divergence="jsd", beta=0.3, vocab_size=1001), id="vocabpad-jsd"),
    pytest.param(dict(vs=1010, vt=1003), dict(divergence="rkl", vocab_size=997), id="vocabpad-rkl"),
    pytest.param(dict(), dict(divergence="rkl", reduction="sum"), id="sum-rkl"),
    pytest.param(dict(), dict(divergence="fkl", reduction="none"), id="none-fkl"),
    pytest.param(dict(), dict(divergence="jsd", beta=0.3, reduction="none"), id="none-jsd"),
    pytest.param(dict(lead=(3, 13)), dict(divergence="jsd", beta=0.3), id="3d-B3-T13-jsd"),
    pytest.param(dict(lead=(3, 13)), dict(divergence="rkl", reduction="none"), id="3d-none-rkl"),
    pytest.param(dict(), dict(divergence="fkl", hard_label_weight=0.4), id="hard0.4-fkl"),
    pytest.param(dict(), dict(divergence="rkl", hard_label_weight=1.0, soft_label_weight=0.5, softcap=4.0),
                 id="hard1-soft0.5-softcap-rkl"),
    pytest.param(dict(), dict(divergence="jsd", beta=0.3, hard_label_weight=0.5, reduction="none"), id="hard-none-jsd"),
    pytest.param(dict(), dict(divergence="fkl", num_items_in_batch=50), id="num-items-fkl"),
    pytest.param(dict(), dict(divergence="jsd", beta=0.3, chunk_size=7), id="chunk7-jsd"),
    pytest.param(dict(), dict(divergence="rkl", chunk_size=5, reduction="none"), id="chunk5-none-rkl"),
    # The hard-label CE at its own temperature: Liger's recipe (JSD at T, CE at 1), and others.
    pytest.param(dict(), dict(divergence="jsd", beta=0.5, temperature=2.0, hard_label_weight=0.5,
                              soft_label_weight=0.5, hard_label_temperature=1.0), id="hardT1-jsd-T2"),
    pytest.param(dict(scale=4.0), dict(divergence="rkl", temperature=0.8, softcap=3.0, hard_label_weight=1.0,
                                       hard_label_temperature=2.5, chunk_size=9), id="hardT2.5-rkl-T0.8-cap3"),
    pytest.param(dict(), dict(divergence="fkl", temperature=3.0, hard_label_weight=0.3, hard_label_temperature=1.0,
                              reduction="none"), id="hardT1-none-fkl-T3"),
]


@pytest.mark.parametrize("impl_device", BACKENDS)
@pytest.mark.parametrize("shape_kw, opts", CASES)
def test_matches_float64_reference(impl_device, shape_kw, opts):
    kw = dict(n=N, ds=DS, dt=DT, vs=V, vt=V)
    kw.update(shape_kw)
    inputs = make_inputs(**kw)
    g = torch.Generator().manual_seed(7)
    lead = kw.get("lead") or (kw["n"],)
    vocab = opts.get("vocab_size", V)
    labels = torch.randint(0, vocab, lead, generator=g)
    labels.view(-1)[::5] = -100  # every fifth position ignored
    out, ref, grads, ref_grads = run_both(inputs, labels, opts, impl_device)
    assert out.shape == ref.shape
    assert_matches_reference(out, ref, grads, ref_grads)


@pytest.mark.parametrize("impl_device", BACKENDS)
@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd"])
def test_vocab_above_65536(impl_device, divergence):
    inputs = make_inputs(n=6, ds=16, dt=12, vs=65601, vt=65601, seed=3)
    labels = torch.tensor([0, 65600, -100, 31, 65536, 7])
    opts = dict(divergence=divergence, beta=0.4, hard_label_weight=0.2, chunk_size=4)
    out, ref, grads, ref_grads = run_both(inputs, labels, opts, impl_device)
    assert_matches_reference(out, ref, grads, ref_grads)


@pytest.mark.parametrize("impl_device", BACKENDS)
@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd"])
def test_stats_match_reference(impl_device, divergence):
    impl, device = impl_device
    hs, ws, ht, wt, bs, bt = make_inputs(n=0, ds=DS, dt=DT, vs=V, vt=V, lead=(2, 19), seed=5, bias=True)
    labels = torch.randint(0, V, (2, 19), generator=torch.Generator().manual_seed(2))
    labels[0, :4] = -100
    opts = dict(divergence=divergence, beta=0.3, temperature=1.3, softcap=6.0)
    loss, stats = fastopd.fused_linear_divergence(hs.to(device), ws.to(device), ht.to(device), wt.to(device),
                                                  labels.to(device), student_bias=bs.to(device),
                                                  teacher_bias=bt.to(device), return_stats=True, impl=impl, **opts)
    _, ref = reference(hs.double(), ws.double(), ht.double(), wt.double(), labels, student_bias=bs.double(),
                       teacher_bias=bt.double(), **opts)
    assert isinstance(stats, fastopd.DivergenceStats)
    for name in ref:
        got = getattr(stats, name).cpu()
        assert got.shape == (2, 19), name
        assert rel_err(got, ref[name]) <= 1e-5, name
        assert (got[0, :4] == 0).all(), name


@pytest.mark.parametrize("impl_device", BACKENDS)
@pytest.mark.parametrize("divergence, v, beta", [
    pytest.param("fkl", 2, 0.5, id="fkl-V2-logp-near-0"),  # teacher log-probs of -6e-7 must not round to 0
    pytest.param("jsd", 70, 0.2, id="jsd-V70-mixture-underflow"),  # b*p_t + (1-b)*p_s underflows to 0
])
def test_large_logit_scale_regressions(impl_device, divergence, v, beta):
    """Cases hypothesis found: logits of |z| ~ 500 after temperature 0.5. Each backend's error must stay
    within twice a naive fp32 computation's, and finite."""
    inputs = make_inputs(n=1, ds=1, dt=1, vs=v, vt=v, seed=0, scale=40.0)
    labels = torch.randint(0, v, (1,), generator=torch.Generator().manual_seed(0))
    opts = dict(divergence=divergence, beta=beta, temperature=0.5, chunk_size=1)
    out, ref, grads, ref_grads = run_both(inputs, labels, opts, impl_device, grad_seed=0)
    hs, ws, ht, wt, _, _ = inputs
    leaves = [hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)]
    naive, _ = reference(leaves[0], leaves[1], ht, wt, labels, **opts)
    naive.backward((torch.rand((), generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5).float())
    assert torch.isfinite(out).all()
    assert abs(out.item() - ref.item()) <= max(1e-5 * abs(ref.item()), 2 * abs(naive.item() - ref.item()))
    for got, want, nv in zip(grads, ref_grads, leaves):
        assert torch.isfinite(got).all()
        budget = max(1e-5 * want.norm().item(), 2 * (nv.grad.double() - want).norm().item())
        assert (got.double() - want).norm() <= budget


# ----------------------------------------------------------------------------------------------------------
# Low precision: error no worse than twice a same-dtype naive PyTorch computation's
# ----------------------------------------------------------------------------------------------------------


def naive_same_dtype(hs, ws, ht, wt, labels, divergence, beta):
    """The computation a user would write in bf16/fp16: logits in the input dtype, TRL-style divergence."""
    xs, xt = hs @ ws.T, ht @ wt.T
    per = ref_per_token(xs, xt, divergence, beta)
    valid = labels != -100
    return torch.where(valid, per, torch.zeros((), dtype=per.dtype)).sum() / valid.sum()


@pytest.mark.parametrize("impl_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("divergence, beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.3)], ids=["fkl", "rkl", "jsd"])
def test_low_precision_error_budget(impl_device, dtype, divergence, beta):
    impl, device = impl_device
    hs, ws, ht, wt, _, _ = make_inputs(n=41, ds=64, dt=48, vs=1271, vt=1271, seed=11, scale=2.0, dtype=dtype)
    labels = torch.randint(0, 1271, (41,), generator=torch.Generator().manual_seed(1))
    labels[::7] = -100
    ref_leaves = [hs.double().requires_grad_(True), ws.double().requires_grad_(True)]
    ref, _ = reference(ref_leaves[0], ref_leaves[1], ht.double(), wt.double(), labels, divergence=divergence, beta=beta)
    ref.backward()
    naive_leaves = [hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)]
    naive = naive_same_dtype(naive_leaves[0], naive_leaves[1], ht, wt, labels, divergence, beta)
    naive.backward()
    ours_leaves = [hs.clone().to(device).requires_grad_(True), ws.clone().to(device).requires_grad_(True)]
    ours = fastopd.fused_linear_divergence(ours_leaves[0], ours_leaves[1], ht.to(device), wt.to(device),
                                           labels.to(device), divergence=divergence, beta=beta, impl=impl)
    ours.backward()
    assert ours_leaves[0].grad.dtype == dtype and ours_leaves[1].grad.dtype == dtype
    assert rel_err(ours.cpu(), ref) <= 2 * rel_err(naive, ref) + 1e-6
    for o, nv, r in zip(ours_leaves, naive_leaves, ref_leaves):
        assert rel_err(o.grad.cpu(), r.grad) <= 2 * rel_err(nv.grad, r.grad)


# ----------------------------------------------------------------------------------------------------------
# Random shapes and logit scales
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 24), ds=st.integers(1, 40), dt=st.integers(1, 40), v=st.integers(2, 400),
       scale=st.sampled_from([0.01, 1.0, 8.0, 40.0]), divergence=st.sampled_from(["fkl", "rkl", "jsd"]),
       beta=st.sampled_from([0.0, 0.2, 0.5, 1.0]), temperature=st.sampled_from([0.5, 1.0, 3.0]),
       chunk=st.integers(1, 9), impl=st.sampled_from(["torch", "cpu"]), seed=st.integers(0, 2**16),
       hard=st.sampled_from([None, (0.5, None), (0.5, 1.0), (1.0, 2.5)]))
def test_hypothesis_shapes_and_scales(n, ds, dt, v, scale, divergence, beta, temperature, chunk, impl, seed, hard):
    if _dispatch.available("divergence_chunk", impl, "cpu") is not None:
        impl = "torch"
    inputs = make_inputs(n=n, ds=ds, dt=dt, vs=v, vt=v, seed=seed, scale=scale)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    opts = dict(divergence=divergence, beta=beta, temperature=temperature, chunk_size=chunk)
    if hard is not None:  # the hard-label CE too, at the divergence's temperature or at its own
        opts.update(hard_label_weight=hard[0], hard_label_temperature=hard[1])
    out, ref, grads, ref_grads = run_both(inputs, labels, opts, (impl, "cpu"), grad_seed=seed)
    # Budget: 1e-5 relative, or twice the error of the same math done naively in fp32 (large logit scales
    # make rkl/jsd gradients ill-conditioned in any fp32 implementation).
    hs, ws, ht, wt, _, _ = inputs
    leaves = [hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)]
    naive, _ = reference(leaves[0], leaves[1], ht, wt, labels, **opts)
    naive.backward(torch.rand((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() + 0.5)
    assert torch.isfinite(out).all()
    assert abs(out.item() - ref.item()) <= max(1e-5 * max(1.0, abs(ref.item())), 2 * abs(naive.item() - ref.item()))
    for got, want, nv in zip(grads, ref_grads, leaves):
        assert torch.isfinite(got).all()
        budget = max(1e-5 * max(1.0, want.norm().item()), 2 * (nv.grad.double() - want).norm().item())
        assert (got.double() - want).norm() <= budget


RKL_LARGE_SCALE = [pytest.param(*b.values, "chunked", id=b.id, marks=b.marks) for b in BACKENDS] + [
    pytest.param(*BACKENDS[2].values, "tiled", id="triton-tiled", marks=BACKENDS[2].marks),
]


@pytest.mark.parametrize("impl_device, mode", RKL_LARGE_SCALE)
def test_rkl_gradient_large_scale(impl_device, mode):
    """A case hypothesis found at logit scale ~140: the student's top token holds all but 5e-5 of the mass and
    rkl = 26.7, so that token's gradient p_s (d - rkl) = -1.9e-3 is the difference of two numbers of size 26.7.
    Formed directly, each fp32 rounding at that size (the row sum, p_s * rkl, p_s near 1) lands in it (2.8x
    fp32 autograd's error); the row kernels and the tiled mode take d and rkl relative to d at the student's top
    token."""
    inputs = make_inputs(n=1, ds=25, dt=1, vs=19, vt=19, seed=119, scale=40.0)
    labels = torch.randint(0, 19, (1,), generator=torch.Generator().manual_seed(119))
    opts = dict(divergence="rkl", chunk_size=1)
    out, ref, grads, ref_grads = run_both(inputs, labels, dict(opts, mode=mode), impl_device, grad_seed=119)
    hs, ws, ht, wt, _, _ = inputs
    leaves = [hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)]
    naive, _ = reference(leaves[0], leaves[1], ht, wt, labels, **opts)
    naive.backward((torch.rand((), generator=torch.Generator().manual_seed(119), dtype=torch.float64) + 0.5).float())
    for got, want, nv in zip(grads, ref_grads, leaves):
        budget = max(1e-5 * want.norm().item(), 2 * (nv.grad.double() - want).norm().item())
        assert (got.double() - want).norm() <= budget


# ----------------------------------------------------------------------------------------------------------
# Extreme inputs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl_device", BACKENDS)
@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd"])
def test_huge_logits_stay_finite(impl_device, divergence):
    g = torch.Generator().manual_seed(4)
    n, d, v = 9, 8, 333
    hs, ht = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    ws = torch.randn(v, d, generator=g)
    wt = torch.randn(v, d, generator=g)
    # scale so that logits reach +-1e4
    ws, wt = ws * (1e4 / (hs @ ws.T).abs().max()), wt * (1e4 / (ht @ wt.T).abs().max())
    labels = torch.randint(0, v, (n,), generator=g)
    out, ref, grads, ref_grads = run_both((hs, ws, ht, wt, None, None), labels,
                                          dict(divergence=divergence, beta=0.5), impl_device)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= 1e-4
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        # near one-hot distributions: rkl/jsd gradients are ~1e-240 in float64 and exactly 0 in fp32
        assert (got.double() - want).norm() <= 1e-4 * max(want.norm().item(), 1.0)


@pytest.mark.parametrize("impl_device", BACKENDS)
@pytest.mark.parametrize("divergence, beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.3), ("jsd", 1.0)])
def test_masked_vocabulary_minus_inf(impl_device, divergence, beta):
    """Vocabulary entries masked with -inf logits (both models, as constrained decoding masks them) give
    finite losses and gradients equal to the float64 reference; fkl and jsd also tolerate -inf in the
    teacher alone."""
    hs, ws, ht, wt, bs, bt = make_inputs(n=23, ds=32, dt=20, vs=301, vt=301, seed=9, bias=True)
    masked = torch.zeros(301, dtype=torch.bool)
    masked[::3] = True
    bt = bt.masked_fill(masked, float("-inf"))
    if divergence == "rkl" or beta == 1.0:
        bs = bs.masked_fill(masked, float("-inf"))
    labels = torch.randint(0, 301, (23,), generator=torch.Generator().manual_seed(0))
    labels = torch.where(masked[labels], labels + 1, labels)  # labels on allowed tokens
    out, ref, grads, ref_grads = run_both((hs, ws, ht, wt, bs, bt), labels,
                                          dict(divergence=divergence, beta=beta, hard_label_weight=0.3), impl_device)
    assert torch.isfinite(out).all()
    assert_matches_reference(out, ref, grads, ref_grads)


@pytest.mark.parametrize("impl_device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_labels_ignored(impl_device, reduction):
    impl, device = impl_device
    hs, ws, ht, wt, _, _ = make_inputs(n=11, ds=16, dt=16, vs=101, vt=101)
    hs, ws = hs.to(device).requires_grad_(True), ws.to(device).requires_grad_(True)
    labels = torch.full((11,), -100, device=device)
    loss = fastopd.fused_linear_divergence(hs, ws, ht.to(device), wt.to(device), labels, divergence="jsd",
                                           reduction=reduction, hard_label_weight=0.5, impl=impl)
    assert (loss == 0).all()
    loss.sum().backward()
    assert (hs.grad == 0).all() and (ws.grad == 0).all()


@pytest.mark.parametrize("impl_device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(impl_device, reduction):
    impl, device = impl_device
    hs = torch.zeros(0, 16, device=device, requires_grad=True)
    ws = torch.randn(101, 16, device=device, requires_grad=True)
    loss = fastopd.fused_linear_divergence(hs, ws, torch.zeros(0, 8, device=device), torch.randn(101, 8, device=device),
                                           torch.zeros(0, dtype=torch.long, device=device), reduction=reduction,
                                           impl=impl)
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert torch.isfinite(loss).all() and (loss == 0).all()
    loss.sum().backward()
    assert hs.grad.shape == (0, 16) and (ws.grad == 0).all()


# ----------------------------------------------------------------------------------------------------------
# Logits API, module, memory structure
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl_device", BACKENDS)
@pytest.mark.parametrize("opts", [dict(divergence="fkl"), dict(divergence="jsd", beta=0.3, reduction="none"),
                                  dict(divergence="rkl", temperature=2.0, vocab_size=250, hard_label_weight=0.2),
                                  dict(divergence="jsd", beta=0.5, temperature=2.0, hard_label_weight=0.5,
                                       hard_label_temperature=1.0)],
                         ids=["fkl", "jsd-none", "rkl-T2-vocab250-hard", "jsd-T2-hard-hardT1"])
def test_divergence_from_logits(impl_device, opts):
    impl, device = impl_device
    g = torch.Generator().manual_seed(0)
    sl = (torch.randn(2, 9, 257, generator=g) * 3).requires_grad_(True)
    tl = torch.randn(2, 9, 257, generator=g) * 3
    labels = torch.randint(0, 250, (2, 9), generator=g)
    labels[1, 3] = -100
    loss = fastopd.divergence(sl.to(device), tl.to(device), labels.to(device), impl=impl, chunk_size=4, **opts)
    eye = torch.eye(257, dtype=torch.float64)
    sl64 = sl.detach().double().requires_grad_(True)
    ref, _ = reference(sl64, eye, tl.double(), eye, labels, **opts)
    upstream = torch.rand(ref.shape, dtype=torch.float64, generator=g) + 0.5
    loss.backward(upstream.to(device=loss.device, dtype=loss.dtype))
    ref.backward(upstream)
    assert rel_err(loss.detach().cpu(), ref) <= 1e-5
    assert rel_err(sl.grad, sl64.grad) <= 1e-5


def test_module_holds_options():
    hs, ws, ht, wt, _, _ = make_inputs(n=13, ds=24, dt=24, vs=301, vt=301)
    labels = torch.randint(0, 301, (13,))
    module = fastopd.FusedLinearDivergenceLoss(divergence="jsd", beta=0.3, temperature=1.5)
    assert "jsd" in repr(module)
    want = fastopd.fused_linear_divergence(hs, ws, ht, wt, labels, divergence="jsd", beta=0.3, temperature=1.5)
    assert torch.equal(module(hs, ws, ht, wt, labels), want)


class _AllocationRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the numel of every tensor an op creates, and which ops ran."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("impl", ["torch", "cpu"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_allocates_tokens_by_vocab(impl, reduction):
    if _dispatch.available("divergence_chunk", impl, "cpu") is not None:
        pytest.skip(_dispatch.available("divergence_chunk", impl, "cpu"))
    n, d, v, chunk = 96, 16, 1001, 8
    hs, ws, ht, wt, _, _ = make_inputs(n=n, ds=d, dt=d, vs=v, vt=v)
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    labels = torch.randint(0, v, (n,))
    rec = _AllocationRecorder()
    with rec:
        loss = fastopd.fused_linear_divergence(hs, ws, ht, wt, labels, divergence="jsd", reduction=reduction,
                                               chunk_size=chunk, impl=impl)
    fwd_ops = list(rec.ops)
    rec.ops.clear()
    with rec:
        loss.sum().backward()
    # the torch reference keeps a few [chunk, V] temporaries; nothing scales with N x V
    assert rec.largest <= max(8 * chunk * v, v * d), rec.largest
    assert sum("mm" in op for op in fwd_ops) >= 2
    if reduction == "mean":  # the gradient was formed in the forward: no GEMM in the backward
        assert not any("mm" in op for op in rec.ops), rec.ops


def test_gradients_never_reach_the_teacher():
    hs, ws, ht, wt, _, _ = make_inputs(n=7, ds=8, dt=8, vs=51, vt=51)
    ht.requires_grad_(True)
    wt.requires_grad_(True)
    hs.requires_grad_(True)
    fastopd.fused_linear_divergence(hs, ws, ht, wt).backward()
    assert ht.grad is None and wt.grad is None and hs.grad is not None


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def _ok():
    return make_inputs(n=5, ds=8, dt=6, vs=31, vt=31)


@pytest.mark.parametrize("mutate, match", [
    pytest.param(lambda a: dict(a, hs=a["hs"][:, :7]), r"\(5, 7\).*\(31, 8\)", id="student-hidden-size"),
    pytest.param(lambda a: dict(a, ht=a["ht"][:4]), r"\(5, 8\).*\(4, 6\)", id="token-count"),
    pytest.param(lambda a: dict(a, wt=a["wt"][:30]), r"31 vs 30", id="vocab-mismatch"),
    pytest.param(lambda a: dict(a, hs=a["hs"].double()), r"float64", id="dtype-mismatch"),
    pytest.param(lambda a: dict(a, wt=a["wt"].to("meta")), r"meta", id="device-mismatch"),
    pytest.param(lambda a: dict(a, labels=torch.zeros(6, dtype=torch.long)), r"\(5,\).*\(6,\)", id="labels-shape"),
    pytest.param(lambda a: dict(a, labels=torch.zeros(5)), r"integer", id="labels-dtype"),
    pytest.param(lambda a: dict(a, labels=torch.tensor([0, 1, 31, 2, 3])), r"31", id="label-out-of-range"),
    pytest.param(lambda a: dict(a, hs=a["hs"][None]), r"\[N, D\]", id="rank-mismatch"),
    pytest.param(lambda a: dict(a, divergence="kl"), r"divergence", id="unknown-divergence"),
    pytest.param(lambda a: dict(a, beta=1.5), r"beta", id="beta-range"),
    pytest.param(lambda a: dict(a, temperature=0.0), r"temperature", id="temperature-zero"),
    pytest.param(lambda a: dict(a, hard_label_temperature=0.0), r"hard_label_temperature", id="hard-temperature-zero"),
    pytest.param(lambda a: dict(a, hard_label_temperature=float("nan")), r"hard_label_temperature",
                 id="hard-temperature-nan"),
    pytest.param(lambda a: dict(a, reduction="batchmean"), r"reduction", id="reduction"),
    pytest.param(lambda a: dict(a, labels=None, hard_label_weight=0.5), r"labels", id="hard-without-labels"),
    pytest.param(lambda a: dict(a, vocab_size=40), r"vocab_size", id="vocab-size-too-big"),
    pytest.param(lambda a: dict(a, impl="fast"), r"impl", id="unknown-impl"),
    pytest.param(lambda a: dict(a, impl="cuda"), r"cuda", id="impl-not-here"),
    pytest.param(lambda a: dict(a, mode="fused"), r"mode", id="unknown-mode"),
    pytest.param(lambda a: dict(a, mode="tiled", impl="cpu"), r"tiled.*impl='cpu'", id="tiled-with-impl-cpu"),
    pytest.param(lambda a: dict(a, softcap=float("inf")), r"softcap", id="softcap-inf"),
    pytest.param(lambda a: dict(a, softcap=float("nan")), r"softcap", id="softcap-nan"),
    pytest.param(lambda a: dict(a, hard_label_weight=float("nan")), r"loss weights", id="hard-weight-nan"),
    pytest.param(lambda a: dict(a, soft_label_weight=float("nan")), r"loss weights", id="soft-weight-nan"),
    pytest.param(lambda a: dict(a, hard_label_weight=float("inf")), r"loss weights", id="hard-weight-inf"),
    pytest.param(lambda a: dict(a, num_items_in_batch=float("nan")), r"num_items_in_batch", id="num-items-nan"),
    pytest.param(lambda a: dict(a, num_items_in_batch=float("inf")), r"num_items_in_batch", id="num-items-inf"),
    pytest.param(lambda a: dict(a, num_items_in_batch=torch.ones(0)), r"num_items_in_batch", id="num-items-empty"),
    pytest.param(lambda a: dict(a, chunk_size=2.5), r"chunk_size", id="chunk-size-float"),
    pytest.param(lambda a: dict(a, chunk_size=True), r"chunk_size", id="chunk-size-bool"),
    pytest.param(lambda a: dict(a, vocab_size=30.5), r"vocab_size", id="vocab-size-float"),  # was cut to 30
    pytest.param(lambda a: dict(a, vocab_size=True), r"vocab_size", id="vocab-size-bool"),   # was taken as 1
    # NumPy < 2.3 lets operator.index read a NumPy bool as 0/1 (with a DeprecationWarning): refused alike
    pytest.param(lambda a: dict(a, vocab_size=np.True_), r"vocab_size", id="vocab-size-numpy-bool"),
    pytest.param(lambda a: dict(a, chunk_size=np.True_), r"chunk_size", id="chunk-size-numpy-bool"),
    pytest.param(lambda a: dict(a, ignore_index=np.False_), r"ignore_index", id="ignore-index-numpy-bool"),
    pytest.param(lambda a: dict(a, labels=[0] * 5), r"labels must be a tensor.*list", id="labels-list"),
    pytest.param(lambda a: dict(a, student_bias=0.5), r"student_bias must be a tensor.*float", id="bias-float"),
    # Refused before any collective, so a placeholder group suffices.
    pytest.param(lambda a: dict(a, vocab_parallel_group=object(), impl="cpu"),
                 r"vocab_parallel_chunk.*no backend 'cpu' \(it has: triton, torch\)", id="vocab-parallel-impl-cpu"),
    pytest.param(lambda a: dict(a, vocab_parallel_group=object(), mode="tiled"), r"chunked mode.*'tiled'",
                 id="vocab-parallel-tiled"),
])
def test_bad_input_raises(mutate, match):
    hs, ws, ht, wt, _, _ = _ok()
    args = dict(hs=hs, ws=ws, ht=ht, wt=wt, labels=torch.zeros(5, dtype=torch.long))
    args = mutate(args)
    if match == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    kwargs = {k: v for k, v in args.items() if k not in ("hs", "ws", "ht", "wt", "labels")}
    with pytest.raises(ValueError, match=match):
        fastopd.fused_linear_divergence(args["hs"], args["ws"], args["ht"], args["wt"], args["labels"], **kwargs)


def test_num_items_as_hf_dataparallel_passes_it():
    """HF's Trainer under DataParallel passes num_items_in_batch as [n_gpu, 1] copies of one count."""
    hs, ws, ht, wt, _, _ = _ok()
    labels = torch.zeros(5, dtype=torch.long)
    want = fastopd.fused_linear_divergence(hs, ws, ht, wt, labels, num_items_in_batch=7)
    for count in (torch.tensor(7), torch.tensor([7]), torch.tensor([[7], [7]])):
        got = fastopd.fused_linear_divergence(hs, ws, ht, wt, labels, num_items_in_batch=count)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert got.shape == ()


@pytest.mark.parametrize("raw", ["1GiB", "0", "-5", ""])
def test_bad_chunk_bytes_variable_is_named(monkeypatch, raw):
    hs, ws, ht, wt, _, _ = _ok()
    monkeypatch.setenv("FASTOPD_CHUNK_BYTES", raw)
    with pytest.raises(ValueError, match="FASTOPD_CHUNK_BYTES must be a positive number of bytes"):
        fastopd.fused_linear_divergence(hs, ws, ht, wt)
    monkeypatch.setenv("FASTOPD_CHUNK_BYTES", "4096")
    fastopd.fused_linear_divergence(hs, ws, ht, wt)


def test_fastopd_impl_applies_to_the_ops_that_have_that_backend(monkeypatch):
    """FASTOPD_IMPL=cpu forces the C++ loss kernel, while the vocab-parallel phases (no 'cpu' backend) stay
    automatic rather than refusing; FASTOPD_IMPL=cuda leaves the optimizer step (no 'cuda' backend) automatic. A
    forced backend the op has but cannot run here is an error naming the variable; `fastopd doctor` reports it
    instead of crashing."""
    from fastopd import cli

    monkeypatch.delenv("FASTOPD_IMPL", raising=False)
    adamw_auto = _dispatch.resolve("sparse_adamw_step", "auto", "cpu")
    monkeypatch.setenv("FASTOPD_IMPL", "cpu")
    assert _dispatch.resolve("vocab_parallel_chunk", "auto", "cpu") == "torch"
    monkeypatch.setenv("FASTOPD_IMPL", "cuda")
    assert _dispatch.resolve("sparse_adamw_step", "auto", "cpu") == adamw_auto
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTOPD_IMPL", "triton")
    with pytest.raises(ValueError, match="FASTOPD_IMPL='triton' cannot run divergence_chunk"):
        _dispatch.resolve("divergence_chunk", "auto", "cpu")
    assert _dispatch.resolve("divergence_chunk", "torch", "cpu") == "torch"  # an explicit impl wins
    assert cli.main(["doctor"]) == 0


def test_fastopd_impl_environment_override(monkeypatch):
    monkeypatch.setenv("FASTOPD_IMPL", "torch")
    assert _dispatch.resolve("divergence_chunk", "auto", "cpu") == "torch"
    monkeypatch.setenv("FASTOPD_IMPL", "nonsense")
    with pytest.raises(ValueError, match="FASTOPD_IMPL"):
        _dispatch.resolve("divergence_chunk", "auto", "cpu")
    monkeypatch.delenv("FASTOPD_IMPL")
    assert _dispatch.resolve("divergence_chunk", "cpu" if _dispatch.available(
        "divergence_chunk", "cpu", "cpu") is None else "torch", "cpu") in ("cpu", "torch")


def test_fp32_accumulator_falls_back_where_torch_refuses_it(monkeypatch):
    """grad_W accumulation for bf16/fp16 CUDA operands: torch 2.8/2.9 may refuse an fp32 `self` beside bf16
    operands in addmm(out_dtype=fp32) (a host-side dtype check); the helper then adds an fp32 product instead,
    from then on, and re-raises errors that are not that refusal. Control flow only: the CUDA GEMMs cannot run
    here, so torch.addmm / torch.mm are stood in by fp32 CPU versions."""
    from fastopd.losses import function

    calls, real_mm = [], torch.mm

    def refusing_addmm(acc, a, b, *, out_dtype, out):
        calls.append("addmm")
        raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")

    def mm(a, b, *, out_dtype):
        calls.append("mm")
        return real_mm(a.to(out_dtype), b.to(out_dtype))

    monkeypatch.setattr(function, "_ADDMM_FP32_INTO", True)
    monkeypatch.setattr(function.torch, "addmm", refusing_addmm)
    monkeypatch.setattr(function.torch, "mm", mm)
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    acc = torch.ones(3, 5)
    function._addmm_f32_(acc, a, b)
    function._addmm_f32_(acc, a, b)
    assert calls == ["addmm", "mm", "mm"]  # the refusal is met once
    torch.testing.assert_close(acc, 1 + 2 * real_mm(a, b))

    def broken_addmm(acc, a, b, *, out_dtype, out):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(function, "_ADDMM_FP32_INTO", True)
    monkeypatch.setattr(function.torch, "addmm", broken_addmm)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        function._addmm_f32_(acc, a, b)


@pytest.mark.parametrize("impl_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.uint16, torch.uint32, torch.uint64],
                         ids=["int32", "int16", "uint8", "uint16", "uint32", "uint64"])
def test_integer_label_dtypes_match_int64(impl_device, dtype):
    """Labels of any integer dtype give the int64 result: token ids stored as uint16/uint32 (numpy token files,
    `torch.from_numpy`) were refused as "not an integer tensor"."""
    impl, device = impl_device
    hs, ws, ht, wt, _, _ = make_inputs(n=7, ds=8, dt=6, vs=200, vt=200, device=device)
    labels = torch.tensor([3, 199, 0, 150, 7, 255, 42], device=device)
    ignore = 255 if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64) else -100
    labels = torch.where(labels == 255, ignore, labels)
    opts = dict(divergence="jsd", beta=0.3, hard_label_weight=0.5, reduction="none", ignore_index=ignore,
                return_stats=True, impl=impl)
    want, want_stats = fastopd.fused_linear_divergence(hs, ws, ht, wt, labels, **opts)
    got, got_stats = fastopd.fused_linear_divergence(hs, ws, ht, wt, labels.to(dtype), **opts)
    assert torch.equal(got, want) and got[5] == 0
    for a, b in zip(got_stats, want_stats):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl_device", BACKENDS)
def test_float64_inputs_run_in_fp32_on_every_device(impl_device):
    """float64 hidden states and heads are taken in fp32 (the loss is fp32, gradients come back in float64) on
    CUDA as on the CPU: on CUDA the fp32-output GEMM (`torch.mm(..., out_dtype=torch.float32)`) refuses float64
    operands, so the call failed with cuBLAS's "out_dtype must be the same as input dtype or fp32 for fp16/bf16
    inputs"."""
    impl, device = impl_device
    hs, ws, ht, wt, bs, bt = make_inputs(n=9, ds=12, dt=7, vs=41, vt=41, bias=True, dtype=torch.float64,
                                         device=device)
    labels = torch.randint(0, 41, (9,), generator=torch.Generator().manual_seed(0)).to(device)
    leaves = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
    opts = dict(divergence="rkl", hard_label_weight=0.3)
    loss = fastopd.fused_linear_divergence(leaves[0], leaves[1], ht, wt, labels, student_bias=leaves[2],
                                           teacher_bias=bt, impl=impl, **opts)
    loss.backward()
    ref_leaves = [t.detach().cpu().requires_grad_(True) for t in (hs, ws, bs)]
    ref, _ = reference(ref_leaves[0], ref_leaves[1], ht.cpu(), wt.cpu(), labels.cpu(), student_bias=ref_leaves[2],
                       teacher_bias=bt.cpu(), **opts)
    ref.backward()
    assert loss.dtype == torch.float32 and all(t.grad.dtype == torch.float64 for t in leaves)
    assert_matches_reference(loss.detach().cpu(), ref.detach(), [t.grad.cpu() for t in leaves],
                             [t.grad for t in ref_leaves])


@pytest.mark.parametrize("bad", [pytest.param(23, id="label-equal-to-vocab"), pytest.param(-1, id="label-minus-1")])
def test_out_of_range_labels_are_refused(bad):
    """A label outside [0, V) that is not ignore_index (-100 here) is an error, not a logit of 0."""
    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(4, 8, generator=g), torch.randn(23, 8, generator=g)
    labels = torch.tensor([1, bad, -100, 3])
    with pytest.raises(ValueError, match=rf"labels hold {bad}, outside \[0, 23\)"):
        fastopd.fused_linear_divergence(hs, ws, hs, ws, labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device-side label check needs CUDA")
def test_out_of_range_labels_fail_on_gpu_without_a_sync(tmp_path):
    """On CUDA the check is a device-side assert (no host sync): the process fails (torch may print its own
    assert text rather than the message). It kills the CUDA context, so it runs in a subprocess, beside the same
    program with valid labels, which succeeds."""
    import subprocess
    import sys

    code = ("import sys, torch, fastopd\n"
            "h = torch.randn(4, 64, device='cuda', dtype=torch.bfloat16, requires_grad=True)\n"
            "w = torch.randn(100, 64, device='cuda', dtype=torch.bfloat16)\n"
            "y = torch.tensor([1, int(sys.argv[1]), 2, 3], device='cuda')\n"
            "loss = fastopd.fused_linear_divergence(h, w, h.detach(), w, y,"
            " hard_label_weight=0.5)\n"
            "loss.backward(); torch.cuda.synchronize()\n")
    ok = subprocess.run([sys.executable, "-c", code, "99"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", code, "100"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode != 0
    assert "labels outside [0, 100)" in bad.stderr or "device-side assert" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("mode", ["chunked", "tiled"])
def test_fp16_reduction_none_keeps_small_upstream_gradients(mode):
    """reduction="none" under a caller's mean (upstream 1e-3 per row): fp16 gradient-GEMM operands flushed every
    |dL/dz u| below 6e-8 (most of a 4000-token row), a 10x larger error than the fp16 floor. The rows are scaled
    by u / max|u| for the GEMMs and the fp32 results by max|u|. The public function upcasts CPU inputs to fp32,
    so the autograd Functions are called here with fp16 CPU tensors, as they run on a GPU."""
    from fastopd.losses.function import DivergenceConfig, FusedLinearDivergenceFunction
    from fastopd.losses.reference import divergence_chunk_
    from fastopd.losses.tiled import tiled_linear_divergence

    if mode == "tiled" and _dispatch.available("divergence_chunk", "triton", "cpu") is not None:
        pytest.skip("Triton cannot run here")
    g = torch.Generator().manual_seed(0)
    n, d, v = 16, 32, 4000
    shapes = (((n, d), 1.0), ((v, d), 0.5), ((n, d), 1.0), ((v, d), 0.5))
    hs, ws, ht, wt = [(torch.randn(*s, generator=g, dtype=torch.float64) * k).half().double() for s, k in shapes]
    upstream = torch.full((n,), 1e-3, dtype=torch.float64)
    upstream[::5] = 3e-4
    cfg = DivergenceConfig(divergence=0, beta=0.5, temperature=1.0, softcap=0.0, soft_weight=1.0, hard_weight=0.0,
                           ignore_index=-100, reduction="none", chunk_rows=8)

    def grads(dtype, tiled):
        h, w = hs.to(dtype).clone().requires_grad_(), ws.to(dtype).clone().requires_grad_()
        args = (h, w, None, ht.to(dtype), wt.to(dtype), None, None, None, cfg)
        loss, _ = tiled_linear_divergence(*args) if tiled else FusedLinearDivergenceFunction.apply(
            *args, divergence_chunk_)
        (loss * upstream.to(loss.dtype)).sum().backward()
        return h.grad.double(), w.grad.double()

    want_h, want_w = grads(torch.float64, False)
    got_h, got_w = grads(torch.float16, mode == "tiled")
    assert float((got_h - want_h).norm() / want_h.norm()) < 5e-4
    assert float((got_w - want_w).norm() / want_w.norm()) < 1.5e-3


def test_fp16_upstream_lift_ignores_non_finite_rows():
    """A NaN or inf upstream gradient spoils its own row only: the lift is the largest finite magnitude."""
    from fastopd.losses.function import lift_upstream

    u = torch.tensor([1e-3, float("nan"), -2e-3, float("inf")])
    scaled, lift = lift_upstream(u, torch.float16)
    assert float(lift) == pytest.approx(2e-3)
    torch.testing.assert_close(scaled[[0, 2]], torch.tensor([0.5, -1.0]))
    assert lift_upstream(u, torch.bfloat16)[1] is None  # bf16 has fp32's exponent range: nothing to lift
