"""`fastopd bench`: the fused divergence beside its peers and its floor, in one process and one run.

Providers (forward + backward of a distillation loss from hidden states and LM-head weights):
- fastopd:    fastopd.fused_linear_divergence (impl="auto": the C++ kernel on CPU, Triton on CUDA; FASTOPD_IMPL
              and FASTOPD_CHUNK_BYTES change what runs, so the resolved backend and those variables are recorded)
- naive:      materialized [N, V] logits for both models, log_softmax and the divergence in PyTorch, autograd
- liger:      Liger-Kernel's chunked LigerFusedLinearJSDLoss (beta=0 for forward KL)
- trl:        TRL's GKDTrainer.generalized_jsd_loss on materialized logits
- gemm_floor: the four GEMMs fastopd's fused loss does (teacher logits, student logits, grad of the student hidden
              states, grad of the student head), with fastopd's own GEMM calls, in its compute precision (fp32 on
              the CPU, where fastopd upcasts its inputs), into buffers made once: nothing else
Each provider's first call measures its peak memory above the inputs (CUDA: max_memory_allocated; CPU: the
process's resident-set high-water mark, reset before each run and checked to have been reset, with glibc told
to return every block of 64 KiB or more to the OS when freed). Then all providers are timed round-robin, one
call of each per repeat with the starting provider rotated, on the same inputs, so a change in machine load
falls on all of them; each reports the median and 20/80 percentiles, and ratios are of medians of the same run.
A ratio below 1 against the floor, a wide p20-p80 spread, or a loss that differs from naive's by more than the
dtype's tolerance is flagged in the table and warned about (naive's loss is computed a chunk of rows at a time for
this, so it exists also where naive's [N, V] tensors do not fit and naive is left out of the providers); so are
gradients (of the memory run, the first call) that differ from naive's gradients computed in fp32, also a chunk of
rows at a time.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fastopd
from fastopd import _dispatch
from fastopd._io import folder_write_problem, json_text, write_text_atomic

PROVIDERS = ("fastopd", "naive", "liger", "trl", "gemm_floor")
# Environment variables that change what the fastopd provider (or the GEMMs under every provider) runs.
ENV_VARS = ("FASTOPD_IMPL", "FASTOPD_CHUNK_BYTES", "TRITON_INTERPRET", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# |loss - naive's loss| / |naive's loss| above which a provider is flagged: naive computes in fp32 from logits
# in the input dtype, so low-precision inputs leave room for honest differences of the order of their rounding.
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 2e-3}
# max over grad_hs, grad_ws of ||g - g_ref|| / ||g_ref||, g_ref naive's gradient in fp32, above which a provider is
# flagged: measured at N=37 V=1001, the peers' are within 5e-7 (fp32), 2e-2 (bf16) and 5e-3 (fp16); a wrong
# gradient (a lost 1/N, the other divergence, a missing term) is off by 0.1 or more.
GRAD_RTOL = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
SPREAD_LIMIT = 0.2  # (p80 - p20) / median above which a provider's timings are flagged as too noisy
CLEAR_REFS = "/proc/self/clear_refs"
HWM_RESET_SLACK = 2 * 2**20  # bytes VmHWM may exceed VmRSS right after a reset that took effect


class BenchWarning(UserWarning):
    """A measurement `fastopd bench` does not trust (it is also marked in the table)."""


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
    valid = labels != -100
    return (_naive_rows(xs, xt, beta) * valid).sum() / valid.sum()


def _naive_rows(xs: torch.Tensor, xt: torch.Tensor, beta: float) -> torch.Tensor:
    """The divergence of each row of the logits xs, xt [C, V], computed in fp32."""
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
    return per


REFERENCE_CHUNK_BYTES = 64 * 2**20  # per fp32 [rows, V] temporary of the reference loss


def reference_loss(divergence: str, inputs: dict[str, torch.Tensor], *, rows: int | None = None,
                   logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> float:
    """naive's loss on `inputs`, a chunk of rows at a time and without autograd, so that it needs no [N, V] tensor:
    the loss every provider is compared with, also where naive itself does not fit (and is left out). `rows` per
    chunk (default: REFERENCE_CHUNK_BYTES of fp32 logits); `logits(h, w)` forms them (default h @ w^T)."""
    hs, ws, ht, wt, labels = (inputs[k].detach() for k in ("hs", "ws", "ht", "wt", "labels"))
    rows = rows or max(1, REFERENCE_CHUNK_BYTES // (4 * ws.shape[0]))
    logits = logits or (lambda h, w: h @ w.T)
    total = torch.zeros((), dtype=torch.float64, device=hs.device)
    with torch.no_grad():
        for start in range(0, hs.shape[0], rows):
            end = min(start + rows, hs.shape[0])
            per = _naive_rows(logits(hs[start:end], ws), logits(ht[start:end], wt), _beta(divergence))
            total += (per * (labels[start:end] != -100)).sum(dtype=torch.float64)
    return float(total / (labels != -100).sum())


def reference_grads(divergence: str, inputs: dict[str, torch.Tensor], *,
                    rows: int | None = None) -> dict[str, torch.Tensor]:
    """naive's gradients {"hs": [N, Ds], "ws": [V, Ds]} on `inputs`, in fp32 and a chunk of rows at a time (as
    reference_loss, so no [N, V] tensor): what every provider's gradients are compared with."""
    hs, ws, ht, wt = (inputs[k].detach().float() for k in ("hs", "ws", "ht", "wt"))
    labels = inputs["labels"]
    rows = rows or max(1, REFERENCE_CHUNK_BYTES // (4 * ws.shape[0]))
    valid = labels != -100
    count = valid.sum()
    w = ws.clone().requires_grad_(True)
    grad_h = []
    for start in range(0, hs.shape[0], rows):
        end = min(start + rows, hs.shape[0])
        h = hs[start:end].clone().requires_grad_(True)
        with torch.no_grad():
            xt = ht[start:end] @ wt.T
        per = _naive_rows(h @ w.T, xt, _beta(divergence))
        ((per * valid[start:end]).sum() / count).backward()
        grad_h.append(h.grad)
    return {"hs": torch.cat(grad_h), "ws": w.grad}


def grad_rel_diff(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """max over ref's keys of ||got - ref|| / ||ref|| (inf for a gradient `got` lacks)."""
    worst = 0.0
    for k, r in ref.items():
        if got.get(k) is None:
            return math.inf
        worst = max(worst, float((got[k].float() - r).norm() / r.norm().clamp_min(1e-30)))
    return worst


def _gkd_trainer():
    """TRL's GKDTrainer: trl.experimental.gkd from TRL 0.26 on, trl.GKDTrainer before (fastopd's trl extra takes
    0.19 on). ImportError where neither is there."""
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError as new:
        try:
            from trl import GKDTrainer
        except ImportError as old:  # both reasons: the first is the one that matters on TRL 0.26+
            raise ImportError(f"TRL's GKDTrainer is not importable: trl.experimental.gkd ({new}); trl.GKDTrainer "
                              f"({old})") from None
    return GKDTrainer


# Liger-Kernel before 0.6.5 averaged its soft loss over every token, ignore_index ones included (measured with
# 0.5.10, 0.6.0-0.6.4: a different loss from the other providers on labels with ignored tokens).
LIGER_MIN = (0, 6, 5)


def _liger_loss(beta: float, compiled: bool):
    """Liger-Kernel's LigerFusedLinearJSDLoss as the benchmarks run it (the soft loss only, at `beta`); ImportError
    (the provider is skipped, with the reason) where Liger is missing or older than LIGER_MIN."""
    from importlib.metadata import version

    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    found, least = version("liger-kernel"), ".".join(map(str, LIGER_MIN))
    if _dispatch.release(found) < LIGER_MIN:
        raise ImportError(f"liger-kernel {found} averages its soft loss over ignore_index tokens too (fixed in "
                          f"{least}), so it computes another loss: pip install 'liger-kernel>={least}'")
    return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=compiled)


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
        # compiled=False: torch.compile of Liger's chunk step is slower than eager on the CPU here (and on
        # a GPU the suite runs Liger as its README shows, compiled).
        loss_fn = _liger_loss(beta, compiled=hs.is_cuda)

        def step():
            loss_fn(hs, ws, ht, wt, labels).backward()
            clear()
    elif name == "trl":
        GKDTrainer = _gkd_trainer()

        def step():
            xs, xt = hs @ ws.T, ht @ wt.T
            GKDTrainer.generalized_jsd_loss(xs[None], xt[None], labels=labels[None], beta=beta).backward()
            clear()
    elif name == "gemm_floor":
        step = _gemm_floor_step(hs, ws, ht, wt)
    else:
        raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")
    return step


def _gemm_floor_step(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor) -> Callable[[], None]:
    """The GEMMs of fastopd's chunked FusedLinearDivergenceFunction, and nothing else, at whole-batch size.

    They are its own calls (`_logits_into` for both models' fp32 logits, `_accumulate_grads` for grad_h = G W_s and
    grad_W_s += G^T h_s) in its compute dtype: fp32 on the CPU, where fused_linear_divergence upcasts its inputs
    once, the input dtype (fp32 accumulation) on CUDA. G stands for the [N, V] logit gradient, already in that
    dtype. The output buffers are made by the first call (the memory run, so the floor's peak counts them) and
    reused, so no call pays for allocation or page faults: a loss doing these GEMMs cannot be faster."""
    from fastopd.losses.function import _accumulate_grads, _logits_into

    cdt = torch.float32 if hs.device.type == "cpu" else hs.dtype
    h_s, w_s, h_t, w_t = (x.detach().to(cdt) for x in (hs, ws, ht, wt))
    n, v = h_s.shape[0], w_s.shape[0]
    grad_logits = torch.randn(n, v, device=h_s.device, dtype=cdt)
    buf: dict[str, torch.Tensor] = {}

    def step():
        if not buf:
            f32 = dict(device=h_s.device, dtype=torch.float32)
            buf.update(xs=torch.empty(n, v, **f32), xt=torch.empty(n, v, **f32),
                       grad_h=torch.empty(n, h_s.shape[1], **f32), grad_w=torch.zeros(v, w_s.shape[1], **f32))
        _logits_into(buf["xt"], h_t, w_t, None)
        _logits_into(buf["xs"], h_s, w_s, None)
        _accumulate_grads(grad_logits, h_s, w_s, buf["grad_h"], buf["grad_w"], None, 0, n)

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
            GKDTrainer = _gkd_trainer()
            return float(GKDTrainer.generalized_jsd_loss((hs @ ws.T)[None], (ht @ wt.T)[None], labels=labels[None],
                                                         beta=beta))
        if name == "liger":
            fn = _liger_loss(beta, compiled=False)
            return float(fn(hs, ws, ht, wt, labels))
    return None


# ---------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory above what is live when `start()` is called, in bytes; None where it cannot be measured.

    On the CPU the peak is the resident-set high-water mark (VmHWM), which only a write to /proc/self/clear_refs
    resets. Where that write fails or has no effect, VmHWM still holds an earlier, larger peak, which would be
    reported as this run's: `start()` checks that VmHWM came down to VmRSS, and if not `peak()` returns None and
    a BenchWarning says so (once per PeakMemory)."""

    def __init__(self, device: str):
        self.device = device
        self.base = 0
        self.reset_ok = True
        self._warned = False
        self._libc = None
        if device == "cpu" and platform.system() == "Linux":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
                self._libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large blocks go back to the OS on free
            except OSError:
                self._libc = None

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def _reset_hwm(self) -> str | None:
        """Reset VmHWM to VmRSS; None when that took effect, else why not."""
        try:
            with open(CLEAR_REFS, "w") as f:
                f.write("5")
        except OSError as exc:
            return f"writing {CLEAR_REFS} failed ({exc})"
        hwm, rss = self._status("VmHWM:"), self._status("VmRSS:")
        if hwm is None or rss is None:
            return "/proc/self/status has no VmHWM/VmRSS"
        if hwm > rss + HWM_RESET_SLACK:
            return (f"VmHWM stayed {(hwm - rss) / 2**20:.0f} MiB above VmRSS after writing {CLEAR_REFS} "
                    "(the reset did not take effect)")
        return None

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)
        why = self._reset_hwm()
        self.reset_ok = why is None
        if why is not None and not self._warned:
            self._warned = True
            warnings.warn(f"fastopd bench: CPU peak memory is unavailable (n/a): {why}; an earlier provider's "
                          "high-water mark would be reported instead", BenchWarning, stacklevel=2)
        self.base = self._status("VmRSS:") or 0

    def peak(self) -> int | None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        hwm = self._status("VmHWM:")
        return hwm - self.base if hwm is not None and self.reset_ok else None


def memory_run(step: Callable[[], None], inputs: dict[str, torch.Tensor],
               mem: PeakMemory) -> tuple[int | None, dict[str, torch.Tensor]]:
    """A provider's first call: its peak memory above the inputs and the gradients {"hs", "ws"} it computed (kept
    by reference once the step lets go of them, so no copy counts in the peak; empty for the GEMM floor)."""
    grads: dict[str, torch.Tensor] = {}
    hooks = [inputs[k].register_post_accumulate_grad_hook(lambda p, k=k: grads.__setitem__(k, p.grad))
             for k in ("hs", "ws")]
    try:
        mem.start()
        step()
        peak = mem.peak()
    finally:
        for hook in hooks:
            hook.remove()
    return peak, grads


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_round_robin(steps: dict[str, Callable[[], None]], device: str, repeats: int, warmup: int = 0,
                     clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, list[float]], list[str]]:
    """Time every step `repeats` times, interleaved: each repeat calls each step once, starting one provider
    further along each time (so none always runs first or after the same neighbour). `warmup` untimed rounds
    first. Returns the times per step name and the order the timed calls ran in."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    order: list[str] = []
    for r in range(repeats):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            t0 = clock()
            steps[name]()
            _sync(device)
            times[name].append(clock() - t0)
            order.append(name)
    return times, order


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


