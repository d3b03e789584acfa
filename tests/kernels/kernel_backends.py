"""The row kernels under test, by backend name, for tests/kernels: the `divergence_chunk` backends, and "vp-<name>",
the vocab-parallel phases of backend <name> under their driver with one shard holding the whole vocabulary (the
all-reduces are no-ops), which must then be the row kernel itself."""

from __future__ import annotations

import functools

import pytest

from fastopd import _dispatch
from fastopd.distributed.vocab_parallel import vocab_parallel_kernel


def row_kernel(name: str, device: str):
    """The kernel callable (row-kernel contract, launch options as keywords); skips where it cannot run."""
    op, backend = ("vocab_parallel_chunk", name[3:]) if name.startswith("vp-") else ("divergence_chunk", name)
    why = _dispatch.available(op, backend, device)
    if why is not None:
        pytest.skip(f"backend {name!r} cannot run on {device}: {why}")
    kernel = _dispatch.kernel(op, backend)
    if op == "divergence_chunk":
        return kernel

    def one_shard(*args, **launch):
        vocab_parallel_kernel(None, 0, functools.partial(kernel, **launch), all_reduce=lambda t, op: None)(*args)

    return one_shard
