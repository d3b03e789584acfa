"""mode="tiled" end to end against float64 math, the gradient-tile skip, and the absence of any [N, V] tensor.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 with small tiles (16 x 32 x 16), so the odd shapes
below leave partial tiles in every dimension; on a GPU the same cases run natively (test_gpu_shapes.py adds
the published sizes).
"""

from __future__ import annotations

import pytest
import torch
from kernels_ref64 import rkl_dominant_logits, row_divergence64
from torch.utils._python_dispatch import TorchDispatchMode

import fastopd
from fastopd import _dispatch

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"

_UNAVAILABLE = _dispatch.available("divergence_chunk", "triton", DEVICE)
pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy evaluates both sides of tl.where in the interpreter
    pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"Triton cannot run here: {_UNAVAILABLE}"),
]


def _problem(n, ds, dt, v, seed, spread=1.0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, ds, generator=g, dtype=torch.float64) * spread
    ws = torch.randn(v, ds, generator=g, dtype=torch.float64) / ds**0.5
    ht = torch.randn(n, dt, generator=g, dtype=torch.float64) * spread
    wt = torch.randn(v, dt, generator=g, dtype=torch.float64) / dt**0.5
    bs = torch.randn(v, generator=g, dtype=torch.float64) * 0.3 if bias else None
    bt = torch.randn(v, generator=g, dtype=torch.float64) * 0.3 if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[3::7] = -100
    return hs, ws, bs, ht, wt, bt, labels


def _want(hs, ws, bs, ht, wt, bt, labels, upstream, reduction, num_items=None, **opts):
    """float64 loss and gradients w.r.t. h_s, W_s, b_s for the given upstream gradient."""
    xs = hs @ ws.T + (bs if bs is not None else 0)
    xt = ht @ wt.T + (bt if bt is not None else 0)
    rows, stats, dx = row_divergence64(xs, xt, labels, **opts)
    if reduction == "none":
        loss, gx = rows, dx * upstream[:, None]
    else:
        count = num_items if num_items is not None else (
            int((labels != -100).sum()) if labels is not None else hs.shape[0])
        div = 1.0 if reduction == "sum" else float(max(count, 1))
        loss, gx = rows.sum() / div, dx * (upstream / div)
    return loss, stats, gx @ ws, gx.T @ hs, gx.sum(0)


CASES = [
    pytest.param(37, 24, 40, 203, "fkl", {}, "mean", id="N37-Ds24-Dt40-V203-fkl-mean"),
    pytest.param(37, 24, 40, 203, "rkl", {}, "mean", id="N37-Ds24-Dt40-V203-rkl-mean"),
    pytest.param(37, 24, 40, 203, "jsd", {"beta": 0.3}, "mean", id="N37-Ds24-Dt40-V203-jsd0.3-mean"),
    pytest.param(21, 17, 33, 101, "fkl", {"temperature": 1.7, "softcap": 3.0, "hard_weight": 0.4}, "sum",
                 id="N21-Ds17-Dt33-V101-fkl-T1.7-cap3-hard0.4-sum"),
    pytest.param(21, 17, 33, 101, "rkl", {"temperature": 0.6, "hard_weight": 1.0, "soft_weight": 0.5}, "none",
                 id="N21-Ds17-Dt33-V101-rkl-T0.6-hard1-soft0.5-none"),
    pytest.param(21, 17, 33, 101, "jsd", {"beta": 0.8, "softcap": 2.0}, "none",
                 id="N21-Ds17-Dt33-V101-jsd0.8-cap2-none"),
    # The hard-label CE at a temperature of its own, over several vocabulary splits (V=203: 13 tiles of 16).
    pytest.param(37, 24, 40, 203, "fkl", {"temperature": 2.0, "hard_weight": 0.5, "hard_temperature": 1.0}, "mean",
                 id="N37-Ds24-Dt40-V203-fkl-T2-hard0.5-hardT1-mean"),
    pytest.param(21, 17, 33, 101, "jsd", {"beta": 0.4, "temperature": 0.7, "softcap": 3.0, "hard_weight": 1.0,
                                          "hard_temperature": 1.6}, "none",
                 id="N21-Ds17-Dt33-V101-jsd0.4-T0.7-cap3-hard1-hardT1.6-none"),
]


