"""Reading checkpoints tensor by tensor, in bounded memory.

A checkpoint is a Hugging Face model folder (`model*.safetensors` or `pytorch_model*.bin` shards, with or
without their index; other files in it, such as training_args.bin, are not read), a single `.safetensors`
file, a torch state dict (`.bin`/`.pt`/`.pth`), or an in-memory `{name: tensor}` dict. Safetensors files
are parsed here (8-byte header length, JSON header, raw data) and each tensor is a private, copy-on-write
memory map of just its own byte range: pages are read lazily and released when the tensor is dropped, so
analysing a multi-GB pair keeps only the tensors in flight resident. Every offset is checked against the
file size first, so a truncated or corrupt file fails with its name instead of a bus error.
`unwrap_names` removes what torch.compile, DDP and FSDP add to parameter names; `Checkpoint.renamed` renames.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

__all__ = ["Checkpoint", "CheckpointError", "TensorInfo", "open_checkpoint", "unwrap_names"]

# safetensors dtype tags -> torch dtypes (the ones torch can hold; the analysis skips all but 16/32/64-bit floats)
_ST_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint file cannot be read (missing, unreadable, truncated, corrupt). The message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str  # the file it lives in ("<memory>" for in-memory dicts)


class _SafetensorsFile:
    """One safetensors file: validated header, tensors as per-tensor memory maps."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
                (n,) = struct.unpack("<Q", raw)
                if 8 + n > size:
                    raise CheckpointError(f"{path}: truncated safetensors file: header says {n} bytes of JSON "
                                          f"but the file has {size} bytes")
                header = json.loads(f.read(n))
        except CheckpointError:
            raise
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.data_start = 8 + n
        self.entries: dict[str, tuple[tuple[int, ...], torch.dtype, int, int]] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                tag, shape, (begin, end) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from exc
            if tag not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {tag}, which torch cannot hold")
            dtype = _ST_DTYPES[tag]
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * dtype.itemsize or begin < 0:
                raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} of shape {list(shape)} "
                                      f"{tag} spans bytes [{begin}, {end})")
            if self.data_start + end > size:
                raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} needs bytes up to "
                                      f"{self.data_start + end} but the file has {size}")
            self.entries[name] = (shape, dtype, begin, end)

    def load(self, name: str) -> torch.Tensor:
        shape, dtype, begin, end = self.entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        start = self.data_start + begin
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self.path, "rb") as f:
                mm = mmap.mmap(f.fileno(), start - aligned + end - begin, access=mmap.ACCESS_COPY, offset=aligned)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: cannot map tensor {name!r} ({exc})") from exc
        # frombuffer keeps `mm` alive exactly as long as the tensor (and its views) live
        return torch.frombuffer(mm, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=start - aligned).view(shape)


