"""`fastopd.integrations.hf.distillation_loss` with an FSDP1- or FSDP2-wrapped student (per-layer units, the LM
head in the root unit, as accelerate wraps a Hugging Face model), on 2 gloo ranks that each see the same batch: the
losses of two SGD steps equal one process's. The head's weight is a shard before the student's forward (a DTensor
under FSDP2), and only the forward's outputs carry FSDP1's backward hooks."""

from __future__ import annotations

import pytest
import torch
from dist_harness import needs_fsdp2, run_ranks

transformers = pytest.importorskip("transformers")

from fastopd.integrations.hf import distillation_loss  # noqa: E402

STEPS = 2


def _models():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg), transformers.LlamaForCausalLM(cfg).eval()


def _batch(step: int) -> torch.Tensor:
    return torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(10 + step))


def _train(student, teacher) -> list[float]:
    """The losses of STEPS SGD steps (a large rate: a wrong gradient changes the next loss)."""
    opt = torch.optim.SGD(student.parameters(), lr=50.0)
    out = []
    for step in range(STEPS):
        loss = distillation_loss(student, teacher, _batch(step), divergence="fkl")
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(float(loss))
    return out


def fsdp_worker(rank: int, world: int, kind: str) -> list[float]:
    student, teacher = _models()
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in student.model.layers:
            fully_shard(layer)
        fully_shard(student)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        student = FSDP(student, auto_wrap_policy=ModuleWrapPolicy({type(student.model.layers[0])}),
                       use_orig_params=False, device_id=torch.device("cpu"))  # its head is a 1-D view with True
    return _train(student, teacher)


@needs_fsdp2
@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_fsdp_student_trains_as_in_one_process(kind):
    """Taking the head before the student's forward got its shard (FSDP2: 'student_weight is a DTensor'), and
    the student's final hidden states taken by a hook on the decoder are not among the forward's outputs, so
    FSDP1's backward failed ('expected to be in states [FORWARD_BACKWARD]', or an in-place modified view)."""
    ranks = run_ranks(fsdp_worker, 2, kind)
    ref = _train(*_models())
    assert ref[1] != pytest.approx(ref[0], rel=1e-3)  # the step changed the student
    for got in ranks:
        assert got == pytest.approx(ref, rel=1e-4)
