"""Run a test body on `world_size` CPU processes with the gloo backend, and collect what each rank returns.

Every process group gets a timeout, and the parent gives the whole job a deadline: a rank that raises makes
`run_ranks` raise with that rank's traceback, and a job that hangs is killed, never waited on forever.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

PG_TIMEOUT = timedelta(seconds=60)


def _entry(rank: int, world_size: int, folder: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size,
                            timeout=PG_TIMEOUT)
    try:
        out = fn(rank, world_size, *args)
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(folder, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, deadline_s: float = 240.0) -> list:
    """[fn(rank, world_size, *args) for each rank], each run in its own process inside one gloo group.

    `fn` must be importable (a module-level function) and return something `torch.save` can write."""
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.start_processes(_entry, args=(world_size, folder, fn, args), nprocs=world_size, join=False,
                                 start_method="spawn")
        end = time.monotonic() + deadline_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > end:
                    raise TimeoutError(f"{world_size}-rank job still running after {deadline_s:.0f} s")
        except ProcessException as exc:  # a rank raised, or died of a signal
            errs = [open(os.path.join(folder, n)).read() for n in sorted(os.listdir(folder)) if n.endswith(".err")]
            raise AssertionError("a rank raised:\n" + ("\n".join(errs) or str(exc))) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
