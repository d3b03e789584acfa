"""Benchmark of SparseMaskedAdamW against torch.optim.AdamW, measured in one run (CPU; CUDA too where visible).

A stack of LLM-shaped fp32 matrices (~31.5M parameters: 8 of 1024x1024, 4 of 2816x1024, 4 of 1024x2816), fixed
random gradients, random masks at densities 1/5/20/100%. Per optimizer: median step time (and 20/80 percentiles)
and optimizer-state bytes per parameter. Ratios are against torch.optim.AdamW(foreach=True) in the same process.

    flock /tmp/fastopd_bench.lock python -m pytest bench/test_optim_bench.py -q -p no:cacheprovider

writes bench/results/optim_<device>.json and .md (the last test of this file), or with OUT set (the GPU suite)
$OUT/ after every measurement too, so that a run stopped at a deadline keeps what it measured; atomically. On a GPU
the timed function synchronizes, and the backends compared are SparseMaskedAdamW(impl=triton) and its torch
reference.
"""

from __future__ import annotations

import datetime
import json
import os
import platform

import pytest
import torch

import fastopd
from fastopd._io import write_text_atomic
from fastopd.bench import _percentile, cpu_name
from fastopd.optim import SparseMaskedAdamW, masks

SHAPES = [(1024, 1024)] * 8 + [(2816, 1024)] * 4 + [(1024, 2816)] * 4
DENSITIES = (0.01, 0.05, 0.2, 1.0)
ROUNDS = int(os.environ.get("FASTOPD_BENCH_ROUNDS", "7"))
RESULTS: dict[str, dict[str, dict]] = {}  # device -> key -> measurements
HERE = os.path.dirname(os.path.abspath(__file__))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _make_stack(device: str, dtype: torch.dtype) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    params = [(f"layers.{i}.w", torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device, dtype)))
              for i, s in enumerate(SHAPES)]
    for _, p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device, dtype)
    return params


@pytest.fixture(scope="module", params=DEVICES)
def stack(request):
    return _make_stack(request.param, torch.float32)


@pytest.fixture(scope="module", params=DEVICES)
def stack_bf16(request):
    return _make_stack(request.param, torch.bfloat16)


def _timed(opt, device: str):
    if device == "cuda":
        def run():
            opt.step()
            torch.cuda.synchronize()
        return run
    return opt.step


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def _record(key: str, benchmark, opt, numel: int, device: str, **info) -> None:
    data = list(benchmark.stats.stats.data)
    RESULTS.setdefault(device, {})[key] = dict(
        median_s=benchmark.stats.stats.median, p20_s=_percentile(data, 0.2), p80_s=_percentile(data, 0.8),
        rounds=len(data), state_bytes_per_param=_state_bytes(opt) / numel, **info)
    benchmark.extra_info.update(RESULTS[device][key])
    if os.environ.get("OUT"):  # the GPU suite: a deadline may stop the file before its last test
        _write(device, RESULTS[device])