@pytest.mark.parametrize("n,ds,dt,v,div,opts,reduction", CASES)
def test_tiled_matches_float64(n, ds, dt, v, div, opts, reduction):
    hs, ws, bs, ht, wt, bt, labels = _problem(n, ds, dt, v, seed=n + v, bias=reduction != "mean")
    g = torch.Generator().manual_seed(1)
    upstream = torch.rand(n, generator=g, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.3)
    h = hs.float().to(DEVICE).requires_grad_(True)
    w = ws.float().to(DEVICE).requires_grad_(True)
    b = bs.float().to(DEVICE).requires_grad_(True) if bs is not None else None
    kw = {"temperature": opts.get("temperature", 1.0), "softcap": opts.get("softcap"),
          "hard_label_weight": opts.get("hard_weight", 0.0), "soft_label_weight": opts.get("soft_weight", 1.0),
          "beta": opts.get("beta", 0.5), "hard_label_temperature": opts.get("hard_temperature")}
    loss, stats = fastopd.fused_linear_divergence(
        h, w, ht.float().to(DEVICE), wt.float().to(DEVICE), labels.to(DEVICE), divergence=div, reduction=reduction,
        student_bias=b, teacher_bias=bt.float().to(DEVICE) if bt is not None else None, mode="tiled",
        return_stats=True, **kw)
    (loss * upstream.float().to(DEVICE)).sum().backward()
    want = _want(hs, ws, bs, ht, wt, bt, labels, upstream, reduction, divergence=div, **opts)
    torch.testing.assert_close(loss.detach().double().cpu(), want[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(torch.stack(list(stats), -1).double().cpu(), want[1], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(h.grad.double().cpu(), want[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double().cpu(), want[3], rtol=1e-4, atol=1e-5)
    if b is not None:
        torch.testing.assert_close(b.grad.double().cpu(), want[4], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("div,beta", [pytest.param("fkl", 0.5, id="fkl"), pytest.param("jsd", 0.2, id="jsd0.2")])
def test_tiled_dominant_token_precision(div, beta):
    """Logits of |z| ~ 500 (scale 40, temperature 0.5): one token holds all but ~1e-6 of the mass, so log-probs
    and p_s - p_t live near 0 and 1. The error must stay within twice that of a naive fp32 computation."""
    g = torch.Generator().manual_seed(0)
    n, v = 5, 40
    hs = torch.randn(n, 1, generator=g, dtype=torch.float64) * 40
    ws = torch.randn(v, 1, generator=g, dtype=torch.float64)
    ht = torch.randn(n, 1, generator=g, dtype=torch.float64) * 40
    wt = torch.randn(v, 1, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    opts = dict(divergence=div, beta=beta, temperature=0.5)
    h = hs.float().to(DEVICE).requires_grad_(True)
    w = ws.float().to(DEVICE).requires_grad_(True)
    loss = fastopd.fused_linear_divergence(h, w, ht.float().to(DEVICE), wt.float().to(DEVICE), labels.to(DEVICE),
                                           reduction="sum", mode="tiled", **opts)
    loss.backward()
    want = _want(hs, ws, None, ht, wt, None, labels, torch.tensor(1.0), "sum", **opts)
    # A same-dtype baseline: fp32 through the PyTorch reference backend (log_softmax-based, chunked).
    hn, wn = hs.float().requires_grad_(True), ws.float().requires_grad_(True)
    naive = fastopd.fused_linear_divergence(hn, wn, ht.float(), wt.float(), labels, reduction="sum", impl="torch",
                                            **opts)
    naive.backward()
    for got, exact, base in ((loss.detach(), want[0], naive.detach()), (h.grad, want[2], hn.grad),
                             (w.grad, want[3], wn.grad)):
        base = base.double()
        err = float((got.double().cpu() - exact).abs().max())
        assert err <= max(2 * float((base - exact).abs().max()), 1e-6 * float(exact.abs().max()), 1e-12)


def test_tiled_without_labels_and_num_items():
    hs, ws, _, ht, wt, _, _ = _problem(19, 16, 16, 77, seed=4)
    h = hs.float().to(DEVICE).requires_grad_(True)
    w = ws.float().to(DEVICE).requires_grad_(True)
    loss = fastopd.fused_linear_divergence(h, w, ht.float().to(DEVICE), wt.float().to(DEVICE), divergence="jsd",
                                           num_items_in_batch=40, mode="tiled")
    loss.backward()
    want = _want(hs, ws, None, ht, wt, None, None, torch.tensor(1.0), "mean", num_items=40, divergence="jsd")
    torch.testing.assert_close(loss.detach().double().cpu(), want[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(h.grad.double().cpu(), want[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double().cpu(), want[3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 2, 3], ids=lambda s: f"splits{s}")
def test_vocab_splits_agree(splits):
    """Splitting the vocabulary over programs (partial lse combined by logsumexp) changes nothing but rounding;
    V=181 in 32-wide tiles is 6 tiles, so 3 splits of 2 and 2 of 3; with 4 splits the last would be empty."""
    from fastopd.losses.function import DivergenceConfig
    from fastopd.losses.tiled import tiled_linear_divergence

    hs, ws, _, ht, wt, _, labels = _problem(23, 16, 20, 181, seed=9)
    cfg = DivergenceConfig(divergence=2, beta=0.4, temperature=1.0, softcap=0.0, soft_weight=1.0, hard_weight=0.3,
                           ignore_index=-100, reduction="sum", chunk_rows=0)
    h = hs.float().to(DEVICE).requires_grad_(True)
    loss, stats = tiled_linear_divergence(h, ws.float().to(DEVICE), None, ht.float().to(DEVICE),
                                          wt.float().to(DEVICE), None, labels.to(DEVICE), None, cfg, splits=splits)
    loss.backward()
    want = _want(hs, ws, None, ht, wt, None, labels, torch.tensor(1.0), "sum", divergence="jsd", beta=0.4,
                 hard_weight=0.3)
    torch.testing.assert_close(loss.detach().double().cpu(), want[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(stats.double().cpu(), want[1], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(h.grad.double().cpu(), want[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 3], ids=lambda s: f"splits{s}")
def test_tiled_rkl_dominant_token_gradient(splits):
    """rkl of 20..61 with one dominant student token (kernels_ref64.rkl_dominant_logits): its gradient is a
    difference of two numbers of size rkl unless formed relative to lp_s - lp_t at the student's top token. The
    tiled mode finds that token in the lse pass, per tile and across splits: V=301 in the interpreter's 32-wide
    tiles is 10 tiles, 3 splits of 4, 4 and 2; the tops sit in tiles 9, 7, 0 and 4, and row 2's tie (columns 3
    and 200) spans two splits. h = I makes x_s = W_s^T exactly, so grad_W_s[:, r] is dL/dx_s of row r. Budget:
    1e-5, fp32's (formed directly: up to 4e-3)."""
    from fastopd.losses.function import DivergenceConfig
    from fastopd.losses.tiled import tiled_linear_divergence

    xs, xt = rkl_dominant_logits()
    xs, xt = xs.float().double(), xt.float().double()  # the float64 truth of the fp32 inputs
    want = row_divergence64(xs, xt, None, divergence="rkl")
    eye = torch.eye(4, dtype=torch.float32, device=DEVICE)
    w = xs.T.float().to(DEVICE).contiguous().requires_grad_(True)
    cfg = DivergenceConfig(divergence=1, beta=0.5, temperature=1.0, softcap=0.0, soft_weight=1.0, hard_weight=0.0,
                           ignore_index=-100, reduction="none", chunk_rows=0)
    loss, _ = tiled_linear_divergence(eye, w, None, eye, xt.T.float().to(DEVICE).contiguous(), None, None, None,
                                      cfg, skip_threshold=0.0, splits=splits)
    loss.sum().backward()
    torch.testing.assert_close(loss.detach().double().cpu(), want[0], rtol=1e-6, atol=0)
    grad = w.grad.double().cpu().T
    rel = (grad - want[2]).norm(dim=1) / want[2].norm(dim=1)
    assert (rel <= 1e-5).all(), rel


def _grads_with_threshold(threshold, hs, ws, ht, wt, labels, div):
    """Raw launcher call: fp32 gradients (upstream 1 per valid row) and the number of skipped tiles."""
    from fastopd.kernels import tiled as tk

    h_s, w_s, h_t, w_t = (t.float().to(DEVICE).contiguous() for t in (hs, ws, ht, wt))
    lab = labels.to(DEVICE)
    n, v = h_s.shape[0], w_s.shape[0]
    cfg = tk.default_config(n, v, h_s.device, h_s.dtype)
    part, partial_sums = tk.tiled_row_lse(h_s, w_s, None, h_t, w_t, None, lab, temperature=1.0, softcap=0.0,
                                          ignore_index=-100, cfg=cfg)
    rowstats, _, _ = tk.combine_lse(part, partial_sums)
    rowstats = rowstats.contiguous()
    sums = tk.tiled_row_sums(h_s, w_s, None, h_t, w_t, None, rowstats, divergence=div, beta=0.5, temperature=1.0,
                             softcap=0.0, cfg=cfg).sum(0)
    k = sums[0] if div == 1 else sums[1]
    rowinfo = torch.cat([rowstats, torch.stack([k, (lab != -100).float(), torch.zeros_like(k)])]).contiguous()
    gh = torch.zeros_like(h_s)
    gw = torch.zeros_like(w_s)
    skipped = tk.tiled_grad(h_s, w_s, None, h_t, w_t, None, lab, rowinfo, gh, gw, None, divergence=div, beta=0.5,
                            temperature=1.0, softcap=0.0, soft_weight=1.0, hard_weight=0.0, ignore_index=-100,
                            skip_threshold=threshold, cfg=cfg)
    tiles = triton_cdiv(n, cfg.block_n) * triton_cdiv(v, cfg.block_v)
    return gh.double().cpu(), gw.double().cpu(), int(skipped.item()), tiles, cfg


def triton_cdiv(a, b):
    return -(-a // b)


@pytest.mark.parametrize("div", [0, 1, 2], ids=["fkl", "rkl", "jsd"])
def test_skip_threshold_is_harmless(div):
    """Peaked distributions, as trained LMs have (both models put almost no mass on the vocabulary tail, here
    tokens 64.. pushed down by a constant hidden feature), leave most tiles with |dL/dz| < 2^-20: the default
    threshold skips them, the gradients move by less than the bound of the skipped terms and stay as close to
    float64 as with skipping off. A huge threshold skips every tile (gradients 0): the skip path is exercised."""
    from fastopd.losses.tiled import DEFAULT_SKIP_THRESHOLD

    hs, ws, _, ht, wt, _, labels = _problem(40, 16, 16, 257, seed=21, spread=2.0)
    for h, w in ((hs, ws), (ht, wt)):
        h[:, 0] = 1.0
        w[:, 0] = 0.0
        w[64:, 0] = -18.0 + 6.0 * torch.rand(257 - 64, generator=torch.Generator().manual_seed(5), dtype=w.dtype)
    labels[labels >= 64] = 5
    gh0, gw0, skipped0, tiles, cfg = _grads_with_threshold(0.0, hs, ws, ht, wt, labels, div)
    gh1, gw1, skipped1, _, _ = _grads_with_threshold(DEFAULT_SKIP_THRESHOLD, hs, ws, ht, wt, labels, div)
    assert skipped0 == 0
    assert skipped1 >= tiles // 8, f"only {skipped1} of {tiles} tiles skipped: the case does not exercise skipping"
    # Each skipped tile moves a gradient entry by at most block_v * threshold * max|W| (grad_h) or
    # block_n * threshold * max|h| (grad_W), summed over the skipped tiles of that row / column block.
    vblocks = triton_cdiv(257, cfg.block_v)
    nblocks = triton_cdiv(40, cfg.block_n)
    bound_h = vblocks * cfg.block_v * DEFAULT_SKIP_THRESHOLD * float(ws.abs().max())
    bound_w = nblocks * cfg.block_n * DEFAULT_SKIP_THRESHOLD * float(hs.abs().max())
    assert (gh1 - gh0).abs().max() <= bound_h
    assert (gw1 - gw0).abs().max() <= bound_w
    # Against float64: without skipping, fp32 rounding only; with it, an error far below bf16 resolution
    # (2^-8 relative) of the gradient's scale.
    _, _, want_h, want_w, _ = _want(hs, ws, None, ht, wt, None, labels, torch.tensor(1.0), "sum",
                                    divergence=["fkl", "rkl", "jsd"][div])
    torch.testing.assert_close(gh0, want_h, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(gw0, want_w, rtol=1e-4, atol=2e-5)
    for got, want in ((gh1, want_h), (gw1, want_w)):
        rel = float((got - want).abs().max() / want.abs().max())
        assert rel < 2**-8 / 16, f"{skipped1}/{tiles} tiles skipped, relative gradient error {rel:.2e}"
    gh_all, gw_all, skipped_all, _, _ = _grads_with_threshold(float("inf"), hs, ws, ht, wt, labels, div)
    assert skipped_all == tiles and gh_all.abs().max() == 0 and gw_all.abs().max() == 0


@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("nan_rows", ["one-row", "every-row"])
def test_tiled_nan_rows_reach_loss_and_gradients(div, reduction, nan_rows):
    """A NaN in a row's teacher hidden state gives that row a NaN loss and NaN gradients, as the chunked mode
    does, and leaves the other rows alone. The tile skip test counts NaN as large: NaN compares false with any
    threshold and a max drops it (a GPU's, and the interpreter's nanmax), so a tile of NaN rows only ("every-row")
    was skipped and its gradients came back as zeros."""
    hs, ws, _, ht, wt, _, labels = _problem(40, 16, 16, 101, seed=4)
    labels[:] = 1
    bad = torch.zeros(40, dtype=torch.bool)
    bad[2 if nan_rows == "one-row" else slice(None)] = True
    ht[bad, 3] = float("nan")
    for mode in ("tiled", "chunked"):
        h = hs.float().to(DEVICE).requires_grad_(True)
        w = ws.float().to(DEVICE).requires_grad_(True)
        loss = fastopd.fused_linear_divergence(h, w, ht.float().to(DEVICE), wt.float().to(DEVICE),
                                               labels.to(DEVICE), divergence=div, reduction=reduction, mode=mode,
                                               impl="torch" if mode == "chunked" else "auto")
        loss.sum().backward()
        loss, gh, gw = loss.detach().cpu(), h.grad.cpu(), w.grad.cpu()
        if reduction == "none":
            assert torch.isnan(loss[bad]).all() and torch.isfinite(loss[~bad]).all(), (mode, loss)
        else:
            assert torch.isnan(loss), (mode, loss)
        assert torch.isnan(gh[bad]).all() and torch.isfinite(gh[~bad]).all(), mode
        assert torch.isnan(gw).any(), mode


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in bytes) any torch op produces: outputs of every dispatched op, allocations
    included (the interpreter's byte views of kernel arguments show up as uint8 tensors of the argument's size)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.largest:
                self.largest, self.op = t.numel() * t.element_size(), str(func)
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tiled_allocates_nothing_of_size_n_by_v(reduction):
    """By construction: no torch op in forward or backward of mode="tiled" creates a tensor as large as N x V
    fp32 logits (here 48 x 1000 x 4 bytes = 192,000); the largest legitimate ones are W and its fp32 gradient,
    1000 x 8 x 4 = 32,000 bytes. The same probe sees the [C, V] chunk buffers of mode="chunked", so it can fail."""
    n, v, d = 48, 1000, 8
    hs, ws, _, ht, wt, _, labels = _problem(n, d, d, v, seed=2)
    results = {}
    for mode in ("tiled", "chunked"):
        h = hs.float().to(DEVICE).requires_grad_(True)
        w = ws.float().to(DEVICE).requires_grad_(True)
        args = (ht.float().to(DEVICE), wt.float().to(DEVICE), labels.to(DEVICE))
        with _LargestTensor() as probe:
            loss = fastopd.fused_linear_divergence(h, w, *args, divergence="rkl", reduction=reduction, mode=mode,
                                                   chunk_size=n, impl="torch" if mode == "chunked" else "auto")
            loss.sum().backward()
        results[mode] = (probe.largest, probe.op)
    assert results["tiled"][0] <= v * d * 4, f"tiled mode made a tensor of {results['tiled'][0]} bytes ({results})"
    assert results["chunked"][0] >= n * v * 4, f"the probe missed the chunked buffers ({results})"


def test_tiled_rejects_unsupported_device():
    if GPU:
        pytest.skip("the CPU refusal only applies without the interpreter")
    import os

    from fastopd.losses.function import DivergenceConfig
    from fastopd.losses.tiled import tiled_linear_divergence

    cfg = DivergenceConfig(0, 0.5, 1.0, 0.0, 1.0, 0.0, -100, "mean", 0)
    x = torch.zeros(2, 4)
    old = os.environ.pop("TRITON_INTERPRET")
    try:
        with pytest.raises(ValueError, match="CUDA tensors"):
            tiled_linear_divergence(x, torch.zeros(3, 4), None, x, torch.zeros(3, 4), None, None, None, cfg)
    finally:
        os.environ["TRITON_INTERPRET"] = old


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_tiled_empty_batch(reduction):
    """N = 0 (no row block: the launch configuration divided by zero): loss 0 (or []), zero gradients."""
    hs = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    ws = torch.randn(101, 16, device=DEVICE, requires_grad=True)
    loss = fastopd.fused_linear_divergence(hs, ws, torch.zeros(0, 8, device=DEVICE), torch.randn(101, 8, device=DEVICE),
                                           torch.zeros(0, dtype=torch.long, device=DEVICE), reduction=reduction,
                                           hard_label_weight=0.5, mode="tiled")
    assert loss.shape == ((0,) if reduction == "none" else ()) and (loss == 0).all()
    loss.sum().backward()
    assert hs.grad.shape == (0, 16) and (ws.grad == 0).all()
