"""OPDTrainer driven with random-weight Hugging Face models the way users build them (no download): masks that
name a tied head by its second name, token ids as NumPy integers or tensors, and activation checkpointing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastopd.train import OPDConfig, OPDTrainer

transformers = pytest.importorskip("transformers")

V = 64


def _llama(seed: int, tie: bool = True):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


def _qwen3(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.Qwen3ForCausalLM(cfg)


def _config(**kw) -> OPDConfig:
    base = dict(objective="rkl", lr=1e-2, num_samples=2, max_new_tokens=5, eos_token_id=2, pad_token_id=0)
    return OPDConfig(**{**base, **kw})


def _prompts(k: int = 0):
    g = torch.Generator().manual_seed(k)
    return [torch.randint(3, V, (4,), generator=g).tolist() for _ in range(3)]


def test_a_mask_on_a_tied_heads_second_name_masks_the_shared_weight():
    """A tied head's `lm_head.weight` is in `state_dict()` (what users build masks from) but not in
    `named_parameters()`: such a mask was refused as naming no optimized parameter."""
    student = _llama(0)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(V, 32, generator=g) < 0.3
    before = student.model.embed_tokens.weight.detach().clone()
    trainer = OPDTrainer(student, _llama(1), _config(masks={"lm_head.weight": mask}))
    trainer.step(_prompts())
    after = student.model.embed_tokens.weight.detach()
    assert torch.equal(after[~mask], before[~mask])  # the mask holds for the one tied weight
    assert not torch.equal(after[mask], before[mask])
    assert trainer.trainable_count() == int(mask.sum()) + sum(
        p.numel() for n, p in student.named_parameters() if n != "model.embed_tokens.weight")


def test_both_names_of_a_tied_weight_with_different_masks_are_refused():
    student = _llama(0)
    a, b = torch.zeros(V, 32, dtype=torch.bool), torch.ones(V, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"lm_head.weight.*model.embed_tokens.weight.*differ"):
        OPDTrainer(student, _llama(1), _config(masks={"lm_head.weight": a, "model.embed_tokens.weight": b}))
    OPDTrainer(student, _llama(1), _config(masks={"lm_head.weight": a, "model.embed_tokens.weight": a.clone()}))
    OPDTrainer(student, _llama(1), _config(masks={"lm_head.weight": None, "model.embed_tokens.weight": None}))
    with pytest.raises(ValueError, match=r"lm_head.weight.*model.embed_tokens.weight.*differ"):
        OPDTrainer(student, _llama(1), _config(masks={"lm_head.weight": None, "model.embed_tokens.weight": a}))


@pytest.mark.parametrize("kind", [np.int64, torch.tensor], ids=["numpy", "tensor"])
def test_token_ids_are_taken_as_the_rollout_engine_takes_them(kind):
    """RolloutEngine takes NumPy integers and integer tensors as ids, and the docs say OPDConfig takes them as it
    does; OPDConfig refused them ('must be None, a non-negative int ...')."""
    cfg = _config(eos_token_id=[kind(2), 5], pad_token_id=kind(0))
    assert cfg.eos_token_id == [2, 5] and type(cfg.eos_token_id[0]) is int and type(cfg.pad_token_id) is int
    assert _config(eos_token_id=kind(2)).eos_token_id == 2
    for bad in (torch.tensor(2.0), torch.tensor(True), np.float64(2.0)):
        with pytest.raises(ValueError, match="eos_token_id"):
            _config(eos_token_id=bad)
        with pytest.raises(ValueError, match="pad_token_id"):
            _config(pad_token_id=bad)


def test_activation_checkpointing_on_the_student_takes_the_same_steps():
    def run(checkpointing):
        student = _qwen3(0)
        if checkpointing:
            student.gradient_checkpointing_enable()
        trainer = OPDTrainer(student, _qwen3(1), _config())
        trainer.train(_prompts, 2, progress=False)
        return [m["loss"] for m in trainer.history], [p.detach().clone() for p in student.parameters()]

    (loss_a, params_a), (loss_b, params_b) = run(False), run(True)
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
