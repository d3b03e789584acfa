"""The row kernel of the chunked divergence, every backend against the float64 ground truth (kernels_ref64).

On the CPU the Triton kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) at small odd shapes with small
blocks, so that rows span several blocks and end in a partial one; on a GPU the Triton and CUDA kernels run on
CUDA tensors, and the real-shape cases of tests/kernels/test_gpu_shapes.py add the published sizes.
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_backends import row_kernel
from kernels_ref64 import rkl_dominant_logits, row_divergence64

import fastopd
from fastopd import _dispatch

CODES = {"fkl": 0, "rkl": 1, "jsd": 2}
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


def _backend(name: str):
    return row_kernel(name, DEVICE)


def _run(kernel, xs, xt, labels, *, divergence, beta=0.5, temperature=1.0, softcap=None, soft_weight=1.0,
         hard_weight=0.0, ignore_index=-100, compute_grad=True, hard_temperature=None, **launch):
    c = xs.shape[0]
    xs, xt = xs.clone(), xt.clone()
    loss = torch.full((c,), float("nan"), device=xs.device)
    stats = torch.full((c, 5), float("nan"), device=xs.device)
    ratio = temperature / hard_temperature if hard_temperature else 1.0
    kernel(xs, xt, labels, loss, stats, CODES[divergence], beta, temperature, softcap or 0.0, soft_weight,
           hard_weight, ignore_index, compute_grad, ratio, **launch)
    return loss, stats, xs


def _logits(c, v, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(c, v, generator=g, dtype=torch.float64) * scale
    # The teacher close to the student (a trained pair), plus its own noise.
    xt = xs + torch.randn(c, v, generator=g, dtype=torch.float64) * scale * 0.5
    labels = torch.randint(0, v, (c,), generator=g)
    return xs, xt, labels


def _assert_matches(got, want, what):
    loss, stats, grad = got
    w_loss, w_stats, w_grad = want
    torch.testing.assert_close(loss.double().cpu(), w_loss, rtol=2e-5, atol=2e-5, msg=lambda m: f"{what} loss: {m}")
    torch.testing.assert_close(stats.double().cpu(), w_stats, rtol=2e-5, atol=2e-5, equal_nan=True,
                               msg=lambda m: f"{what} stats: {m}")
    if grad is not None:
        torch.testing.assert_close(grad.double().cpu(), w_grad, rtol=1e-4, atol=2e-6,
                                   msg=lambda m: f"{what} grad: {m}")


# (C, V, block_v, divergence, options): V is never a multiple of the block unless said so.
CASES = [
    pytest.param(5, 301, 64, "fkl", {}, id="C5-V301-B64-fkl"),
    pytest.param(5, 301, 64, "rkl", {}, id="C5-V301-B64-rkl"),
    pytest.param(5, 301, 64, "jsd", {"beta": 0.3}, id="C5-V301-B64-jsd0.3"),
    pytest.param(3, 256, 64, "jsd", {"beta": 0.5}, id="C3-V256-B64-jsd-exact-blocks"),
    pytest.param(4, 37, 64, "fkl", {}, id="C4-V37-B64-fkl-V-below-block"),
    pytest.param(7, 1001, 128, "fkl", {"temperature": 0.7, "softcap": 4.0}, id="C7-V1001-B128-fkl-T0.7-cap4"),
    pytest.param(7, 1001, 128, "rkl", {"temperature": 2.0, "softcap": 4.0}, id="C7-V1001-B128-rkl-T2-cap4"),
    pytest.param(7, 1001, 128, "jsd", {"beta": 0.7, "temperature": 1.5, "softcap": 2.5},
                 id="C7-V1001-B128-jsd0.7-T1.5-cap2.5"),
    pytest.param(6, 515, 128, "fkl", {"hard_weight": 0.5}, id="C6-V515-B128-fkl-hard0.5"),
    pytest.param(6, 515, 128, "rkl", {"hard_weight": 0.25, "soft_weight": 0.5}, id="C6-V515-B128-rkl-hard0.25-soft0.5"),
    pytest.param(6, 515, 128, "jsd", {"hard_weight": 1.0, "soft_weight": 2.0, "temperature": 0.5, "softcap": 3.0},
                 id="C6-V515-B128-jsd-hard1-soft2-T0.5-cap3"),
    pytest.param(6, 515, 128, "fkl", {"hard_weight": 1.0, "soft_weight": 0.0}, id="C6-V515-B128-pure-CE"),
    # The hard-label CE at a temperature of its own (Liger's: the divergence at T, the CE at 1).
    pytest.param(6, 515, 128, "fkl", {"hard_weight": 0.5, "temperature": 2.0, "hard_temperature": 1.0},
                 id="C6-V515-B128-fkl-T2-hardT1"),
    pytest.param(6, 515, 128, "rkl", {"hard_weight": 0.7, "temperature": 0.5, "hard_temperature": 1.3, "softcap": 3.0},
                 id="C6-V515-B128-rkl-T0.5-hardT1.3-cap3"),
    pytest.param(5, 301, 64, "jsd", {"beta": 0.4, "hard_weight": 1.0, "soft_weight": 0.5, "temperature": 3.0,
                                     "hard_temperature": 1.0}, id="C5-V301-B64-jsd0.4-T3-hardT1"),
    pytest.param(6, 515, 128, "fkl", {"hard_weight": 1.0, "soft_weight": 0.0, "temperature": 4.0,
                                      "hard_temperature": 0.5}, id="C6-V515-B128-pure-CE-hardT0.5"),
]

TRITON = ("triton", "vp-triton")  # take block_v
BACKENDS = ["triton", "cuda", "cpu", "torch", "vp-triton", "vp-torch"]

# The interpreter evaluates both sides of tl.where with numpy, which warns on the inf/NaN of the unused side.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c,v,block_v,div,opts", CASES)
def test_matches_float64(backend, c, v, block_v, div, opts):
    kernel = _backend(backend)
    launch = {"block_v": block_v} if backend in TRITON else {}
    xs, xt, labels = _logits(c, v, seed=c * 1000 + v)
    labels[1] = -100  # an ignored row in every case
    want = row_divergence64(xs, xt, labels, divergence=div, **opts)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    got = _run(kernel, dev(xs.float()), dev(xt.float()), dev(labels), divergence=div, **opts, **launch)
    _assert_matches(got, want, f"{backend} {div}")
    assert torch.all(got[2][1] == 0) and torch.all(got[1][1] == 0) and torch.all(got[0][1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div,beta", [pytest.param("fkl", 0.5, id="fkl"), pytest.param("jsd", 0.4, id="jsd0.4")])
def test_masked_teacher_entries(backend, div, beta):
    """-inf teacher logits (vocab the teacher forbids): p_t = 0 there, finite loss and gradient, no NaN."""
    kernel = _backend(backend)
    launch = {"block_v": 64} if backend in TRITON else {}
    xs, xt, labels = _logits(4, 203, seed=7)
    xt[:, 5::9] = float("-inf")
    xt[2, 60:203] = float("-inf")  # whole trailing blocks masked
    labels[0] = 6  # the label itself on a -inf teacher entry: log p_t(y) = -inf in the stats
    want = row_divergence64(xs, xt, labels, divergence=div, beta=beta, hard_weight=0.5)
    got = _run(kernel, xs.float().to(DEVICE), xt.float().to(DEVICE), labels.to(DEVICE), divergence=div, beta=beta,
               hard_weight=0.5, **launch)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[2]).all()
    _assert_matches(got, want, f"{backend} masked-teacher {div}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_student_entries_rkl(backend):
    """-inf student logits: p_s = 0 there, so reverse KL and its gradient stay finite."""
    kernel = _backend(backend)
    launch = {"block_v": 64} if backend in TRITON else {}
    xs, xt, labels = _logits(3, 150, seed=11)
    xs[:, 3::4] = float("-inf")
    labels[:] = 4
    want = row_divergence64(xs, xt, labels, divergence="rkl")
    got = _run(kernel, xs.float().to(DEVICE), xt.float().to(DEVICE), labels.to(DEVICE), divergence="rkl", **launch)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[2]).all()
    _assert_matches(got, want, f"{backend} masked-student rkl")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rkl_dominant_token_gradient(backend):
    """rkl of 20..61 with one dominant student token: its gradient is a difference of two numbers of size rkl,
    which every backend forms relative to lp_s - lp_t at the student's top token (found across blocks, also
    when tied). Formed directly in fp32 the error would be up to 2e-3 of the gradient; 1e-5 is the fp32 budget."""
    kernel = _backend(backend)
    launch = {"block_v": 64} if backend in TRITON else {}
    xs, xt = rkl_dominant_logits()
    xs, xt = xs.float().double(), xt.float().double()  # the float64 truth of the fp32 inputs
    want = row_divergence64(xs, xt, None, divergence="rkl")
    loss, _, grad = _run(kernel, xs.float().to(DEVICE), xt.float().to(DEVICE), None, divergence="rkl", **launch)
    torch.testing.assert_close(loss.double().cpu(), want[0], rtol=1e-6, atol=0)
    rel = (grad.double().cpu() - want[2]).norm(dim=1) / want[2].norm(dim=1)
    assert (rel <= 1e-5).all(), rel


@pytest.mark.parametrize("backend", ["triton", "cuda", "cpu", "vp-triton"])
def test_fkl_dominant_token_gradient(backend):
    """fkl where both models put all but ~1e-8 of the mass on one token: its gradient p_s - p_t is a difference
    of two numbers near 1, which the kernels form as p_t * expm1(lp_s - lp_t). The torch backends take p_s - p_t
    as same-dtype PyTorch does (0 here: both round to 1 in fp32), an absolute error below fp32's ulp of 1."""
    kernel = _backend(backend)
    launch = {"block_v": 64} if backend in TRITON else {}
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(3, 131, generator=g, dtype=torch.float64) - 40.0
    xt = xs + 0.5 * torch.randn(3, 131, generator=g, dtype=torch.float64)
    xs[:, 77], xt[:, 77] = -17.0, -16.0  # the dominant token: e^-23 .. e^-24 of each row's mass elsewhere
    xs[1, 77] = -16.0  # a row where the two agree on it to within the rest of the mass
    xs, xt = xs.float().double(), xt.float().double()
    want = row_divergence64(xs, xt, None, divergence="fkl")
    _, _, grad = _run(kernel, xs.float().to(DEVICE), xt.float().to(DEVICE), None, divergence="fkl", **launch)
    err = (grad.double().cpu() - want[2])[:, 77].abs() / want[2][:, 77].abs()
    assert (err <= 1e-3).all(), err


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
def test_no_labels_and_no_grad(backend, div):
    """labels=None: label stats are 0 and every row counts; compute_grad=False leaves xs untouched."""
    kernel = _backend(backend)
    launch = {"block_v": 64} if backend in TRITON else {}
    xs, xt, _ = _logits(3, 130, seed=3)
    want = row_divergence64(xs, xt, None, divergence=div)
    xs32 = xs.float().to(DEVICE)
    loss, stats, out = _run(kernel, xs32, xt.float().to(DEVICE), None, divergence=div, compute_grad=False, **launch)
    assert torch.equal(out, xs32)
    _assert_matches((loss, stats, None), want, f"{backend} no-labels {div}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
def test_hard_weight_without_labels_adds_nothing(backend, div):
    """No labels, no hard-label term, in the loss and in the gradient alike (the C++ kernel once added
    hard_weight * p_s to the gradient without a label to subtract)."""
    kernel = _backend(backend)
    launch = {"block_v": 64} if backend in TRITON else {}
    xs, xt, _ = _logits(3, 130, seed=9)
    want = row_divergence64(xs, xt, None, divergence=div)
    got = _run(kernel, xs.float().to(DEVICE), xt.float().to(DEVICE), None, divergence=div, hard_weight=0.7,
               hard_temperature=2.0 if div == "rkl" else None, **launch)
    _assert_matches(got, want, f"{backend} no-labels hard {div}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    kernel = _backend(backend)
    launch = {"block_v": 64} if backend in TRITON else {}
    xs, xt, _ = _logits(3, 99, seed=5)
    labels = torch.full((3,), -1, dtype=torch.int64)
    loss, stats, grad = _run(kernel, xs.float().to(DEVICE), xt.float().to(DEVICE), labels.to(DEVICE),
                             divergence="jsd", ignore_index=-1, hard_weight=1.0, **launch)
    assert torch.all(loss == 0) and torch.all(stats == 0) and torch.all(grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
def test_extreme_logits_stay_finite(backend, div):
    """Logits of magnitude 1e4 (a diverged model) and a one-hot teacher: finite loss, stats and gradient."""
    kernel = _backend(backend)
    launch = {"block_v": 64} if backend in TRITON else {}
    xs, xt, labels = _logits(3, 211, seed=13, scale=1.0)
    xs = xs * 1e4
    xt[0] = -1e4
    xt[0, 17] = 1e4
    want = row_divergence64(xs, xt, labels, divergence=div, hard_weight=0.1)
    got = _run(kernel, xs.float().to(DEVICE), xt.float().to(DEVICE), labels.to(DEVICE), divergence=div,
               hard_weight=0.1, **launch)
    for t in got:
        assert torch.isfinite(t).all()
    # Losses here are O(1e4): a relative budget, since the fp32 input logits themselves carry ~1e-3 of rounding.
    torch.testing.assert_close(got[0].double().cpu(), want[0], rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(got[2].double().cpu(), want[2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("side", ["teacher", "student"])
def test_nan_logit_shows_in_its_row(backend, div, side):
    """A NaN logit (an fp16 overflow upstream) makes its row's loss NaN on every backend, as torch's losses do,
    rather than a number: fkl once dropped a NaN teacher row to 0 (p_t > 0 is false for NaN) and the C++ jsd
    turned it into -45 (its log's bit tricks made a number of a NaN). The other rows, and ignored rows, stay
    as they were."""
    kernel = _backend(backend)
    launch = {"block_v": 64} if backend in TRITON else {}
    xs, xt, labels = _logits(4, 150, seed=17)
    want = row_divergence64(xs, xt, labels, divergence=div)
    bad = xt if side == "teacher" else xs
    bad[1, 70] = float("nan")
    bad[3, 5] = float("nan")
    labels[3] = -100  # an ignored row keeps its 0 even with a NaN in it
    loss, _, _ = _run(kernel, xs.float().to(DEVICE), xt.float().to(DEVICE), labels.to(DEVICE), divergence=div,
                      **launch)
    loss = loss.double().cpu()
    assert torch.isnan(loss[1]), loss
    assert loss[3] == 0, loss
    torch.testing.assert_close(loss[[0, 2]], want[0][[0, 2]], rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda", "vp-triton"])
def test_kernels_run_on_the_tensors_device_not_the_current_one(backend):
    """Tensors on cuda:1 while cuda:0 is current: Triton launches on the current device unless told, so the
    launchers make the tensors' device current (the CUDA op has its device guard)."""
    kernel = row_kernel(backend, "cuda")
    xs, xt, labels = _logits(5, 301, seed=23)
    want = row_divergence64(xs, xt, labels, divergence="rkl", hard_weight=0.5)
    with torch.cuda.device(0):
        got = _run(kernel, xs.float().to("cuda:1"), xt.float().to("cuda:1"), labels.to("cuda:1"), divergence="rkl",
                   hard_weight=0.5)
        torch.cuda.synchronize(1)
    _assert_matches(got, want, f"{backend} on cuda:1")


@pytest.mark.skipif(GPU, reason="checks the interpreter launcher with lower-precision inputs on the CPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_half_inputs_upcast(dtype):
    """bf16/fp16 logits are upcast on load: same result as the fp32 kernel on the upcast values."""
    kernel = _backend("triton")
    xs, xt, labels = _logits(3, 141, seed=17)
    xs16, xt16 = xs.to(dtype), xt.to(dtype)
    loss, stats, grad = _run(kernel, xs16, xt16, labels, divergence="jsd", block_v=64)
    want = row_divergence64(xs16.double(), xt16.double(), labels, divergence="jsd")
    torch.testing.assert_close(loss.double(), want[0], rtol=2e-5, atol=2e-5)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), want[2], rtol=1e-2, atol=1e-5)  # bf16/fp16 rounding of the output


def test_triton_launcher_rejects_bad_arguments():
    if _dispatch.available("divergence_chunk", "triton", DEVICE) is not None:
        pytest.skip("triton backend unavailable")
    from fastopd.kernels.divergence import divergence_chunk_

    xs = torch.zeros(2, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"loss must be contiguous float32 \[2\], got \(3,\)"):
        divergence_chunk_(xs, xs.clone(), None, torch.zeros(3, device=DEVICE), torch.zeros(2, 5, device=DEVICE),
                          0, 0.5, 1.0, 0.0, 1.0, 0.0, -100, True)
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence_chunk_(xs, xs.clone(), None, torch.zeros(2, device=DEVICE), torch.zeros(2, 5, device=DEVICE),
                          3, 0.5, 1.0, 0.0, 1.0, 0.0, -100, True)
    with pytest.raises(ValueError, match="int64"):
        divergence_chunk_(xs, xs.clone(), torch.zeros(2, dtype=torch.int32, device=DEVICE),
                          torch.zeros(2, device=DEVICE), torch.zeros(2, 5, device=DEVICE), 0, 0.5, 1.0, 0.0, 1.0,
                          0.0, -100, True)


@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_divergence_impl_triton(div, reduction):
    """The public loss with impl="triton" (interpreter on the CPU) against float64 math end to end."""
    if _dispatch.available("divergence_chunk", "triton", DEVICE) is not None:
        pytest.skip("triton backend unavailable")
    import fastopd

    g = torch.Generator().manual_seed(23)
    n, ds, dt, v = 19, 24, 40, 203
    hs = torch.randn(n, ds, generator=g, dtype=torch.float64)
    ws = torch.randn(v, ds, generator=g, dtype=torch.float64) / ds**0.5
    ht = torch.randn(n, dt, generator=g, dtype=torch.float64)
    wt = torch.randn(v, dt, generator=g, dtype=torch.float64) / dt**0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    upstream = torch.rand(n, generator=g, dtype=torch.float64) + 0.5

    h = hs.float().to(DEVICE).requires_grad_(True)
    w = ws.float().to(DEVICE).requires_grad_(True)
    loss = fastopd.fused_linear_divergence(h, w, ht.float().to(DEVICE), wt.float().to(DEVICE), labels.to(DEVICE),
                                           divergence=div, beta=0.3, temperature=1.3, hard_label_weight=0.2,
                                           reduction=reduction, impl="triton", chunk_size=8)
    if reduction == "none":
        (loss * upstream.float().to(DEVICE)).sum().backward()  # a non-unit upstream gradient per row
    else:
        (loss * 1.7).backward()

    rows, _, _ = row_divergence64(hs @ ws.T, ht @ wt.T, labels, divergence=div, beta=0.3, temperature=1.3,
                                  hard_weight=0.2)
    # dL/dx per row for upstream 1 from float64 autograd; the chain rule to h and W is two float64 GEMMs.
    _, _, dx = row_divergence64(hs @ ws.T, ht @ wt.T, labels, divergence=div, beta=0.3, temperature=1.3,
                                hard_weight=0.2)
    scale = upstream[:, None] if reduction == "none" else torch.full((n, 1), 1.7 / int((labels != -100).sum()),
                                                                       dtype=torch.float64)
    gx = dx * scale
    want_loss = rows if reduction == "none" else rows.sum() / int((labels != -100).sum())
    torch.testing.assert_close(loss.detach().double().cpu(), want_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(h.grad.double().cpu(), gx @ ws, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double().cpu(), gx.T @ hs, rtol=1e-4, atol=1e-5)


def test_interpreter_is_on_for_cpu_runs():
    """Guards the premise of this module on CPU machines: Triton runs on CPU tensors only under the interpreter."""
    if GPU:
        pytest.skip("a GPU is visible: Triton runs natively")
    assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("version, want", [
    pytest.param("2.14.1+cu130", (2, 14, 1), id="local-suffix"), pytest.param("0.8.5.dev20261027", (0, 8, 5), id="dev"),
    pytest.param("3.7.0rc1", (3, 7, 0), id="rc"), pytest.param("3.10", (3, 10), id="two-parts"),
    pytest.param("unknown", (), id="no-number"),
])
def test_release_reads_the_leading_numeric_version(version, want):
    assert _dispatch.release(version) == want


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    pytest.param("3.6.0", "2.4.6", True, id="triton3.6-numpy2.4"),
    pytest.param("3.4.0", "2.5.0", True, id="triton3.4-numpy2.5"),
    pytest.param("3.6.0", "2.3.5", False, id="triton3.6-numpy2.3"),
    pytest.param("3.7.1", "2.4.6", False, id="triton3.7.1-numpy2.4"),
    pytest.param("3.10.0+git1", "2.4.0", False, id="triton3.10-numpy2.4"),
])
def test_interpreter_refused_where_triton_and_numpy_cannot_run_it(monkeypatch, triton_version, numpy_version,
                                                                  broken):
    """Triton <= 3.6's interpreter fails under NumPy >= 2.4 (measured: 3.4 and 3.6 fail, 3.7.1 passes): the
    interpreter backend then says so, and impl="triton" or mode="tiled" on the CPU refuse with that reason instead
    of an InterpreterError from inside a kernel; doctor shows it."""
    import numpy
    triton = pytest.importorskip("triton")

    from fastopd import doctor

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    why = _dispatch.available("divergence_chunk", "triton", "cpu")
    assert (why is not None) is broken
    row = dict(doctor.report())["Triton interpreter"]
    assert row.startswith("missing") is broken
    if broken:
        assert f"Triton {triton_version}'s interpreter fails under NumPy {numpy_version}" in why
        h, w = torch.randn(3, 8), torch.randn(11, 8)
        with pytest.raises(ValueError, match="interpreter fails under NumPy"):
            fastopd.fused_linear_divergence(h, w, h, w, impl="triton")
        with pytest.raises(ValueError, match="mode='tiled' runs Triton kernels .* cannot run on cpu here: Triton"):
            fastopd.fused_linear_divergence(h, w, h, w, mode="tiled")
