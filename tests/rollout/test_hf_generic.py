"""HFCausalLMAdapter: Hugging Face causal LMs outside the Llama family and GPT-2 (Gemma, Gemma 3 with sliding-window
layers, Phi-3, OLMo 2, Qwen3-MoE, Qwen2-MoE, Mixtral, GPT-NeoX) through their own forward, a view of the engine's KV
cache and custom 4D masks, against the models' own generate and forward. Random-weight models built from configs."""

import logging

import pytest
import torch
import transformers
from hf_reference import (
    assert_greedy_equals_hf,
    assert_scores_and_training_forward_match_hf,
    hf_greedy,
    hf_hidden,
    sampled_batch_with_hf_logprobs,
)

from fastopd.rollout import RolloutEngine, as_adapter
from fastopd.rollout.adapters import HF_GENERIC_TYPES, HFCausalLMAdapter, _CacheView

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 101
PROMPTS = [[5, 6, 7, 8, 9], [1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]  # mixed lengths: left-padded to 9
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, pad_token_id=0)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
# model_type -> (class, config class, config overrides). Gemma 3's window of 5 is shorter than prompt + horizon,
# so its sliding layers attend to a band that the adapter's per-layer-type masks must reproduce.
MODELS = {
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(head_dim=10)),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextConfig",
                    dict(head_dim=10, sliding_window=5, final_logit_softcapping=None,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    # Gemma 2: attention logits soft-capped (eager attention, its default), sliding layers, final logit soft-cap
    # (a small one, so that it bends the random model's logits).
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config",
               dict(head_dim=10, sliding_window=5, final_logit_softcapping=2.0, attn_logit_softcapping=3.0)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {}),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", {}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(MOE, head_dim=10)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(MOE, shared_expert_intermediate_size=24)),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(num_key_value_heads=None, rotary_pct=0.5)),
}
CASES = [pytest.param(t, id=t) for t in MODELS]


def build(model_type, seed=0, **kw):
    cls, cfg_cls, over = MODELS[model_type]
    if not hasattr(transformers, cls):
        pytest.skip(f"transformers {transformers.__version__} has no {cls}")
    torch.manual_seed(seed)
    cfg = {k: v for k, v in {**BASE, **over, **kw}.items() if v is not None}
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**cfg)).eval()
    with torch.no_grad():  # norm weights away from HF's init (ones, or zeros for Gemma's 1 + w)
        for name, prm in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                prm.add_(0.3 * torch.randn_like(prm))
    return model


def test_every_verified_type_is_tested_and_picked_by_as_adapter():
    assert set(HF_GENERIC_TYPES) == set(MODELS)
    for model_type in MODELS:
        adapter = as_adapter(build(model_type))
        assert type(adapter) is HFCausalLMAdapter, model_type


@pytest.mark.parametrize("model_type", CASES)
def test_greedy_equals_hf_generate(model_type):
    assert_greedy_equals_hf(build(model_type), PROMPTS)


@pytest.mark.parametrize("model_type", CASES)
def test_sampled_logprobs_with_prefix_sharing_equal_a_full_hf_forward(model_type):
    model = build(model_type)
    batch, ref = sampled_batch_with_hf_logprobs(model, PROMPTS)
    torch.testing.assert_close(batch.logprobs.double(), ref, rtol=1e-5, atol=1e-5)
    again, _ = sampled_batch_with_hf_logprobs(model, PROMPTS)  # the same seed: the same rollouts
    assert torch.equal(again.input_ids, batch.input_ids)


@pytest.mark.parametrize("model_type", CASES)
def test_score_and_student_hidden_equal_hf_forward_and_its_gradients(model_type):
    """Teacher: the same architecture at another seed, scored with prefix sharing through the cache; student: the
    training forward (in train mode), whose gradients equal those of HF's own forward under one upstream gradient."""
    student, teacher = build(model_type).train(), build(model_type, seed=1)
    engine = RolloutEngine(student, teacher=teacher, horizon=10, num_samples=2, temperature=1.0, eos_token_id=3,
                           generator=torch.Generator().manual_seed(2))
    batch = engine.generate(PROMPTS)
    assert student.training and all(m.training for m in student.modules())  # generation ran it in eval, restored
    assert_scores_and_training_forward_match_hf(engine, student, teacher, batch)


