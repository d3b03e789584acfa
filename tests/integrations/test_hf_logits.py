"""fastopd.integrations.hf reproduces each architecture's logit post-processing (multipliers in the direction its
modeling file applies them, soft-caps read from the text config of multimodal classes), refuses a forward whose
logits it cannot reproduce, and scales the loss under data parallelism as HF's Trainer.compute_loss does."""

from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastopd.integrations.hf import (  # noqa: E402
    causal_lm_hidden_states,
    distillation_loss,
    final_softcap,
    lm_head_of,
    trainer_loss_scale,
)

VOCAB = 64
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)


def _config(name: str, **extra):
    """A tiny config of transformers class `name`, or None when the installed transformers lacks it."""
    cls = getattr(transformers, name, None)
    return None if cls is None else cls(**_DECODER, **extra)


def _gemma4_multimodal(cap: float):
    """Gemma4Config (AutoModelForCausalLM gives Gemma4ForConditionalGeneration): the cap is in its text config."""
    if getattr(transformers, "Gemma4Config", None) is None:
        return None
    text = transformers.Gemma4TextConfig(**_DECODER, head_dim=8, global_head_dim=8, final_logit_softcapping=cap,
                                         hidden_size_per_layer_input=0, vocab_size_per_layer_input=VOCAB,
                                         num_kv_shared_layers=0)
    return transformers.Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=None)


def _gemma3_multimodal(cap: float):
    """Gemma3Config: Gemma3ForConditionalGeneration applies no final softcap, whatever its text config says."""
    if getattr(transformers, "Gemma3Config", None) is None:
        return None
    text = transformers.Gemma3TextConfig(**_DECODER, head_dim=8, final_logit_softcapping=cap)
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    return transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                     image_token_index=VOCAB - 1, boi_token_index=VOCAB - 2,
                                     eoi_token_index=VOCAB - 3)


ARCHITECTURES = [
    pytest.param(lambda: _config("HyperCLOVAXConfig", logits_scaling=0.25), id="hyperclovax-times-logits_scaling"),
    pytest.param(lambda: _config("GraniteConfig", logits_scaling=4.0), id="granite-divided-by-logits_scaling"),
    pytest.param(lambda: _config("CohereConfig", logit_scale=0.3), id="cohere-times-logit_scale"),
    pytest.param(lambda: _config("FalconH1Config", lm_head_multiplier=0.5, head_dim=8, mamba_d_ssm=32,
                                 mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=8),
                 id="falcon_h1-times-lm_head_multiplier"),
    pytest.param(lambda: _gemma4_multimodal(0.5), id="gemma4-conditional-generation-text-config-softcap"),
    pytest.param(lambda: _gemma3_multimodal(0.5), id="gemma3-conditional-generation-applies-no-softcap"),
]


def _model(config, seed):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _fkl_from_logits(student, teacher, ids):
    """Forward KL(teacher || student) of position t's logits (t < T-1), mean over positions, from full logits."""
    s = torch.log_softmax(student(input_ids=ids).logits[:, :-1].double(), -1)
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].double(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


@pytest.mark.parametrize("make_config", ARCHITECTURES)
def test_distillation_loss_matches_the_logits_of_architectures_with_logit_post_processing(make_config):
    config = make_config()
    if config is None:
        pytest.skip("architecture not in the installed transformers")
    student, teacher = _model(config, 0), _model(config, 1)
    ids = torch.randint(3, VOCAB - 4, (2, 7), generator=torch.Generator().manual_seed(0))
    loss = distillation_loss(student, teacher, ids, divergence="fkl")
    torch.testing.assert_close(loss.double(), _fkl_from_logits(student, teacher, ids).detach(), rtol=1e-4, atol=1e-6)
    # the hidden states are the logits' own: h @ W^T, soft-capped as the forward does
    with torch.no_grad():
        h = causal_lm_hidden_states(student, ids)
        w, _ = lm_head_of(student)
        z = h @ w.T
        cap = final_softcap(student)
        z = z if cap is None else cap * torch.tanh(z / cap)
        torch.testing.assert_close(z, student(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


class _TripledLogitsLlama(transformers.LlamaForCausalLM):
    """A post-processing fastopd cannot know of: the forward triples its logits."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                              **kwargs)
        out.logits = out.logits * 3.0
        return out


def test_self_check_refuses_a_forward_whose_logits_it_cannot_reproduce():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**_DECODER)
    student, teacher = _TripledLogitsLlama(config), transformers.LlamaForCausalLM(config)
    ids = torch.randint(3, VOCAB, (2, 6))
    with pytest.raises(ValueError, match=r"_TripledLogitsLlama \(model_type 'llama'\): the logits its forward "
                                         r"returns differ from softcap\(hidden @ W\^T \+ b\)"):
        distillation_loss(student, teacher, ids, divergence="fkl")
    distillation_loss(teacher, teacher, ids, divergence="fkl")  # a plain Llama passes the check
    with pytest.raises(ValueError, match="_TripledLogitsLlama"):  # the teacher is checked as well
        distillation_loss(teacher, student, ids, divergence="fkl")


def _trainer(num_processes, average=True, accepts_loss_kwargs=True, n_gpu=1, tp=1):
    return SimpleNamespace(args=SimpleNamespace(average_tokens_across_devices=average, n_gpu=n_gpu),
                           model_accepts_loss_kwargs=accepts_loss_kwargs, compute_loss_func=None,
                           accelerator=SimpleNamespace(num_processes=num_processes), get_tp_size=lambda: tp)


@pytest.mark.parametrize("trainer,num_items,scale", [
    pytest.param(_trainer(4), 10, 4, id="ddp4-tokens-summed-over-ranks"),
    pytest.param(_trainer(4, tp=2), 10, 2, id="ddp4-tp2"),
    pytest.param(_trainer(1, n_gpu=2), 10, 2, id="dataparallel-2gpu"),
    pytest.param(_trainer(4, average=False), 10, 1, id="ddp4-not-averaged-across-devices"),
    pytest.param(_trainer(4), None, 1, id="ddp4-no-num-items"),
    pytest.param(_trainer(4, accepts_loss_kwargs=False), 10, 1, id="ddp4-model-without-loss-kwargs"),
    pytest.param(_trainer(1), 10, 1, id="one-process"),
])
def test_trainer_loss_scale_follows_trainer_compute_loss(trainer, num_items, scale):
    assert trainer_loss_scale(trainer, num_items) == scale
