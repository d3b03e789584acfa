"""pytest-benchmark suite for the fused divergence loss: fastopd beside naive PyTorch, Liger-Kernel, TRL and
the four-GEMM floor, forward + backward, one benchmark group per divergence so the table compares them.

    pytest bench/test_loss_bench.py --benchmark-only --benchmark-group-by=group
    FASTOPD_BENCH_FULL=1 pytest bench/test_loss_bench.py --benchmark-only   # the target shapes

`fastopd bench` runs the same providers (fastopd.bench) in one process and writes bench/results/. pytest-benchmark
times each provider in its own block, so a change in machine load lands on one provider; `fastopd bench` times
them round-robin, and its ratios are the ones to quote. Peak memory above the inputs (None where the CPU
high-water mark could not be reset), the loss's and the gradients' relative differences from naive's (checked
against fastopd.bench's tolerances before the timing), fastopd's resolved backend and the FASTOPD_* environment go
into each benchmark's extra_info.
"""

import os

import pytest
import torch

from fastopd import bench

SHAPE = bench.FULL if os.environ.get("FASTOPD_BENCH_FULL") == "1" else bench.QUICK
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("divergence", ["fkl", "jsd"])
@pytest.mark.parametrize("provider", bench.PROVIDERS)
def test_loss_forward_backward(benchmark, provider, divergence):
    inputs = bench.make_inputs(SHAPE, DEVICE)
    try:
        step = bench.provider_step(provider, divergence, inputs)
    except ImportError as exc:
        pytest.skip(f"{provider} not installed: {exc}")
    peak, grads = bench.memory_run(step, inputs, bench.PeakMemory(DEVICE))
    loss = bench.provider_loss(provider, divergence, inputs)
    ref = bench.reference_loss(divergence, inputs)
    loss_diff = None if loss is None else abs(loss - ref) / abs(ref)
    grad_diff = (None if provider == "gemm_floor"
                 else bench.grad_rel_diff(grads, bench.reference_grads(divergence, inputs)))
    del grads
    benchmark.group = f"loss-{divergence}-N{SHAPE.n}-D{SHAPE.ds}-V{SHAPE.v}"
    benchmark.extra_info.update(provider=provider, divergence=divergence, shape=vars(SHAPE),
                                peak_bytes_above_inputs=peak, loss_rel_diff_vs_naive=loss_diff,
                                grad_rel_diff=grad_diff, machine=bench.machine_info(DEVICE, SHAPE.v))
    assert loss_diff is None or loss_diff <= bench.LOSS_RTOL[SHAPE.dtype], f"{provider}: loss differs {loss_diff}"
    assert grad_diff is None or grad_diff <= bench.GRAD_RTOL[SHAPE.dtype], f"{provider}: gradients differ {grad_diff}"

    def timed():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=5, warmup_rounds=1)


LIGER_RECIPE = dict(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, temperature=2.0)


@pytest.mark.parametrize("provider", ["fastopd-dropin", "liger", "gemm_floor"])
def test_liger_recipe_hard_and_soft(benchmark, provider):
    """Liger's distillation recipe (JSD at temperature 2 plus the hard-label CE at temperature 1, weights 0.5):
    fastopd's drop-in takes it in one fused pass (hard_label_temperature=1), Liger as Liger does."""
    inputs = bench.make_inputs(SHAPE, DEVICE)
    hs, ws, ht, wt, labels = (inputs[k] for k in ("hs", "ws", "ht", "wt", "labels"))
    if provider == "gemm_floor":
        step = bench.provider_step("gemm_floor", "jsd", inputs)
    else:
        if provider == "liger":
            liger = pytest.importorskip("liger_kernel.chunked_loss")
            loss_fn = liger.LigerFusedLinearJSDLoss(compiled=hs.is_cuda, **LIGER_RECIPE)
        else:
            from fastopd.integrations.liger import LigerFusedLinearJSDLoss

            loss_fn = LigerFusedLinearJSDLoss(**LIGER_RECIPE)

        def step():
            loss_fn(hs, ws, ht, wt, labels).backward()
            hs.grad = ws.grad = None

    mem = bench.PeakMemory(DEVICE)
    mem.start()
    step()
    benchmark.group = f"liger-recipe-T2-hard0.5-N{SHAPE.n}-D{SHAPE.ds}-V{SHAPE.v}"
    benchmark.extra_info.update(provider=provider, shape=vars(SHAPE), peak_bytes_above_inputs=mem.peak(),
                                machine=bench.machine_info(DEVICE, SHAPE.v), recipe=LIGER_RECIPE)

    def timed():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=5, warmup_rounds=1)