def test_teacher_with_another_context_scores_the_same_completion():
    """Privileged context through the generic adapter: the teacher sees other prompts, scores the same tokens."""
    student, teacher = build("gemma3_text"), build("gemma3_text", seed=1)
    engine = RolloutEngine(student, teacher=teacher, horizon=8, temperature=1.0,
                           generator=torch.Generator().manual_seed(4))
    batch = engine.generate(PROMPTS)
    long = [[7, 7, 7, 7, 7, 7, 7] + row for row in PROMPTS]
    scored = engine.score(batch, teacher_prompts=long)
    for i, row in enumerate(long):
        ids = torch.tensor([row + batch.completion_ids[i].tolist()])
        with torch.no_grad():
            ref = hf_hidden(teacher, ids, torch.ones_like(ids))[0, len(row) - 1 : len(row) - 1 + batch.horizon]
        keep = batch.completion_mask[i]
        torch.testing.assert_close(scored[i][keep], ref[keep], rtol=1e-5, atol=1e-5)


def test_logit_scale_and_softcap_are_the_models():
    gemma2 = as_adapter(build("gemma2"))
    assert gemma2.logit_softcap == 2.0 and gemma2.logit_scale == 1.0
    h = torch.randn(3, BASE["hidden_size"])
    z = h @ gemma2.output_weight.detach().T
    torch.testing.assert_close(gemma2.logits(h).detach(), 2.0 * torch.tanh(z / 2.0))
    torch.testing.assert_close(gemma2.decode_head(3)(h), 2.0 * torch.tanh(z / 2.0))
    assert as_adapter(build("gemma")).logit_softcap is None


def test_eager_attention_takes_the_additive_mask():
    model = transformers.GemmaForCausalLM(transformers.GemmaConfig(
        **{**BASE, "head_dim": 10}, attn_implementation="eager")).eval()
    assert model.config._attn_implementation == "eager"
    batch = RolloutEngine(model, horizon=10, temperature=0, pad_token_id=0).generate(PROMPTS)
    assert torch.equal(batch.completion_ids, hf_greedy(model, batch, 10))


UNVERIFIED = [
    # Granite: embedding, residual and attention multipliers inside its forward, logits divided by logits_scaling
    # (the adapter's logit_scale); OPT: learned positions, a
    # projection after the decoder; Falcon (new decoder architecture): parallel attention and MLP, GQA.
    pytest.param(lambda: transformers.GraniteForCausalLM(transformers.GraniteConfig(
        **BASE, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=0.25)),
        id="granite-logits-scaling"),
    pytest.param(lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=24, max_position_embeddings=64, pad_token_id=0)), id="opt-projected"),
    pytest.param(lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
        num_kv_heads=2)), id="falcon"),
]


@pytest.mark.parametrize("make", UNVERIFIED)
def test_an_unverified_architecture_is_adapted_after_its_self_check(make):
    """Types outside HF_GENERIC_TYPES pass the adapter's self-check and then generate as HF does."""
    torch.manual_seed(0)
    model = make().eval()
    assert model.config.model_type not in HF_GENERIC_TYPES
    engine = RolloutEngine(model, horizon=10, temperature=0, pad_token_id=0)
    batch = engine.generate(PROMPTS)
    assert torch.equal(batch.completion_ids, hf_greedy(model, batch, 10))
    # D of the hidden states: OPT's projected decoder returns word_embed_proj_dim, not the config's hidden_size
    assert engine.student.hidden_size == engine.student_hidden(batch).shape[-1]


@pytest.mark.parametrize("broken", ["mask-ignored", "cache-ignored", "old-cache-api"])
def test_self_check_fails_for_a_model_that_does_not_follow_the_protocol(monkeypatch, broken):
    """An architecture whose attention ignored the custom mask and built its own causal one (here: no mask passed)
    attends to the check's left padding and gives other hidden states; one that ignored the cache (update hands
    back only the new keys) fails to run; so does one that calls a Cache method the view lacks (older remote code's
    `past_key_value.get_usable_length(...)`), whose AttributeError escaped the check instead of its ValueError."""
    model = build("gemma")
    if broken == "mask-ignored":
        monkeypatch.setattr(HFCausalLMAdapter, "_masks", lambda self, mask, start: None)
        message = "cached forward differs from the model's own"
    elif broken == "cache-ignored":
        monkeypatch.setattr(_CacheView, "update", lambda self, k, v, *a, **kw: (k, v))
        message = "cached forward failed"
    else:
        monkeypatch.setattr(_CacheView, "update", lambda self, k, v, layer_idx, *a, **kw: (
            self.get_usable_length(k.shape[2], layer_idx)))
        message = "cached forward failed .AttributeError"
    with pytest.raises(ValueError, match=message):
        HFCausalLMAdapter(model).check()


