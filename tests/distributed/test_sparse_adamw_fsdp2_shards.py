"""SparseMaskedAdamW under FSDP2 when a rank's shard holds none of a parameter's selected coordinates (a mask of
other rows, or fewer rows than ranks), with bf16 parameters and fp32 masters, on 3 gloo ranks: the steps equal one
process's, and every rank's gathered state is the one-process state, step counts included."""

from __future__ import annotations

import pytest
import torch
from dist_harness import needs_fsdp2, run_ranks
from torch import nn

from fastopd.optim import SparseMaskedAdamW

pytestmark = needs_fsdp2

STEPS = 2


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    # 6 rows over 3 ranks (2 each), then 2 rows: the third rank holds none of the second layer's rows
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)


def _masks() -> dict[str, torch.Tensor]:
    first = torch.zeros(6, 5, dtype=torch.bool)
    first[4:, ::2] = True  # rows of the last rank only: ranks 0 and 1 (rank 0 writes checkpoints) select nothing
    return {"0.weight": first, "0.bias": torch.tensor([5]),
            "2.weight": torch.rand(2, 6, generator=torch.Generator().manual_seed(1)) < 0.5,
            "2.bias": torch.tensor([0, 1])}


def _train(model: nn.Module, dtype: torch.dtype) -> SparseMaskedAdamW:
    opt = SparseMaskedAdamW(list(model.named_parameters()), masks=_masks(), lr=1e-2, weight_decay=0.1)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(7, 5, generator=g).to(dtype), torch.randn(7, 2, generator=g)
        (model(x).float() - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def shards_worker(rank: int, world: int, dtype: torch.dtype) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = _model(dtype)
    fully_shard(model)
    opt = _train(model, dtype)
    return {"params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
            "full_state": opt.full_state_dict()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-masters"])
def test_shards_without_selected_coordinates_keep_the_one_process_state(dtype):
    """A shard that selected nothing skipped the step before its step count and master were made: gathering the
    state then failed on the masters (KeyError on the ranks that had them), and the rank that writes checkpoints
    recorded step 0 for a parameter the others had stepped, so a resume used the wrong bias correction."""
    ranks = run_ranks(shards_worker, 3, dtype)
    model = _model(dtype)
    want = _train(model, dtype)
    ref = want.state_dict()["state"]
    for rank, got in enumerate(ranks):
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["params"][name], p.detach(), rtol=1e-2, atol=1e-4)
        state = got["full_state"]["state"]
        assert set(state) == set(ref)
        for i, st in state.items():
            assert set(st) == set(ref[i]), (rank, i, set(st), set(ref[i]))
            for key, value in st.items():
                if key in ("step", "indices", "swallowed") or value is None:
                    assert value is None and ref[i][key] is None or torch.equal(value, ref[i][key]), (rank, i, key)
                else:  # FSDP2 averages the three ranks' gradients: within an ulp (of bf16) of one process's
                    torch.testing.assert_close(value, ref[i][key], rtol=1e-2, atol=1e-4,
                                               msg=lambda m, rank=rank, i=i, key=key: f"rank {rank} {i} {key}: {m}")
    resumed = SparseMaskedAdamW(list(_model(dtype).named_parameters()), masks=_masks(), lr=1e-2, weight_decay=0.1)
    resumed.load_full_state_dict(ranks[0]["full_state"])
    assert {i: float(st["step"]) for i, st in resumed.state_dict()["state"].items()} == {i: STEPS for i in ref}
