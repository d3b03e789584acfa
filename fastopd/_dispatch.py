"""Backend choice, in one place.

Each op names its backends in priority order per device type; `resolve(op, impl, device)` returns the
backend to use, honouring `impl=` first, then the `FASTOPD_IMPL` environment variable, then the first
available backend for the device. `available(op, backend, device)` says whether a backend can run here,
and why not. Nothing here imports a backend's code until `resolve` names it (or `kernel` asks for it).

Under torch.compile both run at trace time, outside the graph: `resolve`'s work is a constant result (it reads
the environment and what is installed, never tensors), and it loads the backend's kernel there, so that `kernel`
is a dictionary lookup (Dynamo cannot trace an import). The graph then holds only the kernel's ops, and the
choice is baked into it: after changing `FASTOPD_IMPL`, `torch._dynamo.reset()` makes compiled code choose again.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

IMPLS = ("auto", "torch", "cpu", "triton", "cuda")


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]      # device types it runs on
    loader: str                   # "module:attr" of the kernel callable, imported lazily
    check: Callable[[], str | None]  # returns None when usable, else why not


def _check_cpp(dispatch_key: str, op: str) -> Callable[[], str | None]:
    def check() -> str | None:
        from fastopd import _ops

        if _ops.LOAD_ERROR is not None:
            return f"fastopd._C is not built or does not load ({_ops.LOAD_ERROR}); {_rebuild_hint(_ops.LOAD_ERROR)}"
        if not _ops.has_kernel(op, dispatch_key):
            hint = (" (CUDA kernels are compiled only with FASTOPD_BUILD_CUDA=1, or when a GPU is visible at build "
                    "time, and CUDA_HOME holding lib64/libcudart.so: rebuild with `FASTOPD_BUILD_CUDA=1 pip install "
                    "--no-build-isolation .`)") if dispatch_key == "CUDA" else ""
            return f"fastopd._C was built without a {dispatch_key} kernel for {op}{hint}"
        return None

    return check


def _rebuild_hint(load_error: str) -> str:
    """How to get a loadable fastopd._C, from why it did not load."""
    again = "`pip install --no-build-isolation .` (with -e in a source checkout)"
    if "No module named" in load_error:
        return ("it was never built: setup.py needs torch importable at build time and a C++ compiler "
                f"(`pip install -v` shows its note on which was missing); reinstall with {again}")
    return f"it was built against another torch or toolkit than the one running: rebuild it with {again}"


def _check_triton() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def release(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string, for comparisons: '2.14.1+cu130' -> (2, 14, 1),
    '0.8.5.dev20261027' -> (0, 8, 5), '3.7.0rc1' -> (3, 7, 0)."""
    m = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run fastopd's kernels with the installed Triton and NumPy, or None.
    Triton 3.6 and older take int() of 1-element NumPy arrays in the interpreter's range() over kernel
    arguments, which NumPy 2.4 turned into an error (measured: 3.4 and 3.6 fail, 3.7.1 and newer pass)."""
    import numpy
    import triton

    if release(triton.__version__) < (3, 7) and release(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails under NumPy {numpy.__version__} (int() of a "
                "1-element array, an error since NumPy 2.4): use Triton >= 3.7 or NumPy < 2.4; on the GPU the "
                "interpreter is not used")
    return None


interpreter_problem._dynamo_marked_constant = True  # type: ignore[attr-defined]  (a constant at trace time)


def _always() -> str | None:
    return None


def _check_decode_linear_cpu() -> str | None:
    why = _check_cpp("CPU", "decode_linear_")()
    if why is None and torch.ops.fastopd.decode_linear_isa() == "baseline":
        if os.environ.get("FASTOPD_DECODE_ISA") == "baseline":  # (read by the kernel once per process, as here)
            why = "FASTOPD_DECODE_ISA=baseline caps it to the portable tile, where MKL's sgemm is the faster choice"
        else:
            why = "this CPU has neither AVX-512 nor AVX2 with FMA, where MKL's sgemm is the faster choice"
    return why


# op -> backends in priority order (the first available one for the device wins under "auto").
REGISTRY: dict[str, list[Backend]] = {
    "divergence_chunk": [
        Backend("triton", ("cuda",), "fastopd._triton_ops:divergence_chunk_", _check_triton),
        Backend("cuda", ("cuda",), "fastopd._dispatch:_torch_op_divergence_chunk",
                _check_cpp("CUDA", "divergence_chunk_")),
        Backend("cpu", ("cpu",), "fastopd._dispatch:_torch_op_divergence_chunk",
                _check_cpp("CPU", "divergence_chunk_")),
        Backend("torch", ("cpu", "cuda"), "fastopd.losses.reference:divergence_chunk_", _always),
    ],
    # The vocab-parallel row math in phases (fastopd/distributed/vocab_parallel.py runs the all-reduces between).
    "vocab_parallel_chunk": [
        Backend("triton", ("cuda",), "fastopd.kernels.vocab_parallel:vocab_parallel_phase_", _check_triton),
        Backend("torch", ("cpu", "cuda"), "fastopd.distributed.vocab_parallel:torch_phase_", _always),
    ],
    "sparse_adamw_step": [
        Backend("triton", ("cuda",), "fastopd.kernels.sparse_adamw:sparse_adamw_step_", _check_triton),
        Backend("cpu", ("cpu",), "fastopd.optim.kernels:sparse_adamw_step_cpu",
                _check_cpp("CPU", "sparse_adamw_step_")),
        Backend("torch", ("cpu", "cuda"), "fastopd.optim.reference:sparse_adamw_step_", _always),
    ],
    # The weight layout of a decode step's linear layers (fastopd/models/decode_linear.py): fastopd's CPU kernel
    # over 48-column panels, or torch.mm over the transposed weight.
    "decode_linear": [
        Backend("cpu", ("cpu",), "fastopd.models.decode_linear:pack_panels", _check_decode_linear_cpu),
        Backend("torch", ("cpu", "cuda"), "fastopd.models.decode_linear:pack_transposed", _always),
    ],
}


def backend_names(op: str) -> tuple[str, ...]:
    """The backends `op` has, in priority order."""
    return tuple(b.name for b in REGISTRY[op])


def _torch_op_divergence_chunk(*args):
    return torch.ops.fastopd.divergence_chunk_(*args)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _runs_on(backend: Backend, device_type: str) -> bool:
    # Under TRITON_INTERPRET=1 Triton kernels run on CPU tensors (how CI exercises them).
    if backend.name == "triton" and device_type == "cpu":
        return _interpreting()
    return device_type in backend.devices


def available(op: str, backend: str, device: torch.device | str) -> str | None:
    """None when `backend` can run `op` on `device`, else a sentence saying why not."""
    device_type = torch.device(device).type
    for b in REGISTRY[op]:
        if b.name == backend:
            if not _runs_on(b, device_type):
                hint = " (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)" if b.name == "triton" else ""
                return f"backend {backend!r} does not run on {device_type} tensors{hint}"
            why = b.check()
            if why is None and b.name == "triton" and device_type == "cpu":
                why = interpreter_problem()
            return why
    return f"op {op!r} has no backend {backend!r} (it has: {', '.join(backend_names(op))})"


def resolve(op: str, impl: str, device: torch.device | str) -> str:
    """The backend name for `op` on `device`, its kernel loaded for `kernel`. Raises ValueError for an unknown or
    unusable `impl` (also under torch.compile).

    `FASTOPD_IMPL` stands in for `impl="auto"` in the ops that have a backend of that name (FASTOPD_IMPL=cuda
    forces the CUDA loss kernel; the optimizer step, which has none, stays automatic); an explicit `impl` must
    name one of the op's backends."""
    name, error = _resolve_constant(op, impl, device)
    if error is not None:
        raise ValueError(error)
    return name