def fastopd_backend(device: str) -> str:
    """The backend fused_linear_divergence(impl="auto") resolves to on `device` (FASTOPD_IMPL included)."""
    try:
        return _dispatch.resolve("divergence_chunk", "auto", device)
    except ValueError as exc:
        return f"unresolved ({exc})"


def machine_info(device: str, vocab: int | None = None) -> dict:
    """Machine, versions, fastopd's resolved backend (and its chunk rows at `vocab`), the environment variables
    in ENV_VARS (None where unset) and the load average."""
    info = dict(device=device, cpu=cpu_name(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, fastopd=fastopd.__version__, python=platform.python_version(),
                fastopd_backend=fastopd_backend(device), fastopd_mode="chunked",
                env={k: os.environ.get(k) for k in ENV_VARS},
                load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    if vocab is not None:
        from fastopd.losses.functional import chunk_rows_for

        info["fastopd_chunk_rows"] = chunk_rows_for(vocab, None, device)
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    for mod in ("liger_kernel", "trl", "triton"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001 - report what is there
            info[mod] = None
    return info


def summarize(rows: list[dict], dtype: str) -> list[str]:
    """Fill each timed row's median/p20/p80 (from `times_s`), its ratio to the floor's median and its memory vs
    naive's (per divergence, so from the same run), and its `flags`. Returns one warning sentence per flag."""
    rtol = LOSS_RTOL.get(dtype, LOSS_RTOL["float32"])
    out = []
    for r in rows:
        if "times_s" in r:
            t = r["times_s"]
            r.update(median_s=statistics.median(t), p20_s=_percentile(t, 0.2), p80_s=_percentile(t, 0.8))
    for div in dict.fromkeys(r["divergence"] for r in rows):
        by = {r["provider"]: r for r in rows if r["divergence"] == div and "median_s" in r}
        floor, naive = by.get("gemm_floor"), by.get("naive")
        for name, r in by.items():
            flags = []
            r["ratio_to_gemm_floor"] = r["median_s"] / floor["median_s"] if floor else None
            naive_peak = naive.get("peak_bytes_above_inputs") if naive else None
            r["memory_vs_naive"] = (r["peak_bytes_above_inputs"] / naive_peak
                                    if naive_peak and r.get("peak_bytes_above_inputs") is not None else None)
            if name != "gemm_floor" and r["ratio_to_gemm_floor"] is not None and r["ratio_to_gemm_floor"] < 1.0:
                flags.append("below floor")
                out.append(f"{div} {name}: {r['ratio_to_gemm_floor']:.2f}x the GEMM floor, below the GEMMs it must "
                           "do: the timings are not trustworthy (machine load?); rerun")
            spread = (r["p80_s"] - r["p20_s"]) / r["median_s"] if r["median_s"] > 0 else 0.0
            if spread > SPREAD_LIMIT:
                flags.append(f"spread {spread:.0%}")
                out.append(f"{div} {name}: p20-p80 spread is {spread:.0%} of the median (over "
                           f"{SPREAD_LIMIT:.0%}): noisy timings")
            diff = r.get("loss_rel_diff_vs_naive")
            if diff is not None and not diff <= rtol:  # NaN too
                flags.append(f"loss differs {diff:.1e}")
                out.append(f"{div} {name}: loss differs from naive's by {diff:.2e} (relative), over the "
                           f"{dtype} tolerance {rtol:.0e}")
            gdiff = r.get("grad_rel_diff")
            grtol = GRAD_RTOL.get(dtype, GRAD_RTOL["float32"])
            if gdiff is not None and not gdiff <= grtol:
                flags.append(f"grads differ {gdiff:.1e}")
                out.append(f"{div} {name}: gradients differ from naive's in fp32 by {gdiff:.2e} (relative norm), "
                           f"over the {dtype} tolerance {grtol:.0e}")
            r["flags"] = flags
    return out


def run_benchmark(shape: Shape, divergences: list[str], providers: list[str], device: str, repeats: int,
                  warmup: int, log: Callable[[str], None] = print) -> dict:
    """Per divergence: each provider's memory run (its first call, one provider at a time), `warmup - 1` more
    untimed rounds, then `repeats` timed round-robin rounds over all providers on the same inputs."""
    machine = machine_info(device, shape.v)
    mem = PeakMemory(device)
    rows, order = [], {}
    for div in divergences:
        inputs = make_inputs(shape, device)
        ref_loss = reference_loss(div, inputs)
        ref_grads = reference_grads(div, inputs)
        steps, by = {}, {}
        for name in providers:
            try:
                step = provider_step(name, div, inputs)
            except ImportError as exc:
                log(f"  {div:4s} {name:10s} skipped: {exc}")
                rows.append(dict(divergence=div, provider=name, skipped=str(exc)))
                continue
            loss = provider_loss(name, div, inputs)
            peak, grads = memory_run(step, inputs, mem)  # also the first warm-up call
            row = dict(divergence=div, provider=name, peak_bytes_above_inputs=peak, loss=loss,
                       loss_rel_diff_vs_naive=(abs(loss - ref_loss) / abs(ref_loss)
                                               if loss is not None and ref_loss else None),
                       grad_rel_diff=None if name == "gemm_floor" else grad_rel_diff(grads, ref_grads))
            del grads
            if name == "fastopd":
                row["backend"] = machine["fastopd_backend"]
            rows.append(row)
            steps[name], by[name] = step, row
            del step
        times, order[div] = time_round_robin(steps, device, repeats, max(0, warmup - 1))
        for name, t in times.items():
            by[name]["times_s"] = t
            peak = by[name]["peak_bytes_above_inputs"]
            log(f"  {div:4s} {name:10s} {statistics.median(t):8.3f} s   peak "
                + (f"+{peak / 2**20:8.1f} MiB" if peak is not None else "n/a"))
        del steps, inputs, ref_grads
        gc.collect()
    flagged = summarize(rows, shape.dtype)
    for w in flagged:
        warnings.warn(f"fastopd bench: {w}", BenchWarning, stacklevel=2)
    return dict(shape=asdict(shape), divergences=divergences, repeats=repeats, warmup=warmup,
                timing="round-robin: one call per provider per repeat, starting provider rotated", order=order,
                machine=machine, date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                warnings=flagged, results=rows)


def _env_line(machine: dict) -> str:
    env = machine.get("env") or {}
    fastopd_env = ", ".join(f"{k}={env[k]}" if env.get(k) is not None else f"{k} unset"
                            for k in ("FASTOPD_IMPL", "FASTOPD_CHUNK_BYTES"))
    others = ", ".join(f"{k}={v}" for k, v in env.items() if v is not None and not k.startswith("FASTOPD_"))
    rows = machine.get("fastopd_chunk_rows")
    return (f"fastopd backend: {machine.get('fastopd_backend')} ({machine.get('fastopd_mode', 'chunked')}"
            + (f", {rows} rows per chunk" if rows else "") + f"); {fastopd_env}" + (f"; {others}" if others else ""))


def _seconds(x: float) -> str:
    """Three decimals, or three significant digits below 0.1 s (tiny shapes would read 0.000)."""
    return f"{x:.3f}" if x >= 0.1 else (f"{x:#.3g}" if x >= 1e-4 else f"{x:.2e}")


def markdown_table(result: dict, label: str) -> str:
    s = result["shape"]
    m = result["machine"]
    load = m.get("load_average")
    lines = [f"### {label}: N={s['n']}, Ds={s['ds']}, Dt={s['dt']}, V={s['v']}, {s['dtype']}, forward+backward",
             "",
             f"{m.get('gpu') or m['cpu']}, {m['cores']} cores ({m.get('torch_threads')} torch threads), torch "
             f"{m['torch']}, {result['date']}" + (f", load average {load[0]:.2f} at the start" if load else "")
             + f"; median [p20, p80] of {result['repeats']} round-robin repeats (providers interleaved) after a "
             "warm-up",
             "",
             _env_line(m),
             "",
             "| divergence | provider | median s | p20 s | p80 s | x GEMM floor | peak MiB above inputs "
             "| memory vs naive | loss rel diff vs naive | grad rel diff | flags |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        if "median_s" not in r:
            lines.append(f"| {r['divergence']} | {r['provider']} | skipped: {r.get('skipped', '')} | | | | | | | | |")
            continue
        ratio = r.get("ratio_to_gemm_floor")
        ratio = "" if ratio is None else f"{ratio:.2f}" + (" (!)" if "below floor" in r.get("flags", ()) else "")
        peak = r.get("peak_bytes_above_inputs")
        peak = "n/a" if peak is None else f"{peak / 2**20:.0f}"
        memv = f"{r['memory_vs_naive']:.1%}" if r.get("memory_vs_naive") is not None else ""
        diff = r.get("loss_rel_diff_vs_naive")
        diff = "" if diff is None else f"{diff:.1e}"
        gdiff = r.get("grad_rel_diff")
        gdiff = "" if gdiff is None else f"{gdiff:.1e}"
        lines.append(f"| {r['divergence']} | {r['provider']} | {_seconds(r['median_s'])} | {_seconds(r['p20_s'])} | "
                     f"{_seconds(r['p80_s'])} | {ratio} | {peak} | {memv} | {diff} | {gdiff} | "
                     f"{', '.join(r.get('flags', ()))} |")
    if result.get("warnings"):
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in result["warnings"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------

DEFAULT_REPEATS = {"quick": 15, "full": 7}
DIVERGENCES = ("fkl", "rkl", "jsd")
# The smallest --tokens/--hidden/--vocab that measure something: make_inputs masks every 10th row from the
# first (so one row leaves nothing to average: a NaN loss), and a one-token vocabulary makes every divergence 0.
MIN_SIZE = {"tokens": 2, "hidden": 1, "vocab": 2}


class BenchInputError(ValueError):
    """Bad input to `fastopd bench`, reported as one `fastopd bench: error:` line (exit code 2) before any timing."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true",
                        help=f"the target shapes (N={FULL.n}, Ds=Dt={FULL.ds}, V={FULL.v}); default is a quick run "
                             f"at N={QUICK.n}, Ds=Dt={QUICK.ds}, V={QUICK.v}")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"override N (token rows, at least {MIN_SIZE['tokens']}: every 10th row from the first "
                             "is masked out)")
    parser.add_argument("--hidden", type=int, default=None,
                        help=f"override Ds = Dt (hidden size, at least {MIN_SIZE['hidden']})")
    parser.add_argument("--vocab", type=int, default=None,
                        help=f"override V (vocabulary size, at least {MIN_SIZE['vocab']}: with one token every "
                             "divergence is 0)")
    parser.add_argument("--divergences", default="fkl,jsd",
                        help=f"comma-separated, from {','.join(DIVERGENCES)} (default fkl,jsd)")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help=f"comma-separated, from {','.join(PROVIDERS)} (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"),
                        help="default cuda where a CUDA device is visible, else cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the hidden states and heads (default float32)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed round-robin repeats, one call of every provider each, at least 1 (default "
                             f"{DEFAULT_REPEATS['full']} full, {DEFAULT_REPEATS['quick']} otherwise)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls per provider before timing, at least 1, the first of which measures "
                             "its peak memory (default 1)")
    parser.add_argument("--out", default="bench/results",
                        help="folder for the JSON and Markdown results, loss_<device>_<kind>_<dtype>.json and "
                             ".md (kind: quick, full, or custom_n<N>_d<D>_v<V> where --tokens, --hidden or --vocab "
                             "is given), replacing earlier ones of those names (created, and "
                             "checked to be writable, before the timing; default bench/results, relative to the "
                             "working directory)")


def _command(args: argparse.Namespace) -> str:
    """The `fastopd bench` command line that reproduces `args` (options at their defaults left out)."""
    parts = ["fastopd bench"] + (["--full"] if args.full else [])
    defaults = dict(tokens=None, hidden=None, vocab=None, divergences="fkl,jsd", providers=",".join(PROVIDERS),
                    dtype="float32", repeats=None, warmup=1, out="bench/results")
    for key, default in defaults.items():
        if getattr(args, key) != default:
            parts.append(f"--{key} {shlex.quote(str(getattr(args, key)))}")
    parts.append(f"--device {args.device}")
    return " ".join(parts)


def _names(flag: str, value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    """The comma-separated names of `flag`, each one of `allowed`, at least one and none twice."""
    names = [x.strip() for x in value.split(",") if x.strip()]
    choose = f"choose from {', '.join(allowed)}"
    if not names:
        raise BenchInputError(f"--{flag}: no {what} given ({choose})")
    for x in names:
        if x not in allowed:
            raise BenchInputError(f"--{flag}: unknown {what} {x!r} ({choose})")
    twice = sorted({x for x in names if names.count(x) > 1})
    if twice:
        raise BenchInputError(f"--{flag}: {', '.join(map(repr, twice))} given more than once")
    return names


def _pick(value: int | None, default: int) -> int:
    """`value`, or `default` only where the flag was absent (a 0 given is checked, never replaced)."""
    return default if value is None else value


# Peak memory above the inputs of one forward + backward, in fp32 [N, V] tensors (measured by this benchmark on the
# CPU at N=4096, V=32768: naive 7 / 12, trl 9 / 17, liger 1.9 / 4.4, the GEMM floor 2.1 for fkl / jsd; rkl as fkl);
# fastopd's chunked loss holds one chunk, bounded by FASTOPD_CHUNK_BYTES, not N x V.
PEAK_NV_FP32 = {"naive": (7.0, 12.0), "trl": (9.0, 17.0), "liger": (2.0, 4.5), "gemm_floor": (2.2, 2.2)}


def _memory_available(device: str) -> tuple[int, str] | None:
    """Bytes a benchmark on `device` may use and where that was read; None where it cannot be told."""
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return free, "free on the GPU"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory"
    except (AttributeError, OSError, ValueError):
        return None


def _check_fits(shape: Shape, divergences: list[str], providers: list[str], device: str) -> None:
    """BenchInputError where a provider's [N, V] tensors cannot fit in the device's memory (on the CPU the run would
    be killed, or the machine would swap, after minutes of the other providers' timing)."""
    available = _memory_available(device)
    if available is None:
        return
    free, where = available
    itemsize = torch.empty((), dtype=shape.torch_dtype).element_size()
    inputs = (shape.n + shape.v) * (shape.ds + shape.dt) * itemsize * 2  # the inputs and their gradients
    nv = shape.n * shape.v * 4
    for name in providers:
        if name not in PEAK_NV_FP32:
            continue
        factor = max(PEAK_NV_FP32[name][d == "jsd"] for d in divergences)
        need = inputs + factor * nv
        if need > free:
            raise BenchInputError(
                f"--providers {name}: at N={shape.n} V={shape.v} it needs about {need / 2**30:.1f} GiB "
                f"({factor:g} fp32 [N, V] tensors), more than the {free / 2**30:.1f} GiB {where} on {device}; "
                f"leave it out of --providers or lower --tokens / --vocab")


def _check_args(args: argparse.Namespace) -> tuple[Shape, list[str], list[str], int]:
    """The shape, divergences, providers and repeats `args` ask for; BenchInputError where they are bad."""
    for flag, least in MIN_SIZE.items():
        value = getattr(args, flag)
        if value is not None and value < least:
            raise BenchInputError(f"--{flag} must be >= {least}, got {value}")
    for flag in ("repeats", "warmup"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise BenchInputError(f"--{flag} must be >= 1, got {value}")
    base = FULL if args.full else QUICK
    shape = Shape(_pick(args.tokens, base.n), _pick(args.hidden, base.ds), _pick(args.hidden, base.dt),
                  _pick(args.vocab, base.v), args.dtype)
    divergences = _names("divergences", args.divergences, DIVERGENCES, "divergence")
    providers = _names("providers", args.providers, PROVIDERS, "provider")
    repeats = _pick(args.repeats, DEFAULT_REPEATS["full" if args.full else "quick"])
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchInputError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
                              "use --device cpu")
    _check_fits(shape, divergences, providers, args.device)
    if "fastopd" in providers:  # a bad FASTOPD_IMPL or FASTOPD_CHUNK_BYTES would fail the first fastopd call
        from fastopd.losses.functional import chunk_rows_for

        try:
            _dispatch.resolve("divergence_chunk", "auto", args.device)
            chunk_rows_for(shape.v, None, args.device)
        except ValueError as exc:
            raise BenchInputError(f"provider fastopd: {exc}") from None
    return shape, divergences, providers, repeats


def _prepare_out(out: Path, files: list[str]) -> None:
    """Create the folder `out` and check that `files` can be written in it; BenchInputError if not."""
    why = folder_write_problem(out)
    if why is not None:
        raise BenchInputError(f"--out {out}: {why}")
    for name in files:
        if (out / name).is_dir():
            raise BenchInputError(f"--out {out}: {name} there is a folder, not a file that can be written")
    for name in files:
        if (out / name).exists() and not os.access(out / name, os.W_OK):
            raise BenchInputError(f"--out {out}: {name} there is not writable")


def _error(msg: str) -> int:
    print(f"fastopd bench: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    custom = (args.tokens, args.hidden, args.vocab) != (None, None, None)
    kind = "custom" if custom else ("full" if args.full else "quick")
    out = Path(args.out)
    try:
        shape, divergences, providers, repeats = _check_args(args)
        # a custom run is named by its shape, so a sweep over --tokens/--hidden/--vocab keeps every point
        size = f"_n{shape.n}_d{shape.ds}_v{shape.v}" if custom else ""
        stem = f"loss_{args.device}_{kind}{size}_{shape.dtype}"
        _prepare_out(out, [f"{stem}.json", f"{stem}.md"])  # before the timing, so a bad --out does not waste it
    except BenchInputError as exc:
        return _error(str(exc))
    if custom:
        label = "custom shapes"
    elif args.full:
        label = "full (target shapes)"
    else:
        label = "quick (smaller shapes than the targets; --full for those)"
    print(f"fastopd bench, {label}: N={shape.n} Ds={shape.ds} Dt={shape.dt} V={shape.v} {shape.dtype} "
          f"on {args.device}, fastopd backend {fastopd_backend(args.device)}")
    result = run_benchmark(shape, divergences, providers, args.device, repeats, args.warmup)
    result["label"] = label
    result["command"] = _command(args)
    table = markdown_table(result, label)
    print()
    print(table)
    try:
        write_text_atomic(out / f"{stem}.json", json_text(result))
        write_text_atomic(out / f"{stem}.md", table)
    except OSError as exc:  # checked before the timing; this is what changed since (the table is printed above)
        return _error(f"--out {out}: cannot write the results ({exc.strerror or exc})")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0
