"""Atomic file writes, in one place: a file is either its old self or complete, never half-written.

The new content goes to a temporary file beside the target, is flushed to disk, and is renamed over the target
(`os.replace`, atomic on POSIX and Windows within one filesystem). On any error the temporary file is removed and
the target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path


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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replaces the file at `path` by `text` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
