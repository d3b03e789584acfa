"""Run a test body on `world_size` CPU processes with the gloo backend, and collect what each rank returns.

Every process group gets a timeout, and the parent gives the whole job a deadline: a rank that raises makes
`run_ranks` raise with that rank's traceback, and a job that hangs is killed, never waited on forever. The ranks
meet on a TCP store (as under torchrun) and pass a barrier before tearing the group down. A rank killed by a
signal fails the job, except after every rank has written its result: torch's gloo teardown at interpreter exit
has been seen to abort ("terminate called without an active exception") on this loaded 2-core machine, after
the work under test was done and saved.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    FSDP2_MISSING = None
except ImportError as exc:  # older torch: the FSDP2 tests skip
    FSDP2_MISSING = f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard): {exc}"
needs_fsdp2 = pytest.mark.skipif(FSDP2_MISSING is not None, reason=str(FSDP2_MISSING))

PG_TIMEOUT = timedelta(seconds=60)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, folder: str, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=PG_TIMEOUT)
    try:
        out = fn(rank, world_size, *args)
        path = os.path.join(folder, f"rank{rank}.pt")
        torch.save(out, path + ".tmp")
        os.replace(path + ".tmp", path)  # a result file is complete or absent
        dist.barrier()
    except BaseException:
        with open(os.path.join(folder, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, deadline_s: float = 240.0) -> list:
    """[fn(rank, world_size, *args) for each rank], each run in its own process inside one gloo group.

    `fn` must be importable (a module-level function) and return something `torch.save` can write."""
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.start_processes(_entry, args=(world_size, folder, _free_port(), fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
        results = [os.path.join(folder, f"rank{r}.pt") for r in range(world_size)]
        end = time.monotonic() + deadline_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > end:
                    raise TimeoutError(f"{world_size}-rank job still running after {deadline_s:.0f} s")
        except ProcessRaisedException as exc:
            errs = [open(os.path.join(folder, n)).read() for n in sorted(os.listdir(folder)) if n.endswith(".err")]
            raise AssertionError("a rank raised:\n" + ("\n".join(errs) or str(exc))) from None
        except ProcessExitedException as exc:
            if not all(os.path.exists(p) for p in results):
                raise AssertionError(f"a rank died before writing its result: {exc}") from None
            warnings.warn(f"a rank died at teardown after every rank wrote its result ({exc})", stacklevel=2)
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(p, weights_only=False) for p in results]