@pytest.mark.parametrize("variant", ["foreach", "fused"])
def test_torch_adamw(benchmark, stack, variant):
    params = [p for _, p in stack]
    device = params[0].device.type
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **{variant: True})
    benchmark.pedantic(_timed(opt, device), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    _record(f"torch-{variant}", benchmark, opt, sum(p.numel() for p in params), device,
            optimizer=f"torch.optim.AdamW({variant})")


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.parametrize("density", DENSITIES, ids=[f"d{d:g}" for d in DENSITIES])
def test_sparse_masked_adamw(benchmark, stack, density, impl):
    """impl "native": the C++ kernel on CPU, Triton on CUDA; "torch": the reference backend."""
    if impl == "torch" and density == 1.0:
        pytest.skip("the torch reference at full density is torch's own ops; the foreach peer covers it")
    device = stack[0][1].device.type
    impl = {"cpu": "cpu", "cuda": "triton"}[device] if impl == "native" else impl
    mask = masks.random(dict(stack), density, generator=torch.Generator().manual_seed(1))
    opt = SparseMaskedAdamW(stack, masks=mask, lr=1e-4, weight_decay=0.01, impl=impl)
    benchmark.pedantic(_timed(opt, device), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    _record(f"sparse-{impl}-d{density:g}", benchmark, opt, sum(p.numel() for _, p in stack), device,
            optimizer=f"SparseMaskedAdamW(impl={impl})", density=density)


def test_bf16_torch_adamw_foreach(benchmark, stack_bf16):
    """torch's AdamW on bf16 parameters (bf16 moments, no master copy): the peer of the bf16 row below."""
    params = [p for _, p in stack_bf16]
    device = params[0].device.type
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=True)
    benchmark.pedantic(_timed(opt, device), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    _record("torch-foreach-bf16", benchmark, opt, sum(p.numel() for p in params), device,
            optimizer="torch.optim.AdamW(foreach), bf16 params")


def test_bf16_sparse_masked_adamw_master(benchmark, stack_bf16):
    """bf16 parameters at 5% density with fp32 masters: index + two moments + master = 16 B per selected value."""
    device = stack_bf16[0][1].device.type
    impl = {"cpu": "cpu", "cuda": "triton"}[device]
    mask = masks.random(dict(stack_bf16), 0.05, generator=torch.Generator().manual_seed(1))
    opt = SparseMaskedAdamW(stack_bf16, masks=mask, lr=1e-4, weight_decay=0.01, impl=impl)
    benchmark.pedantic(_timed(opt, device), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    _record(f"sparse-{impl}-bf16-master-d0.05", benchmark, opt, sum(p.numel() for _, p in stack_bf16), device,
            optimizer=f"SparseMaskedAdamW(impl={impl}), bf16 params + fp32 masters", density=0.05,
            baseline="torch-foreach-bf16")


def test_write_results():
    if not RESULTS:
        pytest.skip("run the whole file to write results")
    for device, results in RESULTS.items():
        _write(device, results)


def _write(device: str, results: dict[str, dict]) -> None:
    for key, r in results.items():  # None while the baseline is not measured yet (results are written as they come)
        base = r.get("baseline", "torch-foreach-bf16" if key == "torch-foreach-bf16" else "torch-foreach")
        r["time_vs_torch_foreach"] = r["median_s"] / results[base]["median_s"] if base in results else None
    numel = sum(a * b for a, b in SHAPES)
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    machine = {"platform": platform.platform(), "processor": name, "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(),
               "loadavg_1_5_15min_at_end": os.getloadavg()}  # the machine is shared: other jobs were running
    versions = {"python": platform.python_version(), "torch": torch.__version__, "fastopd": fastopd.__version__}
    if device == "cuda":
        import triton

        versions.update(cuda=torch.version.cuda, triton=triton.__version__)
    out = {"benchmark": f"SparseMaskedAdamW step vs torch.optim.AdamW, fp32 (and bf16), {device}", "numel": numel,
           "shapes": "8x(1024x1024) + 4x(2816x1024) + 4x(1024x2816)", "machine": machine, "versions": versions,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "flock /tmp/fastopd_bench.lock python -m pytest bench/test_optim_bench.py -q -p no:cacheprovider",
           "results": results}
    out_dir = os.environ.get("OUT", os.path.join(HERE, "results"))  # the GPU suite points OUT at its folder
    os.makedirs(out_dir, exist_ok=True)
    write_text_atomic(os.path.join(out_dir, f"optim_{device}.json"), json.dumps(out, indent=2))
    lines = [f"# SparseMaskedAdamW vs torch.optim.AdamW ({device}, {numel / 1e6:.1f}M params)", "",
             f"{name}, {machine['cpus']} CPU cores, torch {versions['torch']} "
             f"({machine['torch_threads']} threads), {out['date']}, load average at the end "
             f"{machine['loadavg_1_5_15min_at_end'][0]:.1f} (shared machine). Command: `{out['command']}`", "",
             "Ratios are against torch.optim.AdamW(foreach) on parameters of the same dtype (fp32, or bf16).", "",
             "| optimizer | density | step median (ms) | p20-p80 (ms) | vs torch foreach | state B/param |",
             "|---|---|---|---|---|---|"]
    for r in results.values():
        dens = f"{100 * r['density']:g}%" if "density" in r else "100% (dense)"
        ratio = "-" if r["time_vs_torch_foreach"] is None else f"{r['time_vs_torch_foreach']:.3f}x"
        lines.append(f"| {r['optimizer']} | {dens} | {1e3 * r['median_s']:.2f} | {1e3 * r['p20_s']:.2f}-"
                     f"{1e3 * r['p80_s']:.2f} | {ratio} | {r['state_bytes_per_param']:.3f} |")
    write_text_atomic(os.path.join(out_dir, f"optim_{device}.md"), "\n".join(lines) + "\n")