def _what_else(path: Path) -> str | None:
    """What a file that torch.load failed on is, when its first bytes say it is no torch file at all (torch files
    start with a zip "PK" or a pickle 0x80 signature): a JSON file (a weight index: its folder is what to pass), a
    text file (fastopd's `latest` pointer: the step folder it names), or neither. None: it looks like a torch file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return None
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        if path.name.endswith(".index.json"):
            return f"a weight index (JSON): pass the folder holding it and its shards, {path.parent}"
        return "a JSON file"
    try:
        line = head.decode().strip().splitlines()[0] if head.strip() else ""
    except UnicodeDecodeError:
        return "neither a torch file (zip or pickle) nor a safetensors file"
    if line and "/" not in line and (path.parent / line).is_dir():
        return f"a text file that names the folder {path.parent / line} (a `latest` pointer?): pass that folder"
    return f"a text file ({line[:60]!r})"


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types; all mean "cannot read this file"
        if (what := _what_else(path)) is not None:  # torch's own message would be about unpickling (weights_only)
            raise CheckpointError(f"{path}: not a checkpoint: it is {what}") from exc
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, Mapping):
        # a training checkpoint nests the weights ({"state_dict": ...} of Lightning, {"model": ...}, DeepSpeed's
        # {"module": ...}) beside other entries, which may be tensors too ({"model": ..., "step": tensor(3)}): a
        # flat state dict never maps these keys to a dict, so a nested one holding tensors is the model's weights
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


class Checkpoint:
    """Names, shapes and dtypes of a checkpoint's tensors, and each tensor on demand (`load`)."""

    def __init__(self, description: str):
        self.description = description
        self.infos: dict[str, TensorInfo] = {}
        self._st: dict[str, _SafetensorsFile] = {}      # name -> file
        self._mem: dict[str, torch.Tensor] = {}         # name -> tensor (torch files, in-memory dicts)
        self.stored_names: dict[str, str] = {}          # name -> the name the file has, where `renamed` changed it
        self.renames: list[str] = []                    # what `renamed` did, in words (report meta)

    def names(self) -> list[str]:
        return list(self.infos)

    def load(self, name: str) -> torch.Tensor:
        """The tensor `name` (memory-mapped for safetensors; never copied here; in-memory tensors detached from
        autograd and moved to the CPU, where the analysis runs)."""
        if name in self._st:
            return self._st[name].load(self.stored_names.get(name, name))
        return self._mem[name].detach().cpu()

    def renamed(self, mapping: Mapping[str, str], why: str) -> Checkpoint:
        """A view of this checkpoint with names renamed by `mapping` (old -> new; names not in it stay), reading the
        same files. Raises CheckpointError when two tensors would get one name."""
        out = Checkpoint(self.description)
        out.renames = [*self.renames, why]
        for name, info in self.infos.items():
            new = mapping.get(name, name)
            if new in out.infos:
                first = next(n for n in self.infos if mapping.get(n, n) == new)
                raise CheckpointError(f"{self.description}: {first!r} and {name!r} are both {new!r} once {why}")
            out.infos[new] = info
            if name in self._st:
                out._st[new] = self._st[name]
                out.stored_names[new] = self.stored_names.get(name, name)
            else:
                out._mem[new] = self._mem[name]
        return out

    def _add(self, name: str, info: TensorInfo) -> None:
        if name in self.infos:
            raise CheckpointError(f"{self.description}: tensor {name!r} appears twice "
                                  f"({self.infos[name].source} and {info.source})")
        self.infos[name] = info

    def _add_safetensors(self, path: Path, only: set[str] | None = None) -> None:
        st = _SafetensorsFile(path)
        for name, (shape, dtype, _, _) in st.entries.items():
            if only is not None and name not in only:
                continue
            self._add(name, TensorInfo(shape, dtype, str(path)))
            self._st[name] = st

    def _add_tensors(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        for name, t in tensors.items():
            self._add(name, TensorInfo(tuple(t.shape), t.dtype, source))
            self._mem[name] = t


def _read_index(index: Path) -> dict[str, set[str]]:
    """A Hugging Face `*.index.json`: shard file name -> the tensor names it holds."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a readable weight index ({exc})") from exc
    by_file: dict[str, set[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, set()).add(name)
    return by_file


_SHARD = re.compile(r"^(.*)-(\d+)-of-(\d+)(\.safetensors|\.bin)$")


def _check_shards_complete(folder: Path, files: list[Path]) -> None:
    """Shards named "<stem>-0000i-of-0000N<ext>" found without their index must all be there: a folder whose save
    stopped part-way (the index is written last) would otherwise be read as a smaller model."""
    series: dict[tuple[str, str, str], set[int]] = {}  # (stem, "0000N", extension) -> shard numbers found
    for f in files:
        if m := _SHARD.match(f.name):
            series.setdefault((m.group(1), m.group(3), m.group(4)), set()).add(int(m.group(2)))
    for (stem, total, ext), have in sorted(series.items()):
        if missing := sorted(set(range(1, int(total) + 1)) - have):
            names = [f"{stem}-{i:0{len(total)}d}-of-{total}{ext}" for i in missing]
            raise CheckpointError(f"{folder}: has {len(have)} of the {int(total)} shards {stem}-*-of-{total}{ext} "
                                  f"and no index: missing {', '.join(names[:5])}{', ...' if len(names) > 5 else ''} "
                                  f"(a save that did not finish?)")


def _add_model_folder(ckpt: Checkpoint, path: Path) -> None:
    """The weights of a Hugging Face model folder, found as transformers finds them: the safetensors index, else
    `model*.safetensors`, else the torch index, else `pytorch_model*.bin`. Other files (training_args.bin,
    optimizer.pt, rng_state.pth, adapter weights) are not read: they are not the model's weights."""
    st_index, pt_index = path / "model.safetensors.index.json", path / "pytorch_model.bin.index.json"
    index = st_index if st_index.exists() else pt_index if pt_index.exists() else None
    if index is not None:
        by_file = _read_index(index)
        for fname, names in sorted(by_file.items()):
            if index is st_index:
                ckpt._add_safetensors(path / fname, names)
            else:
                tensors = _load_torch_file(path / fname)
                ckpt._add_tensors({k: v for k, v in tensors.items() if k in names}, str(path / fname))
        missing = set().union(*by_file.values()) - set(ckpt.infos)
        if missing:
            raise CheckpointError(f"{index}: lists {len(missing)} tensors not found in their shard, "
                                  f"e.g. {sorted(missing)[:3]}")
    elif shards := sorted(path.glob("model*.safetensors")):
        _check_shards_complete(path, shards)
        for shard in shards:
            ckpt._add_safetensors(shard)
    elif bins := sorted(p for p in path.glob("pytorch_model*.bin") if p.is_file()):
        _check_shards_complete(path, bins)
        for b in bins:
            ckpt._add_tensors(_load_torch_file(b), str(b))
    else:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", *_TORCH_SUFFIXES))
        found = f" (it has {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}: pass a file to read it)" \
            if others else ""
        # a training run's folder (fastopd distill's run folder or its checkpoints/, a Trainer's output_dir) holds the
        # weights one level down
        subs = sorted((p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
                       and _holds_model_weights(p)), key=lambda n: [int(t) if t.isdigit() else t
                                                                    for t in re.split(r"(\d+)", n)])
        if subs:
            listed = ", ".join(subs[:5]) + (f" and {len(subs) - 5} more" if len(subs) > 5 else "")
            found += (f"; its subfolder {listed} holds model weights: pass it" if len(subs) == 1
                      else f"; its subfolders {listed} hold model weights: pass one")
        raise CheckpointError(f"{path}: folder holds no model weights (model*.safetensors with or without "
                              f"model.safetensors.index.json, or pytorch_model*.bin with or without "
                              f"pytorch_model.bin.index.json){found}")


def _holds_model_weights(folder: Path) -> bool:
    """Whether `_add_model_folder` would find weight files in `folder` (by their names only)."""
    try:
        return any(folder.glob("model*.safetensors")) or any(folder.glob("pytorch_model*.bin")) or \
            (folder / "model.safetensors.index.json").exists() or (folder / "pytorch_model.bin.index.json").exists()
    except OSError:
        return False


# Components that wrappers add to parameter names and that are never the model's own: torch.compile's
# OptimizedModule, FSDP (v1) and activation-checkpointing wrappers, anywhere in a name; DDP/DataParallel/DeepSpeed's
# "module." in front of every name (only when every name has it: a model may own a submodule called "module").
_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def unwrap_names(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` with the names wrappers add removed: the components "_orig_mod" (torch.compile),
    "_fsdp_wrapped_module" (FSDP), "_checkpoint_wrapped_module" (activation checkpointing) wherever they occur, then
    a leading "module." (DDP, DataParallel, DeepSpeed) while every name has it. `ckpt` itself if nothing changes.

    >>> unwrap_names(open_checkpoint({"module._orig_mod.lm_head.weight": torch.zeros(1)})).names()
    ['lm_head.weight']

    Raises:
        CheckpointError: two tensors would get the same name (e.g. both "module.x" and "x" held).
    """
    names = ckpt.names()
    new = {n: ".".join(c for c in n.split(".") if c not in _WRAPPER_PARTS) for n in names}
    removed = sorted({c for n in names for c in n.split(".") if c in _WRAPPER_PARTS})
    why = [f"the wrapper components {', '.join(repr(c) for c in removed)} are removed"] if removed else []
    lead = 0
    while new and all(v.startswith("module." * (lead + 1)) for v in new.values()):
        lead += 1
    if lead:
        new = {n: v[len("module.") * lead:] for n, v in new.items()}
        why.append(f"the leading {'module.' * lead!r} of every name is removed")
    mapping = {n: v for n, v in new.items() if v != n}
    return ckpt.renamed(mapping, " and ".join(why)) if mapping else ckpt


CheckpointLike = Union[str, os.PathLike, Mapping[str, torch.Tensor], Checkpoint]  # noqa: UP007 (py3.10 alias)


def _looks_like_safetensors(path: Path) -> bool:
    """A file of another name that starts as safetensors do (8-byte little-endian header length, then "{"): torch
    files start with a zip ("PK") or pickle (0x80) signature, so the two never meet."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False  # torch.load's error will name the file
    return len(head) == 9 and head[8:] == b"{" and struct.unpack("<Q", head[:8])[0] < (1 << 32)


def open_checkpoint(src: CheckpointLike) -> Checkpoint:
    """Open a checkpoint for tensor-by-tensor reading.

    Args:
        src: a model folder (`model.safetensors.index.json`, `model*.safetensors` shards,
            `pytorch_model.bin.index.json` or `pytorch_model*.bin` shards; no other file in it is read), a
            `.safetensors` file, a torch file holding a state dict, a `{name: tensor}` mapping, or an already
            opened `Checkpoint`.

    Names are the files' own (`unwrap_names` removes what wrappers add). A file not named `.safetensors` whose
    bytes start as a safetensors header is read as one.

    Raises:
        CheckpointError: the path does not exist, holds no tensors, a file is unreadable/truncated (the message
            names the file), or a folder holds numbered shards without their index and one is missing.
    """
    if isinstance(src, Checkpoint):
        return src
    if isinstance(src, Mapping):
        ckpt = Checkpoint("<in-memory state dict>")
        ckpt._add_tensors({k: v for k, v in src.items() if isinstance(v, torch.Tensor)}, "<memory>")
        return ckpt
    path = Path(src)
    ckpt = Checkpoint(str(path))
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        _add_model_folder(ckpt, path)
    elif path.suffix == ".safetensors" or _looks_like_safetensors(path):
        ckpt._add_safetensors(path)
    else:
        ckpt._add_tensors(_load_torch_file(path), str(path))
    if not ckpt.infos:
        raise CheckpointError(f"{path}: holds no tensors")
    return ckpt
