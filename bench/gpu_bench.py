"""GPU benchmark of the fused divergence at the published shapes: fastopd (chunked with the Triton and the CUDA
row kernel, tiled) beside naive PyTorch, Liger-Kernel and the cuBLAS GEMM floor, all in one process on one GPU.

    python bench/gpu_bench.py                      # full grid, results to $OUT or bench/results/
    python bench/gpu_bench.py --tokens 1024 --vocab 128256 --providers chunked-triton liger
    python bench/gpu_bench.py --dry-run            # CPU: tiny shapes, checks the harness end to end

Per (divergence, V, N, provider): forward, backward and forward+backward time (median and 20/80 percentiles
from triton.testing.do_bench), TFLOP/s of the loss's GEMM work, peak memory above the inputs, and the ratios
to the GEMM floor (the four bf16 GEMMs an exact loss needs: both heads forward, dH and dW backward) and to
Liger. Writes gpu_bench.json and gpu_bench.md. bf16 inputs; teacher hidden 4096, student hidden 2048.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

PROVIDERS = ("chunked-triton", "chunked-cuda", "tiled", "naive", "liger", "gemm_floor")
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
    lps = torch.log_softmax((hs @ ws.T).float(), -1)
    lpt = torch.log_softmax((ht @ wt.T).float(), -1)
    if beta == 0.0:
        per = (lpt.exp() * (lpt - lps)).sum(-1)
    elif beta == 1.0:
        per = (lps.exp() * (lps - lpt)).sum(-1)
    else:
        lm = torch.logsumexp(torch.stack([lps + torch.log1p(torch.tensor(-beta)), lpt + torch.log(torch.tensor(beta))]),
                             0)
        per = beta * (lpt.exp() * (lpt - lm)).sum(-1) + (1 - beta) * (lps.exp() * (lps - lm)).sum(-1)
    valid = labels != -100
    return (per * valid).sum() / valid.sum()


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
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=hs.is_cuda)
        return lambda: fn(hs, ws, ht, wt, labels)
    raise ValueError(f"unknown provider {provider!r}")


class Timer:
    """triton.testing.do_bench on a GPU (median, p20, p80 in ms); a perf_counter loop on the CPU (dry runs)."""

    def __init__(self, device: str, reps: int):
        self.device, self.reps = device, reps

    def __call__(self, fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> dict:
        if self.device == "cuda":
            from triton.testing import do_bench

            med, p20, p80 = do_bench(fn, warmup=25, rep=max(100, self.reps * 10), grad_to_none=grad_to_none,
                                     quantiles=[0.5, 0.2, 0.8])
            return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
        times = []
        fn()
        for _ in range(self.reps):
            for t in grad_to_none or []:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
        return {"median_ms": statistics.median(times), "p20_ms": q(0.2), "p80_ms": q(0.8)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_above(device: str, fn: Callable[[], object]) -> int | None:
    """Peak bytes allocated above what was allocated before `fn` (CUDA caching allocator); None on the CPU."""
    if device != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def bench_provider(provider: str, divergence: str, inp: dict, timer: Timer, device: str,
                   chunk_size: int | None = None) -> dict:
    hs, ws = inp["hs"], inp["ws"]
    grads = [hs, ws]
    if provider == "gemm_floor":
        h, w, ht, wt = hs.detach(), ws.detach(), inp["ht"], inp["wt"]
        g = torch.randn(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype)
        fwd = lambda: (torch.mm(ht, wt.T), torch.mm(h, w.T))  # noqa: E731
        bwd = lambda: (torch.mm(g, w), torch.mm(g.T, h))  # noqa: E731
        out = {"fwd": timer(fwd), "bwd": timer(bwd), "full": timer(lambda: (fwd(), bwd()))}
        out["peak_bytes_above_inputs"] = peak_above(device, lambda: (fwd(), bwd()))
        del g
        return out
    f = loss_fn(provider, divergence, inp, chunk_size)
    loss = f()
    out = {"loss": float(loss.detach())}

    def full():
        f().backward()

    out["peak_bytes_above_inputs"] = peak_above(device, full)
    for t in grads:
        t.grad = None
    out["fwd"] = timer(lambda: f(), grad_to_none=grads)
    y = f()
    out["bwd"] = timer(lambda: y.backward(retain_graph=True), grad_to_none=grads)
    out["full"] = timer(full, grad_to_none=grads)
    for t in grads:
        t.grad = None
    return out


def machine(device: str) -> dict:
    info = {"date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
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
    """(divergence, V, N) in the order they run: every divergence at the first vocabulary's smallest and largest
    token counts first (what a time-boxed run most needs), then the rest of the grid in order."""
    grid = [(d, v, n) for v in args.vocab for d in args.divergences for n in args.tokens]
    first = {(d, args.vocab[0], n) for d in args.divergences for n in (min(args.tokens), max(args.tokens))}
    return [g for g in grid if g in first] + [g for g in grid if g not in first]


def run(args: argparse.Namespace, on_row: Callable[[dict], None] | None = None) -> dict:
    """Benchmarks the grid; `on_row(partial_result)` after each row (the caller writes it, so a run killed at its
    time limit keeps what it measured). With `args.time_budget` no new shape starts once that many seconds have
    passed: its rows are recorded as "skipped: time budget"."""
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device visible (use --dry-run to check the harness on the CPU)")
    dtype = getattr(torch, args.dtype)
    timer = Timer(device, args.reps)
    rows = []
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config["env"] = {k: os.environ.get(k) for k in ("FASTOPD_CHUNK_BYTES", "FASTOPD_TILED_SKIP", "FASTOPD_IMPL")}
    result = {"machine": machine(device), "dry_run": args.dry_run, "config": config, "results": rows}
    start = time.monotonic()
    for divergence, v, n in shape_order(args):
        head = {"divergence": divergence, "V": v, "N": n, "Ds": args.ds, "Dt": args.dt, "dtype": args.dtype}
        if args.time_budget is not None and time.monotonic() - start > args.time_budget:
            rows += [dict(head, provider=p, status="skipped: time budget") for p in args.providers]
            continue
        fl = flops(n, v, args.ds, args.dt)
        inp = make_inputs(n, v, args.ds, args.dt, device, dtype)
        per = {}
        for provider in args.providers:
            rec = dict(head, provider=provider)
            try:
                rec.update(bench_provider(provider, divergence, inp, timer, device, args.chunk_size))
                rec["tflops"] = {k: fl[k] / (rec[k]["median_ms"] * 1e-3) / 1e12 for k in ("fwd", "bwd", "full")}
                rec["status"] = "ok"
            except (ImportError, ValueError) as exc:
                rec["status"] = f"unavailable: {exc}"
            except torch.cuda.OutOfMemoryError:
                rec["status"] = "out of memory"
            except Exception as exc:  # noqa: BLE001 - one broken provider must not lose the others
                rec["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            if device == "cuda":
                torch.cuda.empty_cache()
            per[provider] = rec
            rows.append(rec)
            print(_line(rec), flush=True)
            if on_row is not None:
                on_row(result)
        _ratios(per)
        del inp
        gc.collect()
        if on_row is not None:
            on_row(result)
    return result


def _ratios(per: dict[str, dict]) -> None:
    """Adds the ratios to the GEMM floor and to Liger to the rows of one shape."""
    floor, liger = per.get("gemm_floor", {}), per.get("liger", {})
    for rec in per.values():
        if rec["status"] != "ok":
            continue
        if floor.get("status") == "ok":
            rec["ratio_to_gemm_floor"] = rec["full"]["median_ms"] / floor["full"]["median_ms"]
        if liger.get("status") == "ok":
            rec["speedup_vs_liger"] = liger["full"]["median_ms"] / rec["full"]["median_ms"]
            lp, lg = liger.get("peak_bytes_above_inputs"), rec.get("peak_bytes_above_inputs")
            if lp and lg is not None:
                rec["memory_vs_liger"] = lg / lp


def _line(rec: dict) -> str:
    head = f"{rec['divergence']:>4} V={rec['V']:<7} N={rec['N']:<5} {rec['provider']:<15}"
    if rec["status"] != "ok":
        return f"{head} {rec['status']}"
    mem = rec.get("peak_bytes_above_inputs")
    mem_s = f"{mem / 2**20:9.1f} MiB" if mem is not None else "      n/a"
    return (f"{head} fwd {rec['fwd']['median_ms']:8.3f} ms  bwd {rec['bwd']['median_ms']:8.3f} ms  "
            f"fwd+bwd {rec['full']['median_ms']:8.3f} ms [{rec['full']['p20_ms']:.3f}, {rec['full']['p80_ms']:.3f}]  "
            f"{rec['tflops']['full']:7.1f} TFLOP/s  peak {mem_s}")


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# fused divergence on {m.get('gpu', m['device'])}" + (" (DRY RUN on CPU, not a GPU number)"
                                                                      if result["dry_run"] else ""),
             "",
             f"{m['date_utc']}; torch {m['torch']} (CUDA {m['cuda']}), triton {m['triton']}, "
             f"liger-kernel {m['liger_kernel']}, fastopd {m['fastopd']}. Command: `bash bench/gpu_suite.sh` "
             f"(bench/gpu_bench.py). Times: median [p20, p80] ms of triton.testing.do_bench; TFLOP/s of the "
             "loss's GEMM work; peak memory above the inputs; floor = the four cuBLAS GEMMs.",
             "",
             "| div | V | N | provider | fwd ms | bwd ms | fwd+bwd ms [p20, p80] | TFLOP/s | peak MiB | x floor | "
             "x faster than Liger |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['divergence']} | {r['V']} | {r['N']} | {r['provider']} | {r['status']} "
                         "| | | | | | |")
            continue
        mem = r.get("peak_bytes_above_inputs")
        mem_s = f"{mem / 2**20:.1f}" if mem is not None else "n/a"
        fmt = lambda x: f"{x:.2f}" if isinstance(x, float) else "-"  # noqa: E731
        lines.append(f"| {r['divergence']} | {r['V']} | {r['N']} | {r['provider']} | {r['fwd']['median_ms']:.3f} | "
                     f"{r['bwd']['median_ms']:.3f} | {r['full']['median_ms']:.3f} [{r['full']['p20_ms']:.3f}, "
                     f"{r['full']['p80_ms']:.3f}] | {r['tflops']['full']:.1f} | {mem_s} | "
                     f"{fmt(r.get('ratio_to_gemm_floor'))} | {fmt(r.get('speedup_vs_liger'))} |")
    return "\n".join(lines) + "\n"


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
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    p.add_argument("--chunk-size", type=int, default=None,
                   help="token rows per chunk for the chunked providers (default: the library's byte budget)")
    p.add_argument("--tag", default="", help="suffix of the output file names (gpu_bench_<tag>.json/.md)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new shape after this many seconds (its rows say 'skipped: time budget'); shapes "
                        "run smallest and largest N of the first vocabulary first")
    p.add_argument("--reps", type=int, default=10, help="timing repetitions on the CPU; do_bench window x10 ms on GPU")
    p.add_argument("--dry-run", action="store_true",
                   help="run the harness on the CPU at tiny shapes (chunked-cpu, naive, liger, gemm_floor, and tiled "
                        "under TRITON_INTERPRET=1): checks the code path and the output files, measures nothing "
                        "meaningful")
    args = p.parse_args(argv)
    if args.dry_run:
        args.tokens, args.vocab, args.ds, args.dt, args.reps = [37], [301], 32, 48, 2
        args.dtype = "float32"
        args.providers = ["chunked-cpu", "naive", "liger", "gemm_floor"]
        if os.environ.get("TRITON_INTERPRET") == "1":  # the tiled mode runs on the CPU under Triton's interpreter
            args.providers.insert(1, "tiled")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_bench" + (f"_{args.tag}" if args.tag else "") + ("_dry_run" if args.dry_run else "")

    def write(result: dict) -> None:  # after every row, atomically: a run killed at its limit keeps its rows
        for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", markdown(result))):
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
