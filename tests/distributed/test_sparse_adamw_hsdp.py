"""SparseMaskedAdamW on parameters sharded by FSDP2 over a 2-D mesh (HSDP: replicate x shard, 4 gloo ranks) and
over one dimension of it refused otherwise: the steps equal one process's on the same data, the state checkpoint
gathered there loads in one process, and a placement the optimizer cannot shard by rows raises on every rank."""

from __future__ import annotations

import torch
from dist_harness import needs_fsdp2, run_ranks
from torch import nn

from fastopd.optim import SparseMaskedAdamW

pytestmark = needs_fsdp2

STEPS = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 5))  # 7 and 5 rows: uneven shards over 2


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {n: torch.rand(p.shape, generator=g) < 0.4 for n, p in model.named_parameters() if p.dim() == 2}


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(9, 12, generator=g), torch.randn(9, 5, generator=g)


def _train(model: nn.Module) -> SparseMaskedAdamW:
    opt = SparseMaskedAdamW(list(model.named_parameters()), masks=_masks(model), lr=1e-2, weight_decay=0.1)
    for step in range(STEPS):
        x, y = _data(step)  # the same batch on every rank: the averaged gradient is one process's
        (model(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def hsdp_worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    fully_shard(model, mesh=mesh)
    placements = {str(tuple(p.placements)) for p in model.parameters()}
    opt = _train(model)
    return {"params": {n: _full(p).detach().clone() for n, p in model.named_parameters()},
            "placements": sorted(placements), "full_state": opt.full_state_dict()}


def refused_worker(rank: int, world: int) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    w = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Replicate()]))
    try:
        SparseMaskedAdamW([("w", w)], masks={"w": (torch.arange(24) % 3 == 0).reshape(6, 4)})
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_hsdp_2x2_equals_one_process_and_its_state_loads_in_one():
    ranks = run_ranks(hsdp_worker, 4)
    model = _model()
    want = _train(model)
    for rank, got in enumerate(ranks):
        assert got["placements"] == ["(Replicate(), Shard(dim=0))"], got["placements"]
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["params"][name], p.detach(), rtol=1e-6, atol=1e-7,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")
    # The gathered state (global indices) is the one-process state, and resumes there exactly.
    fresh = _model()
    resumed = SparseMaskedAdamW(list(fresh.named_parameters()), masks=_masks(fresh), lr=1e-2, weight_decay=0.1)
    resumed.load_full_state_dict(ranks[3]["full_state"])
    ref = want.state_dict()["state"]
    for i, st in resumed.state_dict()["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, ref[i][key], rtol=1e-6, atol=1e-7, msg=lambda m, i=i, key=key:
                                           f"state {i} {key}: {m}")


def test_a_placement_not_sharded_by_rows_is_refused_on_every_rank():
    for message in run_ranks(refused_worker, 2):
        assert "Shard(0)" in message and "Replicate()" in message, message
