"""Atomic file writes, in one place: a file is either its old self or complete, never half-written.

The new content goes to a temporary file beside the target, is flushed to disk, and is renamed over the target
(`os.replace`, atomic on POSIX and Windows within one filesystem). On any error the temporary file is removed and
the target is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` for the caller to write; on success it is fsynced and renamed over
    `path`, on error removed. The temporary name is per process, so concurrent writers of one path from different
    processes do not share it; the file gets the caller's normal permissions (umask), unlike `mkstemp`'s 0600."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.unlink(missing_ok=True)  # a crashed writer's leftover would lend its mode
        tmp.touch()  # created with the umask's mode, which the result gets (setting the umask to read it would race)
        mode = stat.S_IMODE(tmp.stat().st_mode)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # some writers (safetensors) make their file 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def folder_write_problem(folder: str | os.PathLike) -> str | None:
    """Create `folder` (and its parents) and probe-write a temporary file in it, removed again: None when that
    works, else why not (for an output folder checked before any work is done)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return "exists and is not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create the folder ({exc.strerror or exc})"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"cannot write in the folder ({exc.strerror or exc})"
    return None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replaces the file at `path` by `text` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_text(obj: Any, indent: int | None = 2, *, nonfinite_as_text: bool = False,
              default: Callable[[Any], Any] | None = None) -> str:
    """`obj` as standard JSON text (ending in a newline): a NaN or infinite float is written as null (or, with
    `nonfinite_as_text`, as the string TOML spells it: "inf", "-inf", "nan"), where `json.dumps` writes the bare
    `NaN`/`Infinity` that strict readers (jq, JavaScript, pandas' default) refuse. `default` as in `json.dumps`."""
    def finite(x: Any) -> Any:
        if isinstance(x, float):
            return x if math.isfinite(x) else (str(x) if nonfinite_as_text else None)
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x
    return json.dumps(finite(obj), indent=indent, allow_nan=False, default=default) + "\n"


def save_figure_atomic(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Saves a matplotlib figure to `path` atomically, in the format its suffix names (the temporary file's name
    has another suffix, so the format is passed)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path
