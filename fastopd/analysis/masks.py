"""Streaming writer for update masks in the `fastopd.masks.v1` safetensors format.

The file holds one bool tensor per parameter, keyed by the parameter name, with the parameter's shape
(True where the coordinate changed), and metadata {"format": "fastopd.masks.v1"}: the format that
`fastopd.optim.masks.load` reads. The header is known before any mask is computed (names and shapes), so
masks are written chunk by chunk as the analysis streams over each tensor and never held whole.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

__all__ = ["MASK_FORMAT", "MaskWriter"]

MASK_FORMAT = "fastopd.masks.v1"


class MaskWriter:
    """Write masks in the order given, each as consecutive row-major bool chunks.

    Usage: `with MaskWriter(path, [(name, shape), ...]) as w: w.begin(name); w.write(chunk); ...`.
    The file appears at `path` only when every tensor has been written in full (a temporary file before).
    """

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        header: dict = {"__metadata__": {"format": MASK_FORMAT, **(metadata or {})}}
        self.sizes: dict[str, int] = {}
        offset = 0
        for name, shape in entries:
            n = 1
            for s in shape:
                n *= s
            header[name] = {"dtype": "BOOL", "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.sizes[name] = n
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.order = [name for name, _ in entries]
        self.f = open(self.tmp, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.current: str | None = None
        self.written = 0
        self.done = 0

    def begin(self, name: str) -> None:
        self._finish_current()
        expected = self.order[self.done]
        if name != expected:
            raise ValueError(f"mask for {name!r} written out of order (expected {expected!r})")
        self.current, self.written = name, 0

    def write(self, chunk: torch.Tensor) -> None:
        data = chunk.detach().to("cpu", torch.bool).contiguous().numpy().tobytes()
        self.written += len(data)
        if self.written > self.sizes[self.current]:
            raise ValueError(f"mask for {self.current!r}: more than {self.sizes[self.current]} elements written")
        self.f.write(data)

    def _finish_current(self) -> None:
        if self.current is None:
            return
        if self.written != self.sizes[self.current]:
            raise ValueError(f"mask for {self.current!r}: {self.written} of {self.sizes[self.current]} elements")
        self.current = None
        self.done += 1

    def close(self) -> None:
        self._finish_current()
        self.f.close()
        if self.done != len(self.order):
            raise ValueError(f"mask file incomplete: {self.done} of {len(self.order)} tensors written")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> MaskWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
