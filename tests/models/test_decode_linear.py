"""fastopd's decode-step linear kernel (csrc/cpu/decode_linear.cpp) against a float64 reference, every ISA variant.

Error budget: fp32, relative to torch's own fp32 product of the same inputs (both against float64), with a floor
for products torch happens to round exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastopd import _dispatch, _ops
from fastopd.models.decode_linear import PanelWeight, decode_linear, pack, pack_panels

needs_kernel = pytest.mark.skipif(not _ops.has_kernel("decode_linear_", "CPU"),
                                  reason="fastopd._C without the decode_linear_ CPU kernel")

# (M, K, N): batch rows past one 8-row tile and short of it, K past and short of the 64-deep blocks, N short of one
# 48-column panel, exactly one, and one column into the next.
SHAPES = [
    pytest.param(1, 1, 1, id="m1-k1-n1"),
    pytest.param(3, 5, 47, id="m3-k5-n47"),
    pytest.param(8, 64, 48, id="m8-k64-n48"),
    pytest.param(9, 65, 49, id="m9-k65-n49"),
    pytest.param(17, 300, 130, id="m17-k300-n130"),
    pytest.param(5, 1030, 97, id="m5-k1030-n97"),
]


def _case(m, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(k, n, generator=g) / k**0.5
    bias = torch.randn(n, generator=g)
    residual = torch.randn(m, n, generator=g)
    return x, w, bias, residual


def _budget(ours: torch.Tensor, torch32: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    err = (ours.double() - ref).abs().max().item()
    floor = 1e-6 * max(1.0, ref.abs().max().item())
    return err, 4 * max((torch32.double() - ref).abs().max().item(), floor)


def _check_all(m, k, n):
    """Every bias/accumulate combination on one shape: [(case, error, budget)]."""
    x, w, bias, residual = _case(m, k, n)
    panels = pack_panels(w)
    x64, w64 = x.double(), w.double()
    results = []
    for with_bias in (False, True):
        for accumulate in (False, True):
            b = bias if with_bias else None
            ref = x64 @ w64 + (bias.double() if with_bias else 0) + (residual.double() if accumulate else 0)
            expect = torch.addmm(bias, x, w) if with_bias else x @ w
            expect = expect + residual if accumulate else expect
            out = residual.clone() if accumulate else torch.full((m, n), float("nan"))
            decode_linear(x, panels, b, out, accumulate=accumulate)
            results.append((f"bias={with_bias} accumulate={accumulate}", *_budget(out, expect, ref)))
    return results


@needs_kernel
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matches_float64_reference_within_torch_fp32_budget(m, k, n):
    for case, err, budget in _check_all(m, k, n):
        assert err <= budget, f"{case}: error {err:.3e} > budget {budget:.3e}"


_VARIANT_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from models.test_decode_linear import _check_all
shapes = {shapes!r}
print(json.dumps([torch.ops.fastopd.decode_linear_isa(), [[m, k, n, _check_all(m, k, n)] for m, k, n in shapes]]))
"""


@needs_kernel
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_narrower_isa_variants_match_the_reference(isa, tmp_path):
    """FASTOPD_DECODE_ISA caps the register tile (read once per process, so in a subprocess): the AVX2 (4 x 24
    half-panel) and portable variants pass the same budget on every shape."""
    if isa == "avx2" and torch.ops.fastopd.decode_linear_isa() == "baseline":
        pytest.skip("this CPU has no AVX2")
    shapes = [tuple(p.values) for p in SHAPES]
    script = _VARIANT_SCRIPT.format(tests=os.path.dirname(os.path.dirname(__file__)), shapes=shapes)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FASTOPD_DECODE_ISA": isa}, cwd=tmp_path)  # not the root
    assert proc.returncode == 0, proc.stderr
    ran, results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ran == isa
    for m, k, n, cases in results:
        for case, err, budget in cases:
            assert err <= budget, f"{isa} m={m} k={k} n={n} {case}: error {err:.3e} > budget {budget:.3e}"


@needs_kernel
def test_strided_rows_and_threads_give_the_same_bits():
    """x may be a row-strided view (the decode step passes the gate half of gate|up); the result does not depend
    on how many threads split the panels."""
    x_wide = torch.randn(6, 2 * 200)
    x = x_wide[:, :200]
    w = torch.randn(200, 4100) / 200**0.5
    panels = pack_panels(w)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_linear(x, panels)
        torch.set_num_threads(2)
        two = decode_linear(x, panels)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)
    assert torch.equal(one, decode_linear(x.contiguous(), panels))
    assert torch.equal(one, decode_linear(x_wide.t().contiguous().t()[:, :200], panels))  # column stride 6: copied
    torch.testing.assert_close(one, x @ w, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_bad_arguments_name_the_problem():
    x, w, bias, _ = _case(4, 10, 50)
    panels = pack_panels(w).panels
    op = torch.ops.fastopd.decode_linear_
    with pytest.raises(RuntimeError, match="out has 3 rows, x 4"):
        op(torch.empty(3, 50), x, panels, None, False)
    with pytest.raises(RuntimeError, match="cannot hold N = 97"):
        op(torch.empty(4, 97), x, panels, None, False)
    with pytest.raises(RuntimeError, match="float32"):
        op(torch.empty(4, 50), x.double(), panels, None, False)
    with pytest.raises(RuntimeError, match=r"bias must be contiguous float32 \[N = 50\]"):
        op(torch.empty(4, 50), x, panels, bias[:49], False)
    with pytest.raises(RuntimeError, match="panels must be contiguous"):
        op(torch.empty(4, 50), x[:, :9], panels, None, False)
    square = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="must not overlap"):
        op(square, square, pack_panels(torch.randn(10, 10)).panels, None, True)


@needs_kernel
def test_opcheck_schema_and_fake():
    x, w, bias, residual = _case(3, 20, 60)
    torch.library.opcheck(torch.ops.fastopd.decode_linear_, (residual.clone(), x, pack_panels(w).panels, bias, True))


def test_pack_follows_the_dispatch(monkeypatch):
    """fp32 CPU weights get panels when the cpu backend is usable; FASTOPD_IMPL=torch, other dtypes and a missing
    kernel keep the transposed tensor, and both layouts compute the same product."""
    w = torch.randn(33, 70)
    x = torch.randn(5, 33)
    packed = pack(w)
    if _dispatch.available("decode_linear", "cpu", "cpu") is None:
        assert isinstance(packed, PanelWeight) and packed.out_features == 70 and packed.panels.shape == (2, 33, 48)
        assert torch.equal(packed.panels[1, :, 22:], torch.zeros(33, 26))  # zero padding past N
    else:
        assert isinstance(packed, torch.Tensor)
    monkeypatch.setenv("FASTOPD_IMPL", "torch")
    plain = pack(w)
    assert isinstance(plain, torch.Tensor) and plain.is_contiguous() and torch.equal(plain, w)
    torch.testing.assert_close(decode_linear(x, packed), decode_linear(x, plain), rtol=1e-5, atol=1e-5)
    monkeypatch.delenv("FASTOPD_IMPL")
    assert isinstance(pack(w.bfloat16()), torch.Tensor)
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        decode_linear(x, plain, accumulate=True)
