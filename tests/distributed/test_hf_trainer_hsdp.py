"""OPDTrainer under HSDP on 2 gloo ranks with shard groups of one rank (`hsdp_shard_size=1`: the default on
nodes of one GPU each, torchrun's LOCAL_WORLD_SIZE) and a Hugging Face Qwen3 student and teacher: it runs, the
ranks stay identical, and it takes the one-process steps on the same global batch."""

from __future__ import annotations

import pytest
import torch
from dist_harness import needs_fsdp2, run_ranks

from fastopd.train import OPDConfig, OPDTrainer

transformers = pytest.importorskip("transformers")


def _qwen3(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=64)
    return transformers.Qwen3ForCausalLM(cfg)


def _source(k: int):
    g = torch.Generator().manual_seed(k)
    return [torch.randint(3, 64, (4,), generator=g).tolist() for _ in range(4)]


def worker(rank: int, world: int) -> dict:
    # top_k=1: greedy rollouts, the same data whatever the world size
    cfg = OPDConfig(objective="rkl", lr=1e-3, num_samples=2, max_new_tokens=4, top_k=1, eos_token_id=2,
                    pad_token_id=0, track_density=False, parallel="hsdp" if world > 1 else "none",
                    hsdp_shard_size=1 if world > 1 else None)
    trainer = OPDTrainer(_qwen3(0), _qwen3(1), cfg)
    trainer.train(_source, 2, progress=False)
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    return {"params": {n: full(p).detach().clone() for n, p in trainer.student.named_parameters()},
            "loss": [m["loss"] for m in trainer.history], "teacher_sharded": trainer.teacher_sharded}


@needs_fsdp2
def test_hsdp_with_one_rank_shard_groups_equals_one_process():
    """A teacher sharded over a one-rank shard group failed at its first scoring, under inference mode
    (FSDP2's one-rank gather: 'Inference tensors do not track version counter'); it is kept whole on each rank,
    which a one-rank shard would hold anyway."""
    ranks = run_ranks(worker, 2)
    ref = worker(0, 1)
    assert ranks[0]["teacher_sharded"] is False
    for name, p in ref["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        torch.testing.assert_close(ranks[0]["params"][name], p, rtol=1e-5, atol=2e-6)
    assert ranks[0]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
