"""The fused loss under torch.compile: one whole graph (fullgraph=True) in chunked mode on every row-kernel backend
that runs here, equal to eager; the tiled mode compiles with a break around its launches.

The backend dispatch runs at trace time (a constant result), the C++/CUDA and Triton row kernels are custom ops
with fake implementations, and the label range check becomes a device-side assert (a data-dependent branch
cannot be traced). "aot_eager" traces forward and backward through AOTAutograd, as inductor does, without
inductor's code generation; one case runs inductor itself. The GPU variants are in tests/kernels/test_gpu_shapes.py.
"""

from __future__ import annotations

import pytest
import torch

import fastopd
from fastopd import _dispatch

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _impls():
    out = []
    for impl in ("torch", "cpu", "triton"):
        why = _dispatch.available("divergence_chunk", impl, "cpu")
        out.append(pytest.param(impl, id=impl, marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return out


def _inputs(n=7, d=8, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, d, generator=g)
    ws = torch.randn(v, d, generator=g)
    ht = torch.randn(n, d + 3, generator=g)
    wt = torch.randn(v, d + 3, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = -100
    return hs, ws, ht, wt, labels


def _eager_and_compiled(fn, hs, ws, *rest, fullgraph=True, backend="aot_eager"):
    torch._dynamo.reset()
    results = []
    for f in (fn, torch.compile(fn, fullgraph=fullgraph, backend=backend)):
        h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        out = f(h, w, *rest)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        results.append((out, h.grad, w.grad))
    return results


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("case", ["jsd-mean-labels", "rkl-none-stats", "fkl-sum-no-labels"])
def test_fullgraph_equals_eager(impl, case):
    div, reduction, extra = case.split("-", 2)
    hs, ws, ht, wt, labels = _inputs()
    weights = torch.arange(1.0, 8.0)

    def f(h, w, ht, wt, labels):
        out = fastopd.fused_linear_divergence(
            h, w, ht, wt, labels if extra != "no-labels" else None, divergence=div, beta=0.3, temperature=1.5,
            softcap=4.0, hard_label_weight=0.2 if extra != "no-labels" else 0.0, reduction=reduction, impl=impl,
            chunk_size=3, return_stats=extra == "stats")
        if extra == "stats":
            loss, stats = out
            return (loss * weights).sum(), stats.entropy_student
        return out

    (e_out, e_gh, e_gw), (c_out, c_gh, c_gw) = _eager_and_compiled(f, hs, ws, ht, wt, labels)
    for got, want in zip(c_out if isinstance(c_out, tuple) else (c_out,),
                         e_out if isinstance(e_out, tuple) else (e_out,)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c_gh, e_gh, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c_gw, e_gw, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", _impls())
def test_logits_api_fullgraph_equals_eager(impl):
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(5, 29, generator=g), torch.randn(5, 29, generator=g)
    labels = torch.tensor([3, -100, 28, 0, 7])

    def f(zs, _unused, zt, labels):
        return fastopd.divergence(zs, zt, labels, divergence="jsd", beta=0.4, impl=impl)

    (e_out, e_g, _), (c_out, c_g, _) = _eager_and_compiled(f, zs, torch.zeros(1), zt, labels)
    torch.testing.assert_close(c_out, e_out, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c_g, e_g, rtol=1e-6, atol=1e-7)


def test_a_model_step_with_several_losses_is_one_graph():
    """What a trainer compiles: a projection to hidden states, then the module loss and two functional losses (three
    trace-time dispatches, the automatic backend choice among them) in one graph, gradients equal to eager's."""
    hs, ws, ht, wt, labels = _inputs(n=9)
    proj = torch.nn.Linear(8, 8)
    module = fastopd.FusedLinearDivergenceLoss(divergence="fkl", chunk_size=4)

    def step(h, w, ht, wt, labels):
        z = torch.tanh(proj(h))
        return (module(z, w, ht, wt, labels)
                + fastopd.fused_linear_divergence(z, w, ht, wt, divergence="jsd", beta=0.7, reduction="sum")
                + 0.5 * fastopd.divergence(z @ w.T, ht @ wt.T, divergence="rkl"))

    (e_out, e_gh, e_gw), (c_out, c_gh, c_gw) = _eager_and_compiled(step, hs, ws, ht, wt, labels)
    torch.testing.assert_close(c_out, e_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c_gh, e_gh, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c_gw, e_gw, rtol=1e-6, atol=1e-6)


def test_out_of_range_label_still_raises_under_compile():
    """Compiled, the label check is a device-side assert: a RuntimeError naming the labels (eager on the CPU it
    is a ValueError)."""
    hs, ws, ht, wt, labels = _inputs()
    labels[3] = 37
    f = torch.compile(lambda *a: fastopd.fused_linear_divergence(*a, impl="torch"), fullgraph=True,
                      backend="aot_eager")
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=r"labels outside \[0, 37\)"):
        f(hs, ws, ht, wt, labels)


@pytest.mark.skipif(_dispatch.available("divergence_chunk", "cpu", "cpu") is not None,
                    reason="needs the C++ CPU kernel")
def test_inductor_with_the_cpu_kernel():
    hs, ws, ht, wt, labels = _inputs(n=9)

    def f(h, w, ht, wt, labels):
        return fastopd.fused_linear_divergence(h, w, ht, wt, labels, divergence="fkl", impl="cpu")

    (e_out, e_gh, e_gw), (c_out, c_gh, c_gw) = _eager_and_compiled(f, hs, ws, ht, wt, labels, backend="inductor")
    torch.testing.assert_close(c_out, e_out, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c_gh, e_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_gw, e_gw, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(_dispatch.available("divergence_chunk", "triton", "cpu") is not None,
                    reason="needs Triton (under TRITON_INTERPRET=1 on the CPU)")
def test_tiled_mode_compiles_with_a_break_at_its_launches():
    hs, ws, ht, wt, labels = _inputs(n=6, d=16, v=40)

    def f(h, w, ht, wt, labels):
        return fastopd.fused_linear_divergence(h, w, ht, wt, labels, divergence="rkl", mode="tiled")

    (e_out, e_gh, e_gw), (c_out, c_gh, c_gw) = _eager_and_compiled(f, hs, ws, ht, wt, labels, fullgraph=False)
    torch.testing.assert_close(c_out, e_out, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c_gh, e_gh, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c_gw, e_gw, rtol=1e-6, atol=1e-7)


def test_the_trace_time_dispatch_marker_is_the_one_dynamo_reads(tmp_path):
    """_dispatch sets assume_constant_result's marker itself (the decorator imports torch._dynamo): the marker must
    still be what the decorator sets, and importing fastopd must not import Dynamo."""
    import subprocess
    import sys

    def probe():
        return None

    torch.compiler.assume_constant_result(probe)
    assert probe.__dict__ == {"_dynamo_marked_constant": True}
    assert _dispatch._resolve_constant._dynamo_marked_constant is True
    code = "import sys, fastopd; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          check=True).stdout.strip() == "False"


def test_a_bad_fastopd_impl_is_a_value_error_under_compile_too(monkeypatch):
    hs, ws, ht, wt, labels = _inputs()
    monkeypatch.setenv("FASTOPD_IMPL", "bogus")
    torch._dynamo.reset()
    f = torch.compile(lambda *a: fastopd.fused_linear_divergence(*a), fullgraph=False, backend="aot_eager")
    with pytest.raises(ValueError, match="FASTOPD_IMPL must be one of"):
        f(hs, ws, ht, wt, labels)
    torch._dynamo.reset()


@pytest.mark.parametrize("api", ["fused", "logits"])
def test_dynamic_true_fullgraph_equals_eager(api):
    """torch.compile(dynamic=True) passes the float options (temperature, softcap, weights) as symbolic floats and
    the shapes as symbolic ints: the validation must trace them (no math.isfinite, no str() of a shape unless it
    raises). The chunk loop still specializes on the token count."""
    hs, ws, ht, wt, labels = _inputs(n=7)

    def f(h, w, ht, wt, labels):
        if api == "logits":
            return fastopd.divergence(h @ w.T, ht @ wt.T, labels, divergence="jsd", beta=0.4, temperature=1.5,
                                      softcap=4.0, hard_label_weight=0.2, num_items_in_batch=9, impl="torch")
        return fastopd.fused_linear_divergence(h, w, ht, wt, labels, divergence="jsd", beta=0.4, temperature=1.5,
                                               softcap=4.0, hard_label_weight=0.2, num_items_in_batch=9,
                                               impl="torch")

    torch._dynamo.reset()
    results = []
    for fn in (f, torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")):
        h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        out = fn(h, w, ht, wt, labels)
        out.backward()
        results.append((out, h.grad, w.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("traces", [pytest.param(True, id="addmm-out-dtype-in-place"),
                                    pytest.param(False, id="fp32-temporary")])
def test_the_bf16_grad_w_accumulation_traces_on_every_supported_torch(monkeypatch, traces):
    """The chunked mode's bf16/fp16 CUDA path adds G^T h into the fp32 grad_W by addmm(out_dtype=fp32, out=acc).
    torch 2.10-2.12 trace that call through the plain addmm decomposition, which takes out_dtype for beta: the
    GPU compile test (tests/kernels/test_gpu_shapes.py) could not trace there. Dynamo over meta tensors runs the
    same fake-tensor path on the CPU. "fp32-temporary" is what those releases get while compiling; where this
    torch traces the in-place form it is checked as well."""
    from fastopd.losses import function

    if traces and not function._ADDMM_DTYPE_TRACES:
        pytest.skip(f"torch {torch.__version__} cannot trace addmm(out_dtype=) (its compiled form is the other case)")
    monkeypatch.setattr(function, "_ADDMM_DTYPE_TRACES", traces)
    monkeypatch.setattr(function, "_ADDMM_FP32_INTO", True)

    def accumulate(acc, a, b):
        function._addmm_f32_(acc, a, b)
        return acc

    acc = torch.empty(5, 3, device="meta")
    a = torch.empty(5, 7, dtype=torch.bfloat16, device="meta")
    b = torch.empty(7, 3, dtype=torch.bfloat16, device="meta")
    torch._dynamo.reset()
    out = torch.compile(accumulate, backend="aot_eager", fullgraph=True)(acc, a, b)
    assert out.shape == (5, 3) and out.dtype == torch.float32
    assert function._ADDMM_FP32_INTO  # chosen at trace time, not by a refusal caught at run time
