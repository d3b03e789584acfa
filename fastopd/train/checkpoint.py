"""Atomic training checkpoints: model, optimizer, RNG states, step and config.

A checkpoint is a folder ``<dir>/step_<k>/`` holding ``model.safetensors`` (the student's state dict),
``optimizer.pt`` (the optimizer's state dict, masks included for SparseMaskedAdamW) and ``trainer.pt`` (step,
config, RNG states, metric history and anything else the trainer adds). It is written into a temporary sibling
folder, every file flushed to disk, then renamed into place in one `os.rename`; the ``latest`` pointer is
replaced the same way. A crash at any point leaves either the previous checkpoint or the new one, never a
partial one, and `latest_checkpoint` ignores leftover temporary folders; `remove_stale_temporaries` (run at every
save, and by `fastopd distill` when it starts) deletes those that no live process is writing.

``manifest.json``, written last, lists the files with their sizes: a folder whose files are missing or of other
sizes (damaged after the fact, or left by something else) is not a complete checkpoint, which a stat of each
file tells, without reading them; `latest_checkpoint` passes over it, with a warning, to the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import stat
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from fastopd._io import write_text_atomic

MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "fastopd.checkpoint.v1"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
LATEST = "latest"
_ASIDE_PREFIX = ".{name}.old-"  # a step folder moved aside while its step is saved again
_DELETE_PREFIX = ".deleting-"  # a pruned folder, renamed out of sight before it is removed
_STEP_DIR = re.compile(r"^step_(\d+)$")
# What a save leaves behind when its process is killed, by the names save_checkpoint, _remove and
# fastopd._io.atomic_path give them (pid: the writer's process id; 12 hex digits: its random part).
_TMP_DIR = re.compile(r"^\.step_\d+\.tmp-(?P<pid>\d+)-[0-9a-f]{12}$")  # a checkpoint being written
_ASIDE_DIR = re.compile(r"^\.(?P<step>step_\d+)\.old-(?P<pid>\d+)-[0-9a-f]{12}$")  # moved aside by a re-save
_DELETE_DIR = re.compile(r"^\.deleting-(step_\d+|\.step_\d+\.old-\d+-[0-9a-f]{12})-[0-9a-f]{12}$")  # being pruned
_LATEST_TMP = re.compile(r"^\." + LATEST + r"\.(?P<pid>\d+)\.partial$")  # the latest pointer being replaced


def rng_state() -> dict[str, Any]:
    """The states of torch's CPU (and, if initialized, CUDA), Python's and numpy's global RNGs.

    Only tensors and plain Python values, so the result loads with `torch.load(weights_only=True)`.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _py_state_to_plain(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    except ImportError:  # numpy is optional for this purpose
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by `rng_state` (CUDA: those of the GPUs visible now; a saved state of a GPU
    this process does not see is skipped)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_py_state_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU the saving process saw; where fewer are visible now, the others have no generator
        torch.cuda.set_rng_state_all(list(state["cuda"])[: torch.cuda.device_count()])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))


