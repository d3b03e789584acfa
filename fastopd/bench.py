"""`fastopd bench`: the fused divergence beside its peers and its floor, in one process and one run.

Providers (forward + backward of a distillation loss from hidden states and LM-head weights):
- fastopd:    fastopd.fused_linear_divergence (impl="auto": the C++ kernel on CPU, Triton on CUDA)
- naive:      materialized [N, V] logits for both models, log_softmax and the divergence in PyTorch, autograd
- liger:      Liger-Kernel's chunked LigerFusedLinearJSDLoss (beta=0 for forward KL)
- trl:        TRL's GKDTrainer.generalized_jsd_loss on materialized logits
- gemm_floor: the four GEMMs any exact fused-linear loss must do (teacher logits, student logits,
              grad of the student hidden states, grad of the student head), nothing else
Each is timed (median and 20/80 percentiles of several repeats after a warm-up) and its peak memory above
the inputs measured (CUDA: max_memory_allocated; CPU: the process's resident-set high-water mark, reset
before each run, with glibc told to return every block of 64 KiB or more to the OS when freed).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fastopd

PROVIDERS = ("fastopd", "naive", "liger", "trl", "gemm_floor")


@dataclass(frozen=True)
class Shape:
    n: int
    ds: int
    dt: int
    v: int
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


QUICK = Shape(n=1024, ds=256, dt=256, v=8192)
FULL = Shape(n=4096, ds=512, dt=512, v=32768)


# ---------------------------------------------------------------------------------------------------------
# Inputs and providers
# ---------------------------------------------------------------------------------------------------------


def make_inputs(shape: Shape, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = shape.torch_dtype

    def rnd(*size, scale):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dt)

    inputs = dict(hs=rnd(shape.n, shape.ds, scale=1.0), ws=rnd(shape.v, shape.ds, scale=shape.ds ** -0.5),
                  ht=rnd(shape.n, shape.dt, scale=1.0), wt=rnd(shape.v, shape.dt, scale=shape.dt ** -0.5))
    inputs["labels"] = torch.randint(0, shape.v, (shape.n,), generator=g).to(device)
    inputs["labels"][::10] = -100
    inputs["hs"].requires_grad_(True)
    inputs["ws"].requires_grad_(True)
    return inputs


def _beta(divergence: str) -> float:
    return {"fkl": 0.0, "rkl": 1.0, "jsd": 0.5}[divergence]


def _naive_loss(xs: torch.Tensor, xt: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    lps, lpt = torch.log_softmax(xs.float(), -1), torch.log_softmax(xt.float(), -1)
    if beta == 0.0:
        per = torch.nn.functional.kl_div(lps, lpt, reduction="none", log_target=True).sum(-1)
    elif beta == 1.0:
        per = torch.nn.functional.kl_div(lpt, lps, reduction="none", log_target=True).sum(-1)
    else:
        lm = torch.logsumexp(torch.stack([lps + torch.log1p(torch.tensor(-beta)), lpt + torch.log(torch.tensor(beta))]),
                             dim=0)
        per = beta * torch.nn.functional.kl_div(lm, lpt, reduction="none", log_target=True).sum(-1) + (
            1 - beta) * torch.nn.functional.kl_div(lm, lps, reduction="none", log_target=True).sum(-1)
    valid = labels != -100
    return (per * valid).sum() / valid.sum()


def provider_step(name: str, divergence: str, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    """A closure running one forward + backward of `name` on `inputs` (gradients are dropped afterwards)."""
    hs, ws, ht, wt, labels = (inputs[k] for k in ("hs", "ws", "ht", "wt", "labels"))
    beta = _beta(divergence)

    def clear():
        hs.grad = None
        ws.grad = None

    if name == "fastopd":
        def step():
            fastopd.fused_linear_divergence(hs, ws, ht, wt, labels, divergence=divergence, beta=beta).backward()
            clear()
    elif name == "naive":
        def step():
            _naive_loss(hs @ ws.T, ht @ wt.T, labels, beta).backward()
            clear()
    elif name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # compiled=False: torch.compile of Liger's chunk step is slower than eager on the CPU here (and on
        # a GPU the suite runs Liger as its README shows, compiled).
        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                          compiled=hs.is_cuda)

        def step():
            loss_fn(hs, ws, ht, wt, labels).backward()
            clear()
    elif name == "trl":
        from trl.experimental.gkd import GKDTrainer

        def step():
            xs, xt = hs @ ws.T, ht @ wt.T
            GKDTrainer.generalized_jsd_loss(xs[None], xt[None], labels=labels[None], beta=beta).backward()
            clear()
    elif name == "gemm_floor":
        grad_logits = torch.randn(hs.shape[0], ws.shape[0], device=hs.device, dtype=hs.dtype)
        h, w = hs.detach(), ws.detach()

        def step():
            torch.mm(ht, wt.T)
            torch.mm(h, w.T)
            torch.mm(grad_logits, w)
            torch.mm(grad_logits.T, h)
    else:
        raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")
    return step


def provider_loss(name: str, divergence: str, inputs: dict[str, torch.Tensor]) -> float | None:
    """The loss value a provider computes on `inputs` (to check that all compute the same thing)."""
    hs, ws, ht, wt, labels = (inputs[k].detach() for k in ("hs", "ws", "ht", "wt", "labels"))
    beta = _beta(divergence)
    with torch.no_grad():
        if name == "fastopd":
            return float(fastopd.fused_linear_divergence(hs, ws, ht, wt, labels, divergence=divergence, beta=beta))
        if name == "naive":
            return float(_naive_loss(hs @ ws.T, ht @ wt.T, labels, beta))
        if name == "trl":  # TRL's own function, so a disagreement with naive shows in loss_rel_diff_vs_naive
            from trl.experimental.gkd import GKDTrainer

            return float(GKDTrainer.generalized_jsd_loss((hs @ ws.T)[None], (ht @ wt.T)[None], labels=labels[None],
                                                         beta=beta))
        if name == "liger":
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

            fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=False)
            return float(fn(hs, ws, ht, wt, labels))
    return None


# ---------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory above what is live when `start()` is called, in bytes."""

    def __init__(self, device: str):
        self.device = device
        self.base = 0
        self._libc = None
        if device == "cpu" and platform.system() == "Linux":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
                self._libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large blocks go back to the OS on free
            except OSError:
                self._libc = None

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        return 0

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the resident-set high-water mark
        except OSError:
            pass
        self.base = self._status("VmRSS:")

    def peak(self) -> int | None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        hwm = self._status("VmHWM:")
        return hwm - self.base if hwm else None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(step: Callable[[], None], device: str, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    info = dict(device=device, cpu=cpu_name(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, fastopd=fastopd.__version__, python=platform.python_version())
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    for mod in ("liger_kernel", "trl", "triton"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001 - report what is there
            info[mod] = None
    return info


def run_benchmark(shape: Shape, divergences: list[str], providers: list[str], device: str, repeats: int,
                  warmup: int, log: Callable[[str], None] = print) -> dict:
    mem = PeakMemory(device)
    rows = []
    for div in divergences:
        inputs = make_inputs(shape, device)
        ref_loss = provider_loss("naive", div, inputs)
        for name in providers:
            try:
                step = provider_step(name, div, inputs)
            except ImportError as exc:
                log(f"  {div:4s} {name:10s} skipped: {exc}")
                rows.append(dict(divergence=div, provider=name, skipped=str(exc)))
                continue
            loss = provider_loss(name, div, inputs)
            mem.start()
            step()  # the first call doubles as the memory run and part of the warm-up
            peak = mem.peak()
            times = time_step(step, device, repeats, max(0, warmup - 1))
            row = dict(divergence=div, provider=name, median_s=statistics.median(times),
                       p20_s=_percentile(times, 0.2), p80_s=_percentile(times, 0.8), times_s=times,
                       peak_bytes_above_inputs=peak,
                       loss=loss, loss_rel_diff_vs_naive=(abs(loss - ref_loss) / abs(ref_loss)
                                                          if loss is not None and ref_loss else None))
            rows.append(row)
            log(f"  {div:4s} {name:10s} {row['median_s']:8.3f} s   peak +{(peak or 0) / 2**20:8.1f} MiB")
            del step
            gc.collect()
        del inputs
        gc.collect()
    for div in divergences:
        by = {r["provider"]: r for r in rows if r["divergence"] == div and "median_s" in r}
        floor, naive = by.get("gemm_floor"), by.get("naive")
        for r in by.values():
            r["ratio_to_gemm_floor"] = r["median_s"] / floor["median_s"] if floor else None
            if naive and naive.get("peak_bytes_above_inputs") and r.get("peak_bytes_above_inputs") is not None:
                r["memory_vs_naive"] = r["peak_bytes_above_inputs"] / naive["peak_bytes_above_inputs"]
    return dict(shape=asdict(shape), divergences=divergences, repeats=repeats, warmup=warmup,
                machine=machine_info(device), date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                results=rows)


def markdown_table(result: dict, label: str) -> str:
    s = result["shape"]
    m = result["machine"]
    lines = [f"### {label}: N={s['n']}, Ds={s['ds']}, Dt={s['dt']}, V={s['v']}, {s['dtype']}, forward+backward",
             "",
             f"{m.get('gpu') or m['cpu']}, {m['cores']} cores, torch {m['torch']}, {result['date']}; "
             f"median of {result['repeats']} after warm-up",
             "",
             "| divergence | provider | median s | p20 s | p80 s | x GEMM floor | peak MiB above inputs "
             "| memory vs naive |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        if "median_s" not in r:
            lines.append(f"| {r['divergence']} | {r['provider']} | skipped: {r['skipped']} | | | | | |")
            continue
        ratio = f"{r['ratio_to_gemm_floor']:.2f}" if r.get("ratio_to_gemm_floor") else ""
        peak = r.get("peak_bytes_above_inputs")
        memv = f"{r['memory_vs_naive']:.1%}" if r.get("memory_vs_naive") is not None else ""
        lines.append(f"| {r['divergence']} | {r['provider']} | {r['median_s']:.3f} | {r['p20_s']:.3f} | "
                     f"{r['p80_s']:.3f} | {ratio} | {peak / 2**20:.0f} | {memv} |" if peak is not None else
                     f"| {r['divergence']} | {r['provider']} | {r['median_s']:.3f} | {r['p20_s']:.3f} | "
                     f"{r['p80_s']:.3f} | {ratio} | | |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true",
                        help=f"the target shapes (N={FULL.n}, Ds=Dt={FULL.ds}, V={FULL.v}); default is a quick run "
                             f"at N={QUICK.n}, Ds=Dt={QUICK.ds}, V={QUICK.v}")
    parser.add_argument("--tokens", type=int, default=None, help="override N (token rows)")
    parser.add_argument("--hidden", type=int, default=None, help="override Ds = Dt (hidden size)")
    parser.add_argument("--vocab", type=int, default=None, help="override V (vocabulary size)")
    parser.add_argument("--divergences", default="fkl,jsd", help="comma-separated, from fkl,rkl,jsd (default fkl,jsd)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated, from {','.join(PROVIDERS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3 full, 5 quick)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default="bench/results", help="folder for the JSON and Markdown results")


def run(args: argparse.Namespace) -> int:
    base = FULL if args.full else QUICK
    d = args.hidden or base.ds
    shape = Shape(args.tokens or base.n, d, args.hidden or base.dt, args.vocab or base.v, args.dtype)
    custom = (args.tokens, args.hidden, args.vocab) != (None, None, None)
    divergences = [d.strip() for d in args.divergences.split(",") if d.strip()]
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    for d in divergences:
        if d not in ("fkl", "rkl", "jsd"):
            raise SystemExit(f"fastopd bench: unknown divergence {d!r} (choose from fkl, rkl, jsd)")
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"fastopd bench: unknown provider {p!r} (choose from {', '.join(PROVIDERS)})")
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit(f"fastopd bench: --repeats must be >= 1, got {args.repeats}")
    repeats = args.repeats if args.repeats is not None else (3 if args.full else 5)
    if custom:
        label = "custom shapes"
    elif args.full:
        label = "full (target shapes)"
    else:
        label = "quick (smaller shapes than the targets; --full for those)"
    print(f"fastopd bench, {label}: N={shape.n} Ds={shape.ds} Dt={shape.dt} V={shape.v} {shape.dtype} "
          f"on {args.device}")
    result = run_benchmark(shape, divergences, providers, args.device, repeats, args.warmup)
    result["label"] = label
    table = markdown_table(result, label)
    print()
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = "custom" if custom else ("full" if args.full else "quick")
    stem = f"loss_{args.device}_{kind}_{shape.dtype}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0
