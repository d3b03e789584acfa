"""Data parallelism for OPDTrainer on torch.distributed: DDP or FSDP2 (`fully_shard`), under torchrun.

The trainer runs the student's training forward and the fused loss inside one module call (`LossModule`), so
DDP's reducer and FSDP2's unshard/reshard hooks see every use of the student's weights, LM head included. Under
FSDP2 each decoder layer is its own FSDP group, gathered for its forward and backward through a registered
forward method (the adapters run layers functionally, through `call_layer`); the root group (embeddings, final
norm, LM head) is gathered for the whole micro-batch, so the loss never sees a sharded or stale head (a DTensor
head reaching `fused_linear_divergence` is refused there). Generation, evaluation and self-distillation scoring,
which read the weights outside any module call, run inside `unsharded(...)` (every group gathered).

A teacher distinct from the student is sharded the same way (`shard_frozen`) and scored through `run_frozen`:
its root group is gathered for the scoring call and each decoder layer for its own forward only, so no rank
ever holds the whole teacher.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn

MODES = ("auto", "none", "ddp", "fsdp2", "hsdp")


def default_backend() -> str:
    """The process-group backend `init_from_env` asks for, keyed by device: with CUDA, gloo for CPU tensors and NCCL
    for CUDA ones (so a run whose models stay on the CPU of a GPU machine works: NCCL has no CPU collectives);
    without, gloo."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(timeout: timedelta | None = None) -> bool:
    """Initialize the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)
    when WORLD_SIZE > 1 and none exists yet, with `default_backend()` (and, where CUDA has a device for it, the
    current CUDA device set to LOCAL_RANK). Returns whether a process group of more than one rank is in place."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return False
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(default_backend(), **kwargs)
    return dist.get_world_size() > 1


def _run_layer(layer: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(layer, *args, **kwargs)


ROOT_CALL = "fastopd_root_call"  # the registered forward method a frozen sharded module is run through


def _run_root(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def is_dtensor(t: Any) -> bool:
    """Whether `t` is a torch.distributed DTensor (an FSDP2 or tensor-parallel parameter); cheap for plain tensors."""
    if not isinstance(t, torch.Tensor) or type(t) in (torch.Tensor, nn.Parameter):
        return False
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A full (replicated) tensor as a DTensor placed like the DTensor `like` (this rank keeps its part, no
    communication), in `like`'s dtype and on its device."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (under no_grad its storage: updates write through), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


class LossModule(nn.Module):
    """`forward(*args) = fn(*args)` with `student` as a submodule: the training forward and the loss in one module
    call, the unit DDP and FSDP2 wrap."""

    def __init__(self, student: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.student = student
        self._fn = fn

    def forward(self, *args: Any) -> Any:
        return self._fn(*args)


@dataclass
class DataParallel:
    """How this process takes part in data-parallel training: mode "none" (one process), "ddp", "fsdp2" (every
    parameter sharded over all ranks) or "hsdp" (sharded within groups of `shard_size` ranks, replicated across
    the groups: FSDP2 over a 2-D (replicate, shard) mesh)."""

    mode: str
    rank: int = 0
    world_size: int = 1
    shard_size: int = 0  # hsdp: ranks per shard group
    device_type: str = "cpu"  # of the parameters sharded: `wrap` sets it from the module it wraps

    @classmethod
    def resolve(cls, mode: str, shard_size: int | None = None) -> DataParallel:
        """"auto": DDP when a process group of more than one rank exists (or torchrun's environment asks for one,
        which is then initialized), else one process. "ddp"/"fsdp2"/"hsdp" need such a group. Under "hsdp"
        `shard_size` (default: torchrun's LOCAL_WORLD_SIZE, the ranks of one node) must divide the world size."""
        if mode not in MODES:
            raise ValueError(f"parallel: must be one of {MODES}, got {mode!r}")
        if mode == "none":
            return cls("none")
        if not init_from_env():
            if mode == "auto":
                return cls("none")
            raise ValueError(f"parallel={mode!r} needs torch.distributed with more than one rank: launch with "
                             "`torchrun --nproc-per-node N ...` (or initialize a process group first)")
        import torch.distributed as dist

        world = dist.get_world_size()
        if mode != "hsdp":
            return cls("ddp" if mode == "auto" else mode, dist.get_rank(), world)
        shard = int(shard_size or os.environ.get("LOCAL_WORLD_SIZE", world))
        if shard < 1 or world % shard:
            raise ValueError(f"parallel='hsdp': the shard group size {shard} must divide the world size {world}")
        return cls("hsdp", dist.get_rank(), world, shard)

    @property
    def sharded(self) -> bool:
        """Whether parameters are FSDP2 DTensors here ("fsdp2" or "hsdp")."""
        return self.mode in ("fsdp2", "hsdp")

    @functools.cached_property
    def mesh(self):
        """The device mesh parameters are sharded over: None (FSDP2's default, every rank) or HSDP's 2-D
        (replicate, shard) mesh, on `device_type` (the device of the parameters `wrap` shards; built at its first
        use, in `wrap`)."""
        if self.mode != "hsdp":
            return None
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device_type, (self.world_size // self.shard_size, self.shard_size),
                                mesh_dim_names=("replicate", "shard"))

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module, layers: Sequence[nn.Module] = ()) -> nn.Module:
        """DDP(module); or under FSDP2, after broadcasting rank 0's parameters and buffers (DDP does the same),
        `fully_shard` of each of `layers` (decoder layers that run through `fastopd.rollout.adapters.call_layer`:
        each is gathered for its own forward and backward and freed after) and then of `module` (the rest:
        embeddings, final norm, LM head); or the module itself."""
        if not self.active:
            return module
        import torch.distributed as dist

        dev = next(module.parameters()).device
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(module, device_ids=[dev] if dev.type == "cuda" else None)
        if "mesh" not in self.__dict__:  # the mesh is built on the device of the first module sharded (the student)
            self.device_type = dev.type
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        from fastopd.rollout.adapters import LAYER_FORWARD

        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t, src=0)

        for layer in layers:
            setattr(layer, LAYER_FORWARD, functools.partial(_run_layer, layer))
            fully_shard(layer, mesh=self.mesh)
            register_fsdp_forward_method(layer, LAYER_FORWARD)
        return fully_shard(module, mesh=self.mesh)

    def shard_frozen(self, module: nn.Module, layers: Sequence[nn.Module] = ()) -> bool:
        """Under FSDP2, shards a module that never trains (a teacher) as `wrap` does, its layers always run through
        their FSDP forward (each gathered for its own forward, also under inference mode) and the module itself
        through `run_frozen`. Returns whether it did (False outside FSDP2: DDP keeps a replica per rank; and under
        HSDP with shard groups of one rank, where every rank would hold the whole module anyway, and FSDP2's
        one-rank gather, first run under the inference mode of scoring, fails: "Inference tensors do not track
        version counter")."""
        if not self.sharded or (self.mode == "hsdp" and self.shard_size == 1):
            return False
        from torch.distributed.fsdp import register_fsdp_forward_method

        from fastopd.rollout.adapters import LAYER_ALWAYS_ROUTED

        self.wrap(module, layers)
        for layer in layers:
            setattr(layer, LAYER_ALWAYS_ROUTED, True)
        setattr(module, ROOT_CALL, _run_root)
        register_fsdp_forward_method(module, ROOT_CALL)
        return True

    def run_frozen(self, module: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` for a module sharded by `shard_frozen`: inside its root FSDP forward (so its root
        group is gathered and it is the FSDP root; the layers gather themselves), resharded after. Just the call for
        any other module."""
        root_call = module.__dict__.get(ROOT_CALL)
        if root_call is None:
            return fn(*args, **kwargs)
        try:
            return root_call(fn, *args, **kwargs)
        finally:
            module.reshard()  # an FSDP root keeps its group gathered after forward (for a backward that never comes)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) `t` in place over the ranks; returns it."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def sum_over_shards_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) `t` over the ranks that hold different shards of the parameters: all of them under
        FSDP2, one shard group under HSDP (its replicas hold the same); a no-op otherwise."""
        if self.sharded:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.mesh["shard"].get_group() if self.mesh else None)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def no_sync(self, module: nn.Module, last: bool):
        """Skip DDP's gradient all-reduce on every micro-batch but the last (FSDP2 reduces each one)."""
        if self.mode == "ddp" and not last:
            return module.no_sync()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def unsharded(self, module: nn.Module):
        """Under FSDP2 (and HSDP), the full parameters on every rank for the duration (generation, self-scoring);
        resharded after. A no-op otherwise."""
        if not self.sharded:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
        for m in sharded:
            m.unshard()
        try:
            yield
        finally:
            for m in sharded:
                m.reshard()

    # ------------------------------------------------------------------ world-size-independent state

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with full (gathered) tensors on every rank: a checkpoint any world size loads."""
        state = model.state_dict()
        if not self.sharded:
            return state
        return {k: (v.full_tensor() if is_dtensor(v) else v) for k, v in state.items()}

    def load_full_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list, list]:
        """Load full tensors; under FSDP2 each rank keeps its shard. Returns (missing, unexpected) keys."""
        if self.sharded:
            own = model.state_dict()
            state = {k: (shard_like(v, own[k]) if k in own and is_dtensor(own[k]) else v) for k, v in state.items()}
        return model.load_state_dict(state, strict=False)

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """`optimizer.state_dict()` with every DTensor state gathered to a full tensor (FSDP2's dense AdamW
        moments), or with shard-local sparse state turned global (`SparseMaskedAdamW`)."""
        if not self.sharded:
            return optimizer.state_dict()
        if hasattr(optimizer, "full_state_dict"):
            return optimizer.full_state_dict()
        sd = optimizer.state_dict()
        sd["state"] = {k: {n: (v.full_tensor() if is_dtensor(v) else v) for n, v in st.items()}
                       for k, st in sd["state"].items()}
        return sd

    def load_full_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a state saved by `full_optimizer_state` (from any world size)."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        if hasattr(optimizer, "load_full_state_dict"):
            optimizer.load_full_state_dict(state)
            return
        optimizer.load_state_dict(state)
        for group in optimizer.param_groups:
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                for n, v in st.items():
                    if is_dtensor(p) and isinstance(v, torch.Tensor) and not is_dtensor(v) and v.shape == p.shape:
                        st[n] = shard_like(v, p)
