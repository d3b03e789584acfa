"""fastopd.integrations.liger.LigerFusedLinearJSDLoss gives Liger's values and gradients, with Liger's arguments."""

import pytest
import torch

from fastopd.integrations.liger import LigerFusedLinearJSDLoss

liger = pytest.importorskip("liger_kernel.chunked_loss")

CASES = [
    # (N, V, Ds, Dt, weight_hard, weight_soft, beta, temperature, bias, ignore_frac)
    pytest.param(37, 101, 24, 40, 0.5, 0.5, 0.5, 1.0, False, 0.3, id="N37-V101-jsd-T1"),
    pytest.param(37, 101, 24, 40, 0.5, 0.5, 0.5, 2.0, True, 0.3, id="N37-V101-jsd-T2-bias"),
    pytest.param(19, 77, 16, 16, 0.0, 1.0, 0.0, 1.0, False, 0.0, id="N19-V77-fkl-soft-only"),
    pytest.param(19, 77, 16, 16, 0.3, 0.7, 1.0, 0.7, False, 0.5, id="N19-V77-rkl-T0.7"),
    pytest.param(64, 130, 32, 8, 1.0, 0.0, 0.25, 3.0, True, 0.2, id="N64-V130-hard-only-T3"),
]


def _inputs(n, v, ds, dt, bias, ignore_frac, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, ds, generator=g)
    ws = torch.randn(v, ds, generator=g) / ds**0.5
    ht = torch.randn(n, dt, generator=g)
    wt = torch.randn(v, dt, generator=g) / dt**0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    bs = torch.randn(v, generator=g) * 0.1 if bias else None
    bt = torch.randn(v, generator=g) * 0.1 if bias else None
    return hs, ws, ht, wt, labels, bs, bt


def _run(loss_fn, hs, ws, ht, wt, labels, bs, bt, upstream=1.7):
    hs = hs.clone().requires_grad_()
    ws = ws.clone().requires_grad_()
    bs = bs.clone().requires_grad_() if bs is not None else None
    out = loss_fn(hs, ws, ht, wt, labels, bs, bt)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * upstream).backward()
    grads = [hs.grad, ws.grad] + ([bs.grad] if bs is not None else [])
    return out, grads


@pytest.mark.parametrize("n,v,ds,dt,wh,wsf,beta,temp,bias,ignore", CASES)
def test_matches_liger_values_and_grads(n, v, ds, dt, wh, wsf, beta, temp, bias, ignore):
    inputs = _inputs(n, v, ds, dt, bias, ignore)
    ref_fn = liger.LigerFusedLinearJSDLoss(wh, wsf, beta, -100, temp, compiled=False, return_soft_hard_loss=True)
    ours_fn = LigerFusedLinearJSDLoss(wh, wsf, beta, -100, temp, False, return_soft_hard_loss=True)  # Liger's order
    (ref_loss, ref_soft, ref_hard), ref_grads = _run(ref_fn, *inputs)
    (loss, soft, hard), grads = _run(ours_fn, *inputs)
    torch.testing.assert_close(loss, ref_loss.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(soft, ref_soft.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hard, ref_hard.float(), rtol=1e-5, atol=1e-6)
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_default_options_match_liger_defaults_and_accept_3d():
    hs, ws, ht, wt, labels, _, _ = _inputs(24, 50, 12, 20, False, 0.25, seed=3)
    ref = liger.LigerFusedLinearJSDLoss(compiled=False)(hs, ws, ht, wt, labels)
    ours = LigerFusedLinearJSDLoss()(hs, ws, ht, wt, labels)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-6)
    ours_3d = LigerFusedLinearJSDLoss()(hs.view(4, 6, 12), ws, ht.view(4, 6, 20), wt, labels.view(4, 6))
    torch.testing.assert_close(ours_3d, ours, rtol=1e-6, atol=0)


def test_all_ignored_gives_zero_not_nan():
    hs, ws, ht, wt, labels, _, _ = _inputs(8, 30, 8, 8, False, 0.0)
    labels[:] = -100
    hs.requires_grad_()
    loss = LigerFusedLinearJSDLoss(temperature=2.0)(hs, ws, ht, wt, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hs.grad == 0)
