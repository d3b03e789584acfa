"""Streaming writer for update masks in the `fastopd.masks.v1` safetensors format.

The file holds one bool tensor per parameter, keyed by the parameter name, with the parameter's shape
(True where the coordinate changed), and metadata {"format": "fastopd.masks.v1"}: the format that
`fastopd.optim.masks.load` reads. The header is known before any mask is computed (names and shapes), so
masks are written chunk by chunk as the analysis streams over each tensor and never held whole.

`match_param_names(masks, model)` renames a mask dict onto a model's parameter names when the two differ by one
uniform prefix (a Hugging Face checkpoint's "model." against fastopd's own `Transformer`, or the reverse).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from fastopd._io import atomic_path

__all__ = ["MASK_FORMAT", "MaskWriter", "match_param_names"]

MASK_FORMAT = "fastopd.masks.v1"


class MaskWriter:
    """Write masks in the order given, each as consecutive row-major bool chunks.

    Usage: `with MaskWriter(path, [(name, shape), ...]) as w: w.begin(name); w.write(chunk); ...`.
    The file appears at `path` only when every tensor has been written in full: it is written through
    `fastopd._io.atomic_path` (a per-process temporary file, fsynced and renamed, with the umask's mode).
    """

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._atomic = atomic_path(self.path)
        self.tmp = self._atomic.__enter__()
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
        try:
            self._finish_current()
            if self.done != len(self.order):
                raise ValueError(f"mask file incomplete: {self.done} of {len(self.order)} tensors written")
        except BaseException:
            self.abort()
            raise
        self.f.close()
        self._atomic.__exit__(None, None, None)  # fsync, mode, rename over `path`

    def abort(self) -> None:
        self.f.close()
        err = RuntimeError("mask file aborted")
        self._atomic.__exit__(type(err), err, None)  # removes the temporary file, leaves `path` as it was

    def __enter__(self) -> MaskWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def prefix_renamings(sources: Sequence[str], targets: Collection[str]) -> list[tuple[str, bool, dict[str, str]]]:
    """Each way one dotted prefix P maps every name of `sources` (non-empty) onto a name in `targets`, P removed
    ("model.layers.0.x" -> "layers.0.x") or added (the reverse): (P, removed, {source: target}). The candidates
    come from the first source; a fixed prefix removed or added maps distinct names to distinct names."""
    first = sources[0]
    strip = {first[: i + 1] for i, c in enumerate(first) if c == "." and first[i + 1:] in targets}
    add = {t[: len(t) - len(first)] for t in targets if t.endswith("." + first)}

    def rename(prefix: str, removes: bool) -> dict[str, str] | None:
        out = {}
        for n in sources:
            if removes and n.startswith(prefix) and n[len(prefix):] in targets:
                out[n] = n[len(prefix):]
            elif not removes and prefix + n in targets:
                out[n] = prefix + n
            else:
                return None
        return out

    candidates = [(p, True) for p in sorted(strip)] + [(p, False) for p in sorted(add)]
    return [(p, removes, m) for p, removes in candidates if (m := rename(p, removes))]


def match_param_names(masks: Mapping[str, torch.Tensor], model: torch.nn.Module | Iterable[str]
                      ) -> dict[str, torch.Tensor]:
    """`masks` keyed by the model's parameter names, where a mask file's names differ from them by one prefix.

    Names that are parameter names stay. The others must all map by one and the same dotted prefix P, either
    removed (mask "model.layers.0.mlp.up_proj.weight" -> parameter "layers.0.mlp.up_proj.weight") or added (the
    reverse), onto parameter names no other mask claims; an untied Hugging Face "lm_head.weight", already a
    parameter name of fastopd's Transformer, simply stays.

    Args:
        masks: name -> mask (e.g. from `fastopd.optim.masks.load`).
        model: the module (its `named_parameters()`) or its parameter names.
    Raises:
        ValueError: the unmatched names do not all map by one prefix, or more than one prefix would do, or a
            renamed mask would land on a name another mask already has (the message lists names).
    """
    names = {n for n, _ in model.named_parameters()} if isinstance(model, torch.nn.Module) else set(model)
    unmatched = [n for n in masks if n not in names]
    if not unmatched:
        return dict(masks)
    fits = [m for _, _, m in prefix_renamings(unmatched, names)]
    if len(fits) != 1:
        why = "no single prefix maps them onto parameter names" if not fits else \
            f"{len(fits)} prefixes would do, ambiguous"
        raise ValueError(f"masks name {len(unmatched)} tensors that are not parameters of the model, e.g. "
                         f"{unmatched[:3]}, and {why} (parameters: {sorted(names)[:3]} ...)")
    mapping = fits[0]
    targets = list(mapping.values())
    clash = sorted({t for t in targets if t in masks or targets.count(t) > 1})
    if clash:
        raise ValueError(f"renaming the masks by prefix puts two masks on the same parameters: {clash[:3]}")
    return {mapping.get(n, n): m for n, m in masks.items()}