def _py_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_plain(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _plain_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, with storage-sharing tensors (tied weights) cloned so safetensors accepts them."""
    out, seen = {}, set()
    for name, t in state.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.device.type) if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[name] = t.to("cpu").contiguous()
    return out


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of a checkpoint folder (from its ``step_<k>`` name), e.g. of `latest_checkpoint`'s answer."""
    m = _STEP_DIR.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint folder (step_<k>)")
    return int(m.group(1))


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write checkpoint `step` under `directory` atomically and point ``latest`` at it.

    Args:
        model_state: the student's state dict (tensors; tied weights are fine).
        optimizer_state: the optimizer's state dict, or None.
        trainer_state: plain values and tensors (step, config dict, RNG states, history, ...).
        keep: if given, delete all but the newest `keep` checkpoints afterwards.
    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save_file

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # the mode of any new folder (the umask's), which the checkpoint keeps; mkdtemp's would be 0700
    try:
        save_file(_plain_state_dict(model_state), str(tmp / MODEL_FILE), metadata={"step": str(step)})
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        torch.save({**trainer_state, "step": step}, tmp / TRAINER_FILE)
        files = {f.name: f.stat().st_size for f in tmp.iterdir()}  # what a complete copy of this folder holds
        (tmp / MANIFEST_FILE).write_text(json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": files}))
        file_mode = stat.S_IMODE(tmp.stat().st_mode) & 0o666  # the umask's, as the folder was made with it
        for f in tmp.iterdir():
            os.chmod(f, file_mode)  # safetensors writes its file 0600
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old one aside first (rename over a non-empty dir fails);
            # a crash between the two renames leaves it aside, and latest_checkpoint moves it back
            old = root / f"{_ASIDE_PREFIX.format(name=final.name)}{os.getpid()}-{uuid.uuid4().hex[:12]}"
            os.rename(final, old)
            os.rename(tmp, final)
            _remove(old)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / LATEST, final.name + "\n")
    _fsync_dir(root)
    if keep is not None and keep > 0:
        # The newest `keep` up to this step stay; folders of higher steps (another run's, in a reused folder) and
        # folders that are no complete checkpoint are left alone.
        older = [p for p in list_checkpoints(root) if checkpoint_step(p) < step]
        for old in older[: max(0, len(older) - (keep - 1))]:
            _remove(old)
    remove_stale_temporaries(root)  # what a crash in an earlier save or removal left
    return final


def _writer_alive(pid: int) -> bool:
    """Whether process `pid` (another than this one) may still be writing: it exists on this machine."""
    if pid == os.getpid():  # this process writes one checkpoint at a time: its own leftovers are stale
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process (PermissionError), or a pid this OS cannot name
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete what interrupted saves left in `directory`: temporary checkpoint folders
    (``.step_<k>.tmp-<pid>-<hex>``) and ``latest`` pointers (``.latest.<pid>.partial``) of processes that no longer
    run, folders a prune was deleting, and step folders a re-save moved aside once their step is complete again
    (else `latest_checkpoint` moves them back). Nothing else is touched: no ``step_<k>`` folder, no other name.

    Returns:
        The paths removed.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        if p.is_symlink():
            continue
        if p.is_dir() and _stale_folder(root, p.name):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and (m := _LATEST_TMP.match(p.name)) and not _writer_alive(int(m["pid"])):
            p.unlink(missing_ok=True)
        else:
            continue
        if not p.exists():
            removed.append(p)
    return removed


def _stale_folder(root: Path, name: str) -> bool:
    if _DELETE_DIR.match(name):
        return True
    if m := _TMP_DIR.match(name):
        return not _writer_alive(int(m["pid"]))
    if m := _ASIDE_DIR.match(name):  # kept while its step has no complete copy: latest_checkpoint moves it back
        return not _writer_alive(int(m["pid"])) and checkpoint_problem(root / m["step"]) is None
    return False


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder: renamed out of sight first (one atomic step), so that a crash while its files
    go never leaves a part of it that looks like a checkpoint."""
    gone = folder.parent / f"{_DELETE_PREFIX}{folder.name}-{uuid.uuid4().hex[:12]}"
    try:
        os.rename(folder, gone)
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """None when `path` is a complete checkpoint folder, else why not: a file missing, or of another size than its
    manifest says (only stats, no file is read but the manifest). Folders written before manifests existed need
    only their model and trainer files."""
    p = Path(path)
    for name in (MODEL_FILE, TRAINER_FILE):
        if not (p / name).is_file():
            return f"it has no {name}"
    manifest = p / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        info = json.loads(manifest.read_text())
        files = info["files"] if info.get("format") == MANIFEST_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        files = None
    if not isinstance(files, dict):
        return f"its {MANIFEST_FILE} is not a {MANIFEST_FORMAT} manifest"
    for name, size in files.items():
        f = p / str(name)
        if not f.is_file():
            return f"it has no {name} (its {MANIFEST_FILE} lists one)"
        if f.stat().st_size != size:
            return f"its {name} has {f.stat().st_size} bytes, not the {size} written"
    return None


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under `directory`, oldest step first (temporary folders and folders that
    `checkpoint_problem` rejects are skipped)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if checkpoint_problem(p) is None]


def _restore_moved_aside(root: Path, target: Path) -> None:
    """Move back a complete checkpoint that a re-save of its step moved aside and a crash left there (the new
    version never reached its place, so the old one is the newest complete one)."""
    for aside in sorted(root.glob(_ASIDE_PREFIX.format(name=target.name) + "*")):
        if checkpoint_problem(aside) is None:
            try:
                os.rename(aside, target)
            except OSError:  # another rank moved it back first
                pass
            return


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `directory` (the ``latest`` pointer, else the highest complete step),
    or None. A pointer to a folder that is no complete checkpoint is passed over with a warning naming why."""
    root = Path(directory)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if _STEP_DIR.match(target.name):
            if not target.exists():
                _restore_moved_aside(root, target)
            why = checkpoint_problem(target) if target.exists() else None
            if why is None and target.exists():
                return target
            found = list_checkpoints(root)
            if why is not None:
                warnings.warn(f"checkpoint {target} is not complete ({why}): using "
                              f"{found[-1] if found else 'none'} instead", RuntimeWarning, stacklevel=2)
            return found[-1] if found else None
    found = list_checkpoints(root)
    # no pointer (a folder of an older fastopd, or one copied without it): a newer step folder that is not complete
    # is passed over as with a pointer, and said so
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))) \
        if root.is_dir() else []
    if steps and (not found or steps[-1][1] != found[-1]):
        newest = steps[-1][1]
        warnings.warn(f"checkpoint {newest} is not complete ({checkpoint_problem(newest)}): using "
                      f"{found[-1] if found else 'none'} instead", RuntimeWarning, stacklevel=2)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint folder: ``{"model": state dict, "optimizer": state dict or None, "trainer": dict}``.

    Raises:
        FileNotFoundError: the folder or one of its required files is missing.
        ValueError: the folder is no complete checkpoint (a file of another size than written, or unreadable).
    """
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / MODEL_FILE).is_file() and ((p / LATEST).is_file() or list_checkpoints(p)):
        raise FileNotFoundError(f"{p} is a folder of checkpoints, not one checkpoint: pass one of its step_<k> "
                                "folders (latest_checkpoint gives the newest)")
    for name in (MODEL_FILE, TRAINER_FILE):
        if not (p / name).is_file():
            raise FileNotFoundError(f"checkpoint {p} has no {name}")
    why = checkpoint_problem(p)
    if why is not None:
        raise ValueError(f"checkpoint {p} is not complete: {why}")
    try:
        model = load_file(str(p / MODEL_FILE), device=str(map_location))
        opt_path = p / OPTIMIZER_FILE
        optimizer = torch.load(opt_path, map_location=map_location, weights_only=True) if opt_path.is_file() else None
        trainer = torch.load(p / TRAINER_FILE, map_location="cpu", weights_only=True)
    except (torch.cuda.OutOfMemoryError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 (safetensors and pickle raise their own kinds of error)
        raise ValueError(f"checkpoint {p} does not load: {type(exc).__name__}: {str(exc)[:200]}") from exc
    return {"model": model, "optimizer": optimizer, "trainer": trainer}
