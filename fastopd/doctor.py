"""`fastopd doctor`: versions, and which backends can run here (and, for each one that cannot, why)."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import sys

import torch

from fastopd import _dispatch

# module -> distribution name: the version comes from the installed metadata (liger_kernel has no __version__),
# the import shows whether it loads.
OPTIONAL = {"triton": "triton", "numpy": "numpy", "safetensors": "safetensors", "transformers": "transformers",
            "liger_kernel": "liger-kernel", "trl": "trl", "matplotlib": "matplotlib"}


def _version(module: str, dist: str) -> str:
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken install is exactly what doctor reports
        msg = str(exc).splitlines()[0][:80] if str(exc) else ""
        return f"{version + ' installed, but ' if version else ''}not available ({type(exc).__name__}: {msg})"
    return version or getattr(mod, "__version__", "installed")


def _kernels_shadowed() -> str | None:
    """Why Hugging Face's `kernels` package (which transformers >= 5.25 imports) cannot load, when `import kernels`
    finds another folder first: a fastopd checkout's kernels/ (fastopd.kernels' source) when its root is on
    sys.path (`python -m` or `python -c` run from it). None when it is not installed, not shadowed, or installed
    where its file cannot be located (an editable install)."""
    import importlib.util

    try:
        dist = importlib.metadata.distribution("kernels")
        spec = importlib.util.find_spec("kernels")
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    own = os.path.realpath(str(dist.locate_file("kernels/__init__.py")))
    if spec is None or spec.origin is None or not os.path.isfile(own) or os.path.realpath(spec.origin) == own:
        return None
    return (f"{dist.version} installed, but shadowed by {os.path.dirname(spec.origin)} (a folder named kernels "
            "earlier on sys.path, such as this checkout's root): transformers cannot load its models; run from "
            "another folder, or with python -P")


def report() -> list[tuple[str, str]]:
    """(name, status) rows: versions first, then each backend on each device type."""
    import fastopd

    rows = [("fastopd", fastopd.__version__), ("python", platform.python_version()),
            ("platform", f"{platform.system()} {platform.machine()}"), ("torch", torch.__version__),
            ("torch CUDA", str(torch.version.cuda) if torch.version.cuda else "CPU-only build"),
            ("CUDA device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible")]
    for mod, dist in OPTIONAL.items():
        rows.append((mod, _version(mod, dist)))
    shadowed = _kernels_shadowed()
    if shadowed is not None:
        rows.append(("kernels (Hugging Face)", shadowed))
    rows.append(("CPU threads", str(torch.get_num_threads())))

    op = "divergence_chunk"
    cuda = torch.cuda.is_available()
    rows.append(("torch reference", "usable (CPU and CUDA)" if cuda else "usable (CPU; no CUDA device visible)"))
    why = _dispatch.available(op, "cpu", "cpu")
    rows.append(("C++ CPU kernel", "usable" if why is None else f"missing: {why}"))
    why = _dispatch.available("decode_linear", "cpu", "cpu")
    rows.append(("CPU decode kernel", f"usable ({torch.ops.fastopd.decode_linear_isa()} tile)" if why is None
                 else f"missing: {why}; rollouts use torch.mm"))
    trit = _dispatch.REGISTRY[op][0].check()
    if trit is not None:
        rows.append(("Triton", f"missing: {trit}"))
        rows.append(("Triton interpreter", f"missing: {trit}"))
    else:
        rows.append(("Triton", "usable" if cuda else "missing: no CUDA device visible"))
        interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
        broken = _dispatch.interpreter_problem()
        rows.append(("Triton interpreter", f"missing: {broken}" if broken else
                     "usable" + ("" if interp else " (set TRITON_INTERPRET=1 to use it on CPU)")))
    why = _dispatch.REGISTRY[op][1].check()
    if not cuda:  # no device is the reason that counts first: a rebuild alone would not make the kernel usable
        why = "built, but no CUDA device is visible" if why is None else f"no CUDA device is visible, and {why}"
    rows.append(("CUDA kernel", "usable" if why is None else f"missing: {why}"))
    for dev in ("cpu", "cuda"):
        if dev == "cuda" and not cuda:
            continue
        rows.append((f"auto backend on {dev}", _resolved(op, dev)))
        rows.append((f"vocab-parallel on {dev}", _resolved("vocab_parallel_chunk", dev)))
    rows.append(("torch.distributed", _distributed()))
    return rows


def _resolved(op: str, dev: str) -> str:
    """What impl="auto" picks (FASTOPD_IMPL included), or why nothing can run."""
    try:
        return _dispatch.resolve(op, "auto", dev)
    except ValueError as exc:
        return f"error: {exc}"


def _distributed() -> str:
    """Which torch.distributed backends and data-parallel modes this torch offers (fastopd.distributed)."""
    import torch.distributed as dist

    if not dist.is_available():
        return "missing: this torch was built without torch.distributed"
    backends = [name for name, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available())) if ok]
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401

        fsdp2 = "FSDP2, HSDP"
    except ImportError:
        fsdp2 = "no FSDP2 (nor HSDP)"
    return f"{', '.join(backends) or 'no backend'}; DDP, {fsdp2}, vocab-parallel loss (torchrun)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    del args
    rows = report()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    sys.stdout.flush()
    return 0
