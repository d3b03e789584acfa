"""Linear layers of a one-token decode step: ``out = x @ W + bias`` (or ``out += ...``) for ``x`` ``[B, K]``.

A decode step multiplies a handful of rows by each weight. On CPU, fp32, fastopd runs its own kernel
(``torch.ops.fastopd.decode_linear_``, csrc/cpu/decode_linear.cpp) over a copy of the weight packed once into
48-column panels (:class:`PanelWeight`): MKL's sgemm is ~3x slower at the benchmark's ``[8, 256] x [256, 8192]``
head on an AMD EPYC. Elsewhere (CUDA, bf16/fp16, a build without fastopd._C, a CPU without AVX2) the weight
stays a transposed contiguous ``[K, N]`` tensor for ``torch.mm``/``addmm``. :func:`pack` makes that choice,
through the dispatch (op ``decode_linear``: backend ``cpu``, then ``torch``; ``FASTOPD_IMPL=torch`` forces the
second), and :func:`decode_linear` runs whichever layout it is given.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastopd import _dispatch

PANEL = 48  # columns per panel: csrc/cpu/decode_linear.cpp's kPanel


class PanelWeight(NamedTuple):
    """A ``[K, N]`` weight as ``ceil(N / 48)`` contiguous ``[K, 48]`` panels (zero-padded past ``N``)."""

    panels: torch.Tensor  # [P, K, 48] fp32
    out_features: int  # N


DecodeWeight = torch.Tensor | PanelWeight


def pack_panels(weight_t: torch.Tensor) -> PanelWeight:
    """:class:`PanelWeight` of ``weight_t`` ``[K, N]`` (any strides): the ``cpu`` backend's layout."""
    k, n = weight_t.shape
    p = -(-n // PANEL)
    padded = F.pad(weight_t.detach(), (0, p * PANEL - n)) if p * PANEL != n else weight_t.detach()
    return PanelWeight(padded.reshape(k, p, PANEL).permute(1, 0, 2).contiguous(), n)


def pack_transposed(weight_t: torch.Tensor) -> torch.Tensor:
    """``weight_t`` ``[K, N]`` contiguous, for ``torch.mm``: the ``torch`` backend's layout."""
    return weight_t.detach().contiguous()


def pack(weight_t: torch.Tensor) -> DecodeWeight:
    """The decode layout of ``weight_t`` ``[K, N]`` (``W`` of ``x @ W``) on its device and dtype: panels for the
    ``cpu`` backend (fp32 CPU tensors), else the contiguous transposed tensor."""
    if weight_t.device.type == "cpu" and weight_t.dtype == torch.float32:
        backend = _dispatch.resolve("decode_linear", "auto", weight_t.device)
    else:
        backend = "torch"
    return _dispatch.kernel("decode_linear", backend)(weight_t)


def empty_output(weight: DecodeWeight, rows: int) -> torch.Tensor:
    """An uninitialized ``[rows, N]`` output of ``weight``'s dtype and device."""
    if isinstance(weight, PanelWeight):
        return weight.panels.new_empty(rows, weight.out_features)
    return weight.new_empty(rows, weight.shape[1])


def decode_linear(x: torch.Tensor, weight: DecodeWeight, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, *, accumulate: bool = False) -> torch.Tensor:
    """``x @ W + bias`` into ``out`` (new when None); with ``accumulate``, ``out += x @ W + bias`` (``out`` is the
    residual). ``x`` ``[B, K]`` with unit column stride, ``out`` ``[B, N]`` not overlapping ``x``."""
    if out is None:
        if accumulate:
            raise ValueError("decode_linear: accumulate=True needs out")
        out = empty_output(weight, x.shape[0])
    if isinstance(weight, PanelWeight):
        torch.ops.fastopd.decode_linear_(out, x if x.stride(-1) == 1 else x.contiguous(), weight.panels, bias,
                                         accumulate)
        return out
    if accumulate:
        out.addmm_(x, weight)
        return out if bias is None else out.add_(bias)
    return torch.mm(x, weight, out=out) if bias is None else torch.addmm(bias, x, weight, out=out)


def cpu_isa() -> str | None:
    """The register tile the ``cpu`` backend runs here (``"avx512"``, ``"avx2"``, ``"baseline"``), or None
    without fastopd._C."""
    from fastopd import _ops

    return torch.ops.fastopd.decode_linear_isa() if _ops.has_kernel("decode_linear_", "CPU") else None