def _resolve_constant(op: str, impl: str, device: torch.device | str) -> tuple[str, str | None]:
    """(backend, None), or ("", why not): plain strings, so that Dynamo can take the call as a constant."""
    try:
        name = _resolve(op, impl, device)
    except ValueError as exc:
        return "", str(exc)
    try:
        _load(op, name)
    except Exception:  # noqa: BLE001 (an import that fails is raised by `kernel`, where the kernel is needed)
        pass
    return name, None


# What torch.compiler.assume_constant_result does (Dynamo runs the call at trace time and keeps its result), set
# directly: the decorator imports torch._dynamo, ~2 s at every `import fastopd` (tests/losses/test_compile.py checks
# that the marker is still the decorator's).
_resolve_constant._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _resolve(op: str, impl: str, device: torch.device | str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    source = "impl"
    if impl == "auto":
        impl = os.environ.get("FASTOPD_IMPL", "auto") or "auto"
        if impl not in IMPLS:
            raise ValueError(f"FASTOPD_IMPL must be one of {IMPLS}, got {impl!r}")
        source = "FASTOPD_IMPL"
        if impl not in backend_names(op):
            impl = "auto"
    device_type = torch.device(device).type
    if impl != "auto":
        why = available(op, impl, device)
        if why is not None:
            raise ValueError(f"{source}={impl!r} cannot run {op} here: {why}")
        return impl
    for b in REGISTRY[op]:
        if b.name == "triton" and device_type == "cpu":
            continue  # the interpreter is for tests, never the automatic choice
        if device_type in b.devices and b.check() is None:
            return b.name
    raise ValueError(f"no backend for {op} on {device_type}")


_LOADED: dict[tuple[str, str], Callable] = {}  # (op, backend) -> kernel callable, imported once


def _load(op: str, backend: str) -> Callable:
    for b in REGISTRY[op]:
        if b.name == backend:
            module, attr = b.loader.split(":")
            fn = _LOADED[(op, backend)] = getattr(importlib.import_module(module), attr)
            return fn
    raise ValueError(f"op {op!r} has no backend {backend!r}")


def kernel(op: str, backend: str) -> Callable:
    """The kernel callable of `backend` for `op` (a lookup once `resolve` has named it)."""
    fn = _LOADED.get((op, backend))
    return fn if fn is not None else _load(op, backend)
