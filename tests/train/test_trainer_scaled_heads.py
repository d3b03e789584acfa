"""OPDTrainer with Hugging Face models whose heads scale or soft-cap their logits (Gemma 2's final soft-cap,
Granite's logits_scaling), through the rollout engine's generic adapter: the loss is the divergence of the models'
own logits (their forward's, in float64), not of the raw head products."""

from __future__ import annotations

import pytest
import torch

from fastopd.train import OPDConfig, OPDTrainer

transformers = pytest.importorskip("transformers")

V = 64
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, initializer_range=0.3)


def _gemma2(seed: int, cap: float | None = 2.0):
    torch.manual_seed(seed)
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **COMMON, head_dim=16, sliding_window=4, final_logit_softcapping=cap, attn_logit_softcapping=5.0))


def _granite(seed: int, scaling: float):
    torch.manual_seed(seed)
    return transformers.GraniteForCausalLM(transformers.GraniteConfig(
        **COMMON, logits_scaling=scaling, embedding_multiplier=1.5, residual_multiplier=0.7))


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in (4, 6, 3)]


def _reference(trainer, batch) -> torch.Tensor:
    """The objective from the models' own forward logits (float64, at the completion positions)."""
    cfg = trainer.config
    p, h = batch.prompt_width, batch.horizon
    mask = batch.attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = []
    with torch.no_grad():
        for model in (trainer.engine.student.model, trainer.engine.teacher.model):
            logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions).logits
            out.append(torch.log_softmax(logits[:, p - 1 : p - 1 + h].double() / cfg.temperature, -1))
    ls, lt = out
    m = batch.completion_mask
    if cfg.objective == "rkl":
        per_token = (ls.exp() * (ls - lt)).sum(-1)
    else:
        per_token = (lt.exp() * (lt - ls)).sum(-1)
    return (per_token * m).sum() / m.sum()


@pytest.mark.parametrize("pair,objective,temperature", [
    pytest.param("gemma2", "fkl", 1.0, id="gemma2-softcap-fkl"),
    pytest.param("gemma2", "rkl", 1.3, id="gemma2-softcap-rkl-T1.3"),
    pytest.param("granite", "fkl", 0.8, id="granite-scales-0.25-and-0.5-fkl-T0.8"),
])
def test_loss_is_the_divergence_of_the_models_own_logits(pair, objective, temperature):
    student, teacher = (_gemma2(0), _gemma2(1)) if pair == "gemma2" else (_granite(0, 4.0), _granite(1, 2.0))
    cfg = OPDConfig(objective=objective, temperature=temperature, lr=1e-2, num_samples=2, max_new_tokens=6,
                    eos_token_id=2, pad_token_id=0)
    trainer = OPDTrainer(student, teacher, cfg)
    torch.manual_seed(3)
    batch = trainer.engine.generate(_prompts())
    num = batch.completion_mask.sum()
    loss, _ = trainer._loss(batch, trainer.engine.student_hidden(batch), trainer.engine.score(batch), num)
    torch.testing.assert_close(loss.double(), _reference(trainer, batch), rtol=1e-5, atol=1e-6)
    trainer.step(_prompts())  # and a whole step runs


def test_a_student_and_teacher_with_different_soft_caps_are_refused():
    with pytest.raises(ValueError, match="soft-cap"):
        OPDTrainer(_gemma2(0, cap=2.0), _gemma2(1, cap=None), OPDConfig(eos_token_id=2, pad_token_id=0))