@pytest.mark.parametrize("case", [
    pytest.param(("flash", "ignores custom 4D attention masks"), id="flash-attention"),
    pytest.param(("neox-wrong-kv", "does not fit fastopd's KV cache"), id="kv-heads-not-the-config's"),
    pytest.param(("bert-lm-head", "logits are not softcap"), id="bert-transform-before-the-head"),
    pytest.param(("bert-mlm", "cached forward differs"), id="bert-bidirectional"),
    pytest.param(("rwkv", "config has no num_attention_heads"), id="rwkv-no-attention-heads"),
    pytest.param(("falcon-alibi", "cached forward failed .ValueError"), id="falcon-alibi-needs-a-2d-mask"),
])
def test_unsupported_models_are_refused_with_the_reason(case):
    kind, message = case
    torch.manual_seed(0)
    if kind == "flash":
        model = build("gemma")
        model.config._attn_implementation = "flash_attention_2"
    elif kind == "rwkv":  # no attention: an AttributeError of the config escaped instead of the ValueError
        model = transformers.RwkvForCausalLM(transformers.RwkvConfig(vocab_size=VOCAB, hidden_size=32,
                                                                     num_hidden_layers=2, context_length=64))
    elif kind == "falcon-alibi":  # ALiBi built from a 2D mask: a bare "too many values to unpack" escaped the check
        model = transformers.FalconForCausalLM(transformers.FalconConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True))
    elif kind == "neox-wrong-kv":  # GPT-NeoX has no grouped-query attention: a num_key_value_heads in its config
        model = build("gpt_neox", num_key_value_heads=2)  # is not what it caches
    else:  # BERT as a decoder puts a dense + LayerNorm transform before its output embedding; as an MLM it is
        bert = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,  # bidirectional
                    intermediate_size=64)
        model = (transformers.BertLMHeadModel(transformers.BertConfig(**bert, is_decoder=True)) if kind ==
                 "bert-lm-head" else transformers.BertForMaskedLM(transformers.BertConfig(**bert)))
    with pytest.raises(ValueError, match=message):
        RolloutEngine(model, horizon=4, temperature=0, pad_token_id=0).generate(PROMPTS)


@pytest.mark.parametrize("model_type", ["gemma", "olmo2", "gpt_neox"])
def test_a_config_window_the_architecture_ignores_is_not_applied(model_type):
    """A `sliding_window` in the config of an architecture without sliding windows (Gemma, OLMo 2 and GPT-NeoX never
    read it) left the model's own forward full-attention, while the adapter windowed every layer: rollouts, scores
    and the training forward then differed from the model once a sequence passed the window. (HF's `generate` is
    no reference here: its DynamicCache drops keys past a config's window whatever the architecture.)"""
    model = build(model_type, sliding_window=4)
    engine = RolloutEngine(model, teacher=model, horizon=8, temperature=0, pad_token_id=0)
    batch = engine.generate(PROMPTS)
    p, h = batch.prompt_width, batch.horizon
    with torch.no_grad():
        mask = batch.attention_mask.long()
        logits = model(input_ids=batch.input_ids, attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, p - 1 : p - 1 + h]
        ref = hf_hidden(model, batch.input_ids, batch.attention_mask)[:, p - 1 : p - 1 + h]
        hidden = engine.student_hidden(batch)
    assert torch.equal(batch.completion_ids, logits.argmax(-1))
    torch.testing.assert_close(engine.score(batch), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, ref, rtol=1e-5, atol=1e-5)


def test_a_longrope_model_runs_within_its_original_context():
    """A longrope RoPE (Phi-3 128k, Phi-3.5) switches all frequencies to its long factors once a forward's positions
    pass `original_max_position_embeddings`: the prompt's keys, cached under the short ones by the prefill, were then
    attended with long-factor queries, so greedy tokens differed from HF's `generate` and `score` from the training
    forward. The context is now that original length, where the RoPE does not depend on the sequence length."""
    half = 6  # head_dim 12 / 2
    rope = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * half, long_factor=[4.0] * half,
                original_max_position_embeddings=12)
    model = build("phi3", original_max_position_embeddings=12, rope_parameters=rope)
    engine = RolloutEngine(model, teacher=model, horizon=10, temperature=0, pad_token_id=0)
    assert engine.student.max_positions == 12
    prompts = [[5, 6, 7, 8, 9], [1, 2]]
    batch = engine.generate(prompts)
    p, h = batch.prompt_width, batch.horizon
    assert p + h == 12
    assert torch.equal(batch.completion_ids, hf_greedy(model, batch, h))
    with torch.no_grad():
        ref = hf_hidden(model, batch.input_ids, batch.attention_mask)[:, p - 1 : p - 1 + h]
        hidden = engine.student_hidden(batch)
    m = batch.completion_mask
    torch.testing.assert_close(engine.score(batch)[m], ref[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden[m], ref[m], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="original context of its longrope"):
        engine.generate([list(range(1, 13))])
