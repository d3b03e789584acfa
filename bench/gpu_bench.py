"""GPU benchmark of the fused divergence at the published shapes: fastopd (chunked with the Triton and the CUDA
row kernel, tiled) beside naive PyTorch, Liger-Kernel and the cuBLAS GEMM floor, all in one process on one GPU.

    python bench/gpu_bench.py                      # full grid, results to $OUT or bench/results/
    python bench/gpu_bench.py --tokens 1024 --vocab 128256 --providers chunked-triton liger
    python bench/gpu_bench.py --dry-run            # CPU: tiny shapes, checks the harness end to end

Per (divergence, V, N, provider): forward, backward and forward+backward time (median and 20/80 percentiles
of at least --min-reps calls timed with CUDA events, L2 flushed before each), TFLOP/s of the loss's GEMM work,
peak memory above the inputs (forward, and forward+backward; the inputs' gradients count), the ratios to the
GEMM floor (the four cuBLAS GEMMs an exact loss needs, input-dtype operands with fp32 output as fastopd computes
them: both heads forward, dH and dW backward), to Liger and to naive, the loss's relative difference from an fp32
reference on the same inputs (flagged above the dtype's tolerance), and the targets each row meets. Writes
gpu_bench.json and gpu_bench.md after every row ("complete": false until the grid is done). bf16 inputs;
teacher hidden 4096, student hidden 2048. Shapes run both vocabularies at the largest and smallest N first;
within a shape the GEMM floor and Liger run first; --provider-cap and --shape-cap bound each provider's and each
shape's time ('capped' in the results).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Within a shape the references run first (a shape cut short keeps its floor and Liger rows), then fastopd's
# chunked providers, naive (whose peak memory the tiled target needs), and tiled last: the slowest, and the one
# a shape's time cap is most likely to cut.
PROVIDERS = ("gemm_floor", "liger", "chunked-triton", "chunked-cuda", "naive", "tiled")
BETA = {"fkl": 0.0, "rkl": 1.0, "jsd": 0.5}  # Liger/TRL convention: beta 0 is forward KL, 1 reverse KL


def flops(n: int, v: int, ds: int, dt: int) -> dict[str, float]:
    """GEMM flops of an exact loss: forward both heads, backward dH and dW of the student."""
    fwd = 2.0 * n * v * (ds + dt)
    bwd = 2.0 * 2.0 * n * v * ds
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}


def make_inputs(n: int, v: int, ds: int, dt: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)  # on the GPU: V x D weights take seconds on a CPU

    def rnd(*size, scale):
        return (torch.randn(*size, generator=g, device=device) * scale).to(dtype=dtype)

    inp = dict(hs=rnd(n, ds, scale=1.0), ws=rnd(v, ds, scale=2 * ds**-0.5), ht=rnd(n, dt, scale=1.0),
               wt=rnd(v, dt, scale=2 * dt**-0.5))
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    labels[::10] = -100
    inp["labels"] = labels
    inp["hs"].requires_grad_(True)
    inp["ws"].requires_grad_(True)
    return inp


def _naive(hs, ws, ht, wt, labels, beta):
    from fastopd.bench import _naive_loss  # fp32 log-softmax of each row, Liger/TRL's beta convention

    return _naive_loss(hs @ ws.T, ht @ wt.T, labels, beta)


REFERENCE_ROWS = 1024  # rows per chunk of the reference loss: [1024, V] fp32 temporaries, a few GiB at V = 151936


def reference_loss(divergence: str, inp: dict, rows: int = REFERENCE_ROWS) -> float:
    """The loss every provider should compute on `inp`, in fp32 from fp32 logits of the inputs (bf16 operands,
    fp32 output: no rounding of the logits to the input dtype), a chunk of `rows` rows at a time and without
    autograd, so that it needs no [N, V] tensor and exists even where naive does not fit: `fastopd bench`'s
    reference with fastopd's fp32-output GEMM."""
    from fastopd import bench

    return bench.reference_loss(divergence, inp, rows=rows, logits=_logits_f32)


def _logits_f32(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h @ w^T with fp32 output and accumulation (cuBLAS `out_dtype` for bf16/fp16 on CUDA): fastopd's own GEMM."""
    from fastopd.losses.function import _matmul_f32

    return _matmul_f32(h, w.t())


def loss_fn(provider: str, divergence: str, inp: dict, chunk_size: int | None = None) -> Callable[[], torch.Tensor]:
    """A closure computing the loss (with autograd) of `provider`; raises ImportError / ValueError if unusable."""
    import fastopd

    hs, ws, ht, wt, labels = (inp[k] for k in ("hs", "ws", "ht", "wt", "labels"))
    beta = BETA[divergence]
    fdiv, fbeta = ("jsd", beta) if divergence == "jsd" else (divergence, 0.5)
    if provider.startswith("chunked-") or provider == "chunked-cpu":
        impl = provider.split("-", 1)[1]
        from fastopd import _dispatch

        _dispatch.resolve("divergence_chunk", impl, hs.device)  # raises ValueError when the backend is missing
        return lambda: fastopd.fused_linear_divergence(hs, ws, ht, wt, labels, divergence=fdiv, beta=fbeta, impl=impl,
                                                       chunk_size=chunk_size)
    if provider == "tiled":
        return lambda: fastopd.fused_linear_divergence(hs, ws, ht, wt, labels, divergence=fdiv, beta=fbeta,
                                                       mode="tiled")
    if provider == "naive":
        return lambda: _naive(hs, ws, ht, wt, labels, beta)
    if provider == "liger":
        from fastopd.bench import _liger_loss

        fn = _liger_loss(beta, compiled=hs.is_cuda)
        return lambda: fn(hs, ws, ht, wt, labels)
    raise ValueError(f"unknown provider {provider!r}")


def _quantiles(times_ms: list[float]) -> dict:
    """Median and 20th/80th percentiles, linearly interpolated (as fastopd bench and triton.testing.do_bench)."""
    from fastopd.bench import _percentile

    return {"median_ms": statistics.median(times_ms), "p20_ms": _percentile(times_ms, 0.2),
            "p80_ms": _percentile(times_ms, 0.8)}


class Timer:
    """Times one phase: one warm-up call (also the per-call estimate), then enough timed calls to fill
    `target_s`, at least `min_reps` and at most `max_reps`, but never more than fit in the phase's budget
    (fewer than `min_reps` is recorded as "capped"). On the GPU each call is timed with CUDA events, with
    the L2 cache flushed (a 256 MiB write) and the gradients cleared before it, outside the timed region;
    on the CPU (dry runs) with perf_counter."""

    def __init__(self, device: str, min_reps: int = 10, max_reps: int = 100, target_s: float = 0.3):
        self.device, self.min_reps, self.max_reps, self.target_s = device, min_reps, max_reps, target_s
        self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda") if device == "cuda" else None

    def reps_for(self, call_s: float, budget_s: float) -> int:
        """Timed calls for a phase whose warm-up call took `call_s`, with `budget_s` left after it."""
        call_s = max(call_s, 1e-6)
        want = min(self.max_reps, max(self.min_reps, math.ceil(self.target_s / call_s)))
        return max(0, min(want, int(budget_s / call_s)))

    def __call__(self, fn: Callable[[], object], budget_s: float, grad_to_none: list[torch.Tensor] = ()) -> dict:
        _sync(self.device)  # work queued before (the bwd phase's forward) must not count as the warm-up call's
        t0 = time.perf_counter()
        self._clear(grad_to_none)
        fn()
        _sync(self.device)
        call_s = time.perf_counter() - t0
        reps = self.reps_for(call_s, budget_s - call_s)
        out = {"reps": reps, "warmup_ms": call_s * 1e3}
        if reps < self.min_reps:
            out["capped"] = True
        if reps == 0:
            return out
        if self.device == "cuda":
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for start, end in events:
                self._clear(grad_to_none)
                self._flush.zero_()
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            times = [start.elapsed_time(end) for start, end in events]
        else:
            times = []
            for _ in range(reps):
                self._clear(grad_to_none)
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        out.update(_quantiles(times))
        return out

    @staticmethod
    def _clear(tensors) -> None:
        for t in tensors:
            t.grad = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_peak(device: str, fn: Callable[[], object]) -> tuple[object, int | None]:
    """(fn(), peak bytes allocated above what was allocated before it): the peak counter is reset after the
    inputs exist, so the number is what the call adds. None on the CPU. The caller drops the result as soon
    as it has read it, so that no autograd graph outlives its measurement."""
    if device != "cuda":
        return fn(), None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return result, int(torch.cuda.max_memory_allocated() - base)


def bench_provider(provider: str, divergence: str, inp: dict, timer: Timer, device: str, budget_s: float,
                   chunk_size: int | None = None) -> dict:
    """Peak memory of the forward and of forward+backward (one cold call each, which also warm up), then the
    three timed phases within `budget_s` seconds of timed work; phases that got fewer than the timer's minimum
    repetitions are listed under "capped"."""
    hs, ws = inp["hs"], inp["ws"]
    grads = [hs, ws]
    out: dict = {}
    Timer._clear(grads)
    t0 = time.perf_counter()
    if provider == "gemm_floor":
        from fastopd.losses.function import _matmul_f32

        # The GEMMs of the chunked loss at whole-batch size, in its precision: input-dtype operands, fp32
        # output (the logits an exact loss needs; the gradients it accumulates), through fastopd's own call.
        # G, the logit gradient, is an input in the operands' dtype, as the chunked loss feeds it to cuBLAS.
        h, w, ht, wt = hs.detach(), ws.detach(), inp["ht"], inp["wt"]
        g = torch.randn(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype)
        fwd = lambda: (_logits_f32(ht, wt), _logits_f32(h, w))  # noqa: E731
        bwd = lambda: (_matmul_f32(g, w), _matmul_f32(g.t(), h))  # noqa: E731
        full = lambda: (fwd(), bwd())  # noqa: E731
        out["peak_fwd_bytes_above_inputs"] = measure_peak(device, lambda: _discard(fwd()))[1]
        out["peak_bytes_above_inputs"] = measure_peak(device, lambda: _discard(full()))[1]
    else:
        f = loss_fn(provider, divergence, inp, chunk_size)
        y, out["peak_fwd_bytes_above_inputs"] = measure_peak(device, f)
        out["loss"] = float(y.detach())
        del y  # the forward's graph (naive JSD at 8192 x 151936: ~32 GiB) must not outlive its measurement
        Timer._clear(grads)
        full = lambda: f().backward()  # noqa: E731
        out["peak_bytes_above_inputs"] = measure_peak(device, full)[1]
        Timer._clear(grads)
        fwd = f
        y = None
        bwd = lambda: y.backward(retain_graph=True)  # noqa: E731  (y: the graph made just before the bwd phase)
    out["first_calls_s"] = time.perf_counter() - t0  # the two cold calls, compiles included
    start = time.monotonic()
    for name, fn, share in (("full", full, 0.6), ("fwd", fwd, 0.5), ("bwd", bwd, 1.0)):
        # fwd+bwd, the column every comparison uses, first; each phase gets `share` of the cap still left, so a
        # slow provider (tiled) cannot spend more than the cap on its timed calls
        if name == "bwd" and provider != "gemm_floor":
            y = f()
        out[name] = timer(fn, (budget_s - (time.monotonic() - start)) * share, grads)
        y = None  # frees the graph the bwd phase retained
        Timer._clear(grads)
    capped = [name for name in ("full", "fwd", "bwd") if out[name].get("capped")]
    if capped:
        out["capped"] = capped
    return out


def _discard(_outputs) -> None:
    return None


def commit() -> str:
    """The commit measured: $FASTOPD_COMMIT (the suite sets it; .git may not travel to a GPU machine), else
    `git rev-parse HEAD` of this checkout, else "unknown"."""
    if os.environ.get("FASTOPD_COMMIT"):
        return os.environ["FASTOPD_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() if head.returncode == 0 and head.stdout.strip() else "unknown"


def machine(device: str) -> dict:
    info = {"date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "host": platform.node(), "cpu_count": os.cpu_count(), "device": device}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
    for mod in ("fastopd", "triton", "liger_kernel"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod.replace("_", "-"))
        except Exception as exc:  # noqa: BLE001 - report what is there
            info[mod] = f"unavailable ({type(exc).__name__})"
    return info


def shape_order(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(divergence, V, N) in the order they run: the largest N, then the smallest, then the others from large to
    small; within one N every divergence, and within a divergence every vocabulary. So both vocabularies come
    in the first two shapes, and a time-boxed run gets the extremes of N at both before anything else."""
    ns = sorted(set(args.tokens))
    n_order = [ns[-1]] + ns[:1] * (len(ns) > 1) + ns[-2:0:-1]
    return [(d, v, n) for n in n_order for d in args.divergences for v in args.vocab]


MIN_SHAPE_S = 20.0  # with --time-budget, no shape starts with less than this left


def run(args: argparse.Namespace, on_row: Callable[[dict], None] | None = None) -> dict:
    """Benchmarks the grid; `on_row(partial_result)` after each row (the caller writes it, so a run killed at its
    time limit keeps what it measured). Each provider's timed phases get at most `args.provider_cap` seconds and
    each shape `args.shape_cap`; with `args.time_budget` no shape starts once less than MIN_SHAPE_S of it is left,
    and no provider after it is spent: their rows say "skipped: ..."."""
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device visible (use --dry-run to check the harness on the CPU)")
    dtype = getattr(torch, args.dtype)
    timer = Timer(device, args.min_reps, args.max_reps, args.target_ms / 1e3)
    rows = []
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config["env"] = {k: os.environ.get(k) for k in ("FASTOPD_CHUNK_BYTES", "FASTOPD_TILED_SKIP", "FASTOPD_IMPL")}
    config["gemm_floor"] = GEMM_FLOOR
    plan = shape_order(args)
    # "complete" turns True only when every shape of the plan was reached: a file written by a run killed at its
    # limit says it is partial (its rows are what was measured, the shapes after them were never started).
    result = {"machine": machine(device), "dry_run": args.dry_run, "config": config, "complete": False,
              "planned_rows": len(plan) * len(args.providers), "results": rows}
    if device == "cuda":
        _warm_up_cublas(dtype)
    start = time.monotonic()
    budget_left = lambda: (math.inf if args.time_budget is None  # noqa: E731
                           else args.time_budget - (time.monotonic() - start))
    for divergence, v, n in plan:
        head = {"divergence": divergence, "V": v, "N": n, "Ds": args.ds, "Dt": args.dt, "dtype": args.dtype}
        if args.time_budget is not None and (budget_left() <= 0 or budget_left() < min(MIN_SHAPE_S,
                                                                                    args.time_budget)):
            rows += [dict(head, provider=p, status="skipped: time budget") for p in args.providers]
            continue
        shape_start = time.monotonic()
        fl = flops(n, v, args.ds, args.dt)
        inp = make_inputs(n, v, args.ds, args.dt, device, dtype)
        ref = _reference_or_none(divergence, inp, device)
        for provider in args.providers:
            rec = dict(head, provider=provider, reference_loss=ref)
            cap = min(args.provider_cap, args.shape_cap - (time.monotonic() - shape_start), budget_left())
            if cap <= 0:
                rec["status"] = "skipped: " + ("time budget" if budget_left() <= 0 else "shape time cap")
                rows.append(rec)
                continue
            try:
                rec.update(bench_provider(provider, divergence, inp, timer, device, cap, args.chunk_size))
                rec["tflops"] = {k: fl[k] / (rec[k]["median_ms"] * 1e-3) / 1e12 for k in ("fwd", "bwd", "full")
                                 if "median_ms" in rec[k]}
                rec["status"] = "ok"
            except (ImportError, ValueError) as exc:
                rec["status"] = f"unavailable: {exc}"
            except torch.cuda.OutOfMemoryError:
                rec["status"] = "out of memory"
            except Exception as exc:  # noqa: BLE001 - one broken provider must not lose the others
                rec["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            rows.append(rec)
            annotate(rows)
            print(_line(rec), flush=True)
            if on_row is not None:
                on_row(result)
        del inp
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    annotate(rows)
    result["complete"] = True
    return result


GEMM_FLOOR = ("cuBLAS through fastopd's _matmul_f32, input-dtype operands, fp32 output: h_t W_t^T and h_s W_s^T "
              "[N, V], G W_s [N, Ds] and G^T h_s [V, Ds], G [N, V] in the input dtype")


def _warm_up_cublas(dtype: torch.dtype) -> None:
    """One small GEMM of each kind the providers run, so that cuBLAS creates its handles and workspaces (which the
    caching allocator holds from then on) before the first peak-memory measurement rather than inside it."""
    from fastopd.losses.function import _matmul_f32

    a = torch.ones(64, 64, device="cuda", dtype=dtype)
    torch.mm(a, a)
    try:  # a torch without fp32-output GEMMs fails here and, row by row, in the providers that need them
        _matmul_f32(a, a.t())
    except RuntimeError:
        pass
    torch.cuda.synchronize()


def _reference_or_none(divergence: str, inp: dict, device: str) -> float | None:
    """reference_loss, or None where it cannot be computed (out of memory, say): the rows then carry no loss check,
    and the benchmark goes on."""
    try:
        return reference_loss(divergence, inp)
    except Exception as exc:  # noqa: BLE001 - a missing check must not cost the measurements
        print(f"gpu_bench: no reference loss ({type(exc).__name__}: {str(exc)[:200]}); losses not checked", flush=True)
        return None
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


# The targets (docs/gpu.md), judged per row from measured values only: True met, False not met; a target whose
# reference row (floor, Liger, naive) was not measured at that shape is left out.
TARGETS = {
    "floor_1.3x": "chunked fwd+bwd <= 1.3x the GEMM floor",
    "liger_1.5x_faster": "chunked >= 1.5x faster than Liger (fwd+bwd)",
    "tiled_mem_1pct_naive": "tiled peak memory < 1% of naive's",
    "mem_le_liger": "fastopd peak memory <= Liger's",
}


def _full_ms(rec: dict | None) -> float | None:
    if not rec or rec.get("status") != "ok":
        return None
    return rec.get("full", {}).get("median_ms")


def _peak(rec: dict | None) -> int | None:
    return rec.get("peak_bytes_above_inputs") if rec and rec.get("status") == "ok" else None


def annotate(rows: list[dict]) -> None:
    """Adds, per measured row, the ratios to the rows of the same shape (time to the GEMM floor and to Liger,
    peak memory to naive and to Liger) and the targets it is judged by. Recomputed from scratch each time, so a
    shape cut short keeps the ratios of what it measured. A row's loss is checked against the shape's fp32 reference
    within fastopd.bench.LOSS_RTOL of its dtype (naive and Liger round their logits to the input dtype first)."""
    from fastopd.bench import LOSS_RTOL

    shapes: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        shapes.setdefault((r["divergence"], r["V"], r["N"]), {})[r["provider"]] = r
    keys = ("ratio_to_gemm_floor", "speedup_vs_liger", "memory_vs_liger", "memory_vs_naive", "targets",
            "loss_rel_diff", "loss_ok")
    for per in shapes.values():
        floor_ms, liger_ms = _full_ms(per.get("gemm_floor")), _full_ms(per.get("liger"))
        liger_mem, naive_mem = _peak(per.get("liger")), _peak(per.get("naive"))
        for provider, rec in per.items():
            for k in keys:
                rec.pop(k, None)
            if rec.get("status") != "ok":
                continue
            ms, mem = _full_ms(rec), _peak(rec)
            ref, loss = rec.get("reference_loss"), rec.get("loss")
            if ref is not None and loss is not None:
                rec["loss_rel_diff"] = abs(loss - ref) / max(abs(ref), 1e-30)
                # `<=`, which a NaN loss fails
                rec["loss_ok"] = bool(rec["loss_rel_diff"] <= LOSS_RTOL.get(rec.get("dtype"), LOSS_RTOL["float32"]))
            if ms and floor_ms:
                rec["ratio_to_gemm_floor"] = ms / floor_ms
            if ms and liger_ms:
                rec["speedup_vs_liger"] = liger_ms / ms
            if mem is not None and liger_mem:
                rec["memory_vs_liger"] = mem / liger_mem
            if mem is not None and naive_mem:
                rec["memory_vs_naive"] = mem / naive_mem
            targets = {}
            chunked, ours = provider.startswith("chunked"), provider.startswith("chunked") or provider == "tiled"
            if chunked and "ratio_to_gemm_floor" in rec:
                targets["floor_1.3x"] = rec["ratio_to_gemm_floor"] <= 1.3
            if chunked and "speedup_vs_liger" in rec:
                targets["liger_1.5x_faster"] = rec["speedup_vs_liger"] >= 1.5
            if provider == "tiled" and "memory_vs_naive" in rec:
                targets["tiled_mem_1pct_naive"] = rec["memory_vs_naive"] < 0.01
            if ours and mem is not None and liger_mem is not None:
                targets["mem_le_liger"] = mem <= liger_mem
            if targets:
                rec["targets"] = targets


def _ms_cell(phase: dict, quantiles: bool = False) -> str:
    if "median_ms" not in phase:
        return "capped (0 reps)"
    cell = f"{phase['median_ms']:.3f}"
    if quantiles:
        cell += f" [{phase['p20_ms']:.3f}, {phase['p80_ms']:.3f}]"
    return cell + (f" (capped, {phase['reps']} reps)" if phase.get("capped") else "")


def _line(rec: dict) -> str:
    head = f"{rec['divergence']:>4} V={rec['V']:<7} N={rec['N']:<5} {rec['provider']:<15}"
    if rec["status"] != "ok":
        return f"{head} {rec['status']}"
    mem = rec.get("peak_bytes_above_inputs")
    mem_s = f"{mem / 2**20:9.1f} MiB" if mem is not None else "      n/a"
    tf = rec["tflops"].get("full")
    return (f"{head} fwd {_ms_cell(rec['fwd'])} ms  bwd {_ms_cell(rec['bwd'])} ms  fwd+bwd "
            f"{_ms_cell(rec['full'], True)} ms  {f'{tf:7.1f}' if tf else '    n/a'} TFLOP/s  peak {mem_s}")


def markdown(result: dict) -> str:
    m = result["machine"]
    cfg = result.get("config", {})
    fmt = lambda x, suffix="x": f"{x:.2f}{suffix}" if isinstance(x, float) else "-"  # noqa: E731
    mark = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines = [f"# fused divergence on {m.get('gpu', m['device'])}" + (" (DRY RUN on CPU, not a GPU number)"
                                                                      if result["dry_run"] else ""),
             "",
             f"{m['date_utc']}; commit {m.get('commit', 'unknown')}; torch {m['torch']} (CUDA {m['cuda']}), triton "
             f"{m['triton']}, liger-kernel {m['liger_kernel']}, fastopd {m['fastopd']}. Command: `bash "
             "bench/gpu_suite.sh` (bench/gpu_bench.py). Times: median [p20, p80] ms of at least "
             f"{cfg.get('min_reps', '?')} calls timed with "
             f"{'perf_counter' if result['dry_run'] else 'CUDA events, L2 flushed before each'}, after a warm-up "
             "('capped': fewer, the provider's time cap was reached); TFLOP/s of the loss's GEMM work in fwd+bwd "
             "(fastopd and Liger form the gradient inside the forward, so their fwd/bwd split, and its TFLOP/s in "
             "the JSON, do not compare with the others'; compare fwd+bwd); peak memory of fwd+bwd above the inputs "
             "(their gradients included); floor = the four cuBLAS GEMMs (input-dtype operands, fp32 output); loss vs "
             "ref = relative difference from an fp32 reference loss on the same inputs ('(!)' above the dtype's "
             "tolerance).",
             ""]
    if not result.get("complete", True):
        done = sum(r["status"] == "ok" for r in result["results"])
        lines += [f"**PARTIAL**: the run stopped before its last shape; {len(result['results'])} of "
                  f"{result.get('planned_rows', '?')} planned rows reached ({done} measured). Missing rows were not "
                  "measured.", ""]
    lines += ["| div | V | N | provider | fwd ms | bwd ms | fwd+bwd ms [p20, p80] | TFLOP/s | peak MiB | x floor time "
              "| x faster than Liger | x naive mem | x Liger mem | targets | loss vs ref |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    bad_loss = []
    for r in result["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['divergence']} | {r['V']} | {r['N']} | {r['provider']} | {r['status']} "
                         "| | | | | | | | | | |")
            continue
        mem = r.get("peak_bytes_above_inputs")
        mem_s = f"{mem / 2**20:.1f}" if mem is not None else "n/a"
        tf = r.get("tflops", {}).get("full")
        targets = "; ".join(f"{name}: {mark(ok)}" for name, ok in r.get("targets", {}).items()) or "-"
        lines.append(f"| {r['divergence']} | {r['V']} | {r['N']} | {r['provider']} | {_ms_cell(r['fwd'])} | "
                     f"{_ms_cell(r['bwd'])} | {_ms_cell(r['full'], True)} | {fmt(tf, '')} | {mem_s} | "
                     f"{fmt(r.get('ratio_to_gemm_floor'))} | {fmt(r.get('speedup_vs_liger'))} | "
                     f"{fmt(r.get('memory_vs_naive'), '')} | {fmt(r.get('memory_vs_liger'), '')} | {targets} | "
                     f"{_loss_cell(r)} |")
        if r.get("loss_ok") is False:
            bad_loss.append(f"{r['divergence']} V={r['V']} N={r['N']} {r['provider']}")
    tally: dict[tuple[str, str], list[bool]] = {}
    for r in result["results"]:
        for name, ok in r.get("targets", {}).items():
            tally.setdefault((name, r["provider"]), []).append(ok)
    lines += ["", "## Targets (measured rows only)", "", "| target | provider | met at | not met at |",
              "|---|---|---|---|"]
    for (name, provider), oks in sorted(tally.items()):
        lines.append(f"| {TARGETS[name]} | {provider} | {sum(oks)} of {len(oks)} shapes | {len(oks) - sum(oks)} |")
    if not tally:
        lines.append("| (no target could be judged: its rows were not measured) | | | |")
    checked = sum("loss_ok" in r for r in result["results"])
    lines += ["", f"Loss check: {checked - len(bad_loss)} of {checked} rows with a loss agree with the fp32 reference"
              + (f"; NOT these: {', '.join(bad_loss)}." if bad_loss else ".")]
    return "\n".join(lines) + "\n"


def _loss_cell(rec: dict) -> str:
    if "loss_rel_diff" not in rec:
        return "-"
    return f"{rec['loss_rel_diff']:.1e}" + ("" if rec["loss_ok"] else " (!)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results"),
                   help="output folder for gpu_bench.json and gpu_bench.md (default: $OUT, else bench/results)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--vocab", type=int, nargs="+", default=[128256, 151936])
    p.add_argument("--ds", type=int, default=2048, help="student hidden size")
    p.add_argument("--dt", type=int, default=4096, help="teacher hidden size")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--divergences", nargs="+", default=["fkl", "jsd"], choices=list(BETA))
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS),
                   help="run in this order within a shape (default: the floor and Liger first)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="token rows per chunk for the chunked providers (default: the library's byte budget)")
    p.add_argument("--tag", default="", help="suffix of the output file names (gpu_bench_<tag>.json/.md)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help=f"the benchmark's deadline: no shape starts with less than {MIN_SHAPE_S:.0f} s of it left and "
                        "no provider once it is spent (their rows say 'skipped: time budget')")
    p.add_argument("--min-reps", type=int, default=10, help="timed calls per phase unless capped (default 10)")
    p.add_argument("--max-reps", type=int, default=100, help="timed calls per phase at most (default 100)")
    p.add_argument("--target-ms", type=float, default=300.0,
                   help="timed work per phase beyond the minimum repetitions (default 300 ms)")
    p.add_argument("--provider-cap", type=float, default=None, metavar="SECONDS",
                   help="timed work per provider and shape at most (default 10 s; dry runs 600 s); phases cut short "
                        "say 'capped'")
    p.add_argument("--shape-cap", type=float, default=None, metavar="SECONDS",
                   help="seconds per shape, cold calls included, after which its remaining providers are skipped "
                        "(default 120 s; dry runs 3600 s)")
    p.add_argument("--dry-run", action="store_true",
                   help="run the harness on the CPU at tiny shapes (chunked-cpu, naive, liger, gemm_floor, and tiled "
                        "under TRITON_INTERPRET=1 where Triton's interpreter works): checks the code path and the "
                        "output files, measures nothing meaningful")
    args = p.parse_args(argv)
    # Dry runs check the code path, Triton's interpreter included (slow): no cap should cut them short.
    args.provider_cap = args.provider_cap or (600.0 if args.dry_run else 10.0)
    args.shape_cap = args.shape_cap or (3600.0 if args.dry_run else 120.0)
    if args.dry_run:
        args.tokens, args.vocab, args.ds, args.dt = [37], [301], 32, 48
        args.min_reps, args.max_reps, args.target_ms = 2, 3, 0.0
        args.dtype = "float32"
        args.providers = ["gemm_floor", "liger", "chunked-cpu", "naive"]
        from fastopd import _dispatch

        # the tiled mode runs on the CPU under Triton's interpreter (TRITON_INTERPRET=1), where it works
        if _dispatch.available("divergence_chunk", "triton", "cpu") is None:
            args.providers.append("tiled")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_bench" + (f"_{args.tag}" if args.tag else "") + ("_dry_run" if args.dry_run else "")

    def write(result: dict) -> None:  # after every row, atomically: a run killed at its limit keeps its rows
        from fastopd._io import json_text  # NaN as null: standard JSON

        for suffix, text in ((".json", json_text(result, indent=1)), (".md", markdown(result))):
            tmp = out / f".{stem}{suffix}.tmp"
            tmp.write_text(text)
            os.replace(tmp, out / f"{stem}{suffix}")

    result = run(args, on_row=write)
    write(result)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    bad = [r for r in result["results"] if r["status"].startswith("error")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
