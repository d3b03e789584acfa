"""RolloutEngine the way Hugging Face users drive it: tokenizer batches, inference mode, torch.compile, activation
checkpointing, sliding-window configs, heads padded beyond the tokenizer. Random-weight models built from configs."""

import logging
import warnings

import numpy as np
import pytest
import torch
import transformers
from hf_reference import assert_greedy_equals_hf, hf_greedy, sampled_batch_with_hf_logprobs

from fastopd.models import Transformer, TransformerConfig
from fastopd.rollout import RolloutEngine, as_adapter

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 97
PROMPTS = [[5, 6, 7, 8, 9], [1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


def llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **kw})).eval()


def sliding(kind, window, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3, sliding_window=window, **kw)
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**cfg)).eval()
    cfg.update(use_sliding_window=True, max_window_layers=1)  # layer 1 slides, layer 0 does not
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg)).eval()


def padded(rows, side):
    """A tokenizer-like batch: ids [B, L] and a 0/1 int64 mask, padded on `side` with id 0."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = torch.tensor(r), 1
    return ids, mask


def full_logits(model, ids, mask):
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("as_lists", [pytest.param(False, id="tensors"), pytest.param(True, id="lists")])
def test_tokenizer_batch_encoding_equals_list_prompts(side, as_lists):
    engine = RolloutEngine(llama(), horizon=4, temperature=0)
    ref = engine.generate(PROMPTS)
    ids, mask = padded(PROMPTS, side)
    if as_lists:  # a tokenizer called with padding=True but without return_tensors
        ids, mask = ids.tolist(), mask.tolist()
    enc = transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})
    assert torch.equal(engine.generate(enc).input_ids, ref.input_ids)
    assert torch.equal(engine.generate(enc["input_ids"], enc["attention_mask"]).input_ids, ref.input_ids)
    numpy = transformers.BatchEncoding({k: torch.as_tensor(v).numpy() for k, v in enc.items()})
    assert torch.equal(engine.generate(numpy).input_ids, ref.input_ids)
    unpadded = {"input_ids": PROMPTS, "attention_mask": [[1] * len(r) for r in PROMPTS]}  # tokenizer, no padding
    assert torch.equal(engine.generate(unpadded).input_ids, ref.input_ids)
    ragged = {k: np.array([np.array(r) for r in v], dtype=object) for k, v in unpadded.items()}
    assert torch.equal(engine.generate(ragged).input_ids, ref.input_ids)  # return_tensors="np" without padding


@pytest.mark.parametrize("prompts,attention_mask,match", [
    pytest.param([1, 2, 3], None, r"prompts\[0\] is 1, not a sequence .*\[\[", id="flat-int-list"),
    pytest.param(["hello"], None, r"prompts\[0\] is 'hello'.*tokenize", id="text"),
    pytest.param({"ids": [[1]]}, None, "without 'input_ids'", id="mapping-without-input-ids"),
    pytest.param(None, None, "prompts is None: need a list of token-id lists", id="none"),
    pytest.param(7, None, "prompts is 7: need a list of token-id lists", id="one-int"),
    pytest.param("hello", None, "prompts is 'hello': need a list of token-id lists", id="bare-text"),
    # tok("one text") without return_tensors: one unbatched prompt, flat ids and a flat mask
    pytest.param({"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]}, None,
                 r"prompts\[0\] is 1, not a sequence .*\[\[", id="unbatched-encoding-flat-ids-and-mask"),
    pytest.param({"input_ids": "hello", "attention_mask": [1] * 5}, None, r"prompts\[0\] is 'h'.*tokenize",
                 id="text-with-mask"),
    pytest.param([[1, 2], [3]], [[1, 1], [1, 1]], r"prompts\[1\] and its attention_mask row do not match",
                 id="mask-row-longer-than-ids"),
    pytest.param([[1, 2], [3]], [[1, 1]], "attention_mask has 1 rows, prompts 2", id="mask-rows-missing"),
    pytest.param(torch.ones(2, 3, dtype=torch.long), [[1, 1, 1]], "does not match", id="list-mask-wrong-shape"),
])
def test_malformed_prompts_raise_value_errors_that_say_what_is_wrong(prompts, attention_mask, match):
    engine = RolloutEngine(llama(), horizon=2)
    with pytest.raises(ValueError, match=match):
        engine.generate(prompts, attention_mask)


def test_generate_and_score_inside_inference_mode_give_tensors_autograd_can_use():
    model = llama()
    engine = RolloutEngine(model, teacher=model, horizon=5, num_samples=2, temperature=1.0, eos_token_id=3)
    with torch.inference_mode():  # as Hugging Face evaluation code often wraps generation
        batch = engine.generate(PROMPTS)
        teacher_hidden = engine.score(batch)
    assert not any(t.is_inference() for t in (batch.input_ids, batch.attention_mask, batch.completion_mask,
                                              batch.logprobs, batch.truncated, teacher_hidden))
    student_hidden = engine.student_hidden(batch)
    (student_hidden * teacher_hidden).sum().backward()  # the product saves both for backward
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_torch_compiled_models_are_unwrapped():
    torch.manual_seed(0)
    builtin = Transformer(TransformerConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=1,
                                            num_heads=2, max_position_embeddings=64))
    hf = llama()
    for model in (builtin, hf):
        compiled = torch.compile(model)  # compiles lazily: the engine never calls the wrapper
        engine = RolloutEngine(compiled, teacher=compiled, horizon=3, temperature=0)
        assert engine.student.model is model and engine.teacher is engine.student
        assert torch.equal(engine.generate(PROMPTS).input_ids,
                           RolloutEngine(model, horizon=3, temperature=0).generate(PROMPTS).input_ids)


@pytest.mark.parametrize("reentrant", [False, True])
def test_student_hidden_honours_hf_activation_checkpointing(reentrant):
    plain, ckpt = llama(), llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    plain.train(), ckpt.train()
    engine = RolloutEngine(plain, horizon=4, temperature=1.0, generator=torch.Generator().manual_seed(3))
    batch = engine.generate(PROMPTS)
    calls = []  # a layer's first projection, which the backward of a checkpointed layer recomputes
    ckpt.model.layers[1].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    grads = []
    for model in (plain, ckpt):
        RolloutEngine(model, horizon=4).student_hidden(batch).square().sum().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert len(calls) == 2  # the forward and its recomputation in backward
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    calls.clear()
    ckpt.eval()  # Hugging Face checkpoints in train mode only
    RolloutEngine(ckpt, horizon=4).student_hidden(batch).sum().backward()
    assert len(calls) == 1


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_sliding_window_model_runs_with_the_window_as_its_context(kind):
    window = 15  # prompt width 9 leaves a horizon of 6 that HF's windowed attention computes as full attention
    model = sliding(kind, window)
    engine = RolloutEngine(model, teacher=model, horizon=10, temperature=0)
    batch = engine.generate(PROMPTS)
    assert batch.horizon == window - 9 == engine.last_stats["horizon"]
    assert torch.equal(batch.completion_ids, hf_greedy(model, batch, batch.horizon))
    p = batch.prompt_width
    ref = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                      position_ids=(batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)).last_hidden_state
    torch.testing.assert_close(engine.score(batch), ref[:, p - 1 : -1].detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="15 positions .*sliding-window"):
        engine.generate([list(range(1, 16))])


@pytest.mark.parametrize("layer_types", [pytest.param(["full_attention"] * 2, id="all-full"),
                                         pytest.param(["full_attention", "sliding_attention"], id="last-sliding")])
def test_mistral_window_applies_to_every_layer_whatever_its_config_layer_types_say(layer_types):
    """MistralForCausalLM ignores `layer_types` (a Ministral-style config loaded as Mistral, which HF warns about):
    its mask and attention apply `sliding_window` to every layer, so the window stays the context."""
    window = 15
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sliding("mistral", window, layer_types=layer_types)
    assert model.config.layer_types == layer_types
    engine = RolloutEngine(model, horizon=10, temperature=0)
    assert engine.student.sliding_window == window == engine.student.max_positions
    batch = engine.generate(PROMPTS)
    assert batch.horizon == window - 9
    assert torch.equal(batch.completion_ids, hf_greedy(model, batch, batch.horizon))


def test_sliding_window_in_no_layer_keeps_the_full_context():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert RolloutEngine(transformers.Qwen2ForCausalLM(cfg), horizon=3).student.max_positions == 64


@pytest.mark.parametrize("kw", [pytest.param(dict(temperature=1.0, num_samples=5), id="T1-n5"),
                                pytest.param(dict(temperature=0.8, top_k=200, top_p=0.97), id="T0.8-topk-topp"),
                                pytest.param(dict(temperature=0), id="greedy")])
def test_vocab_size_samples_only_the_tokenizer_vocabulary_of_a_padded_head(kw):
    model, vocab = llama(), 61  # the head has 97 rows; ids 61..96 are padding no tokenizer emits
    engine = RolloutEngine(model, horizon=12, vocab_size=vocab, generator=torch.Generator().manual_seed(0), **kw)
    batch = engine.generate(PROMPTS)
    assert int(batch.completion_ids.max()) < vocab
    p, t = batch.prompt_width, kw["temperature"] or 1.0
    logits = full_logits(model, batch.input_ids, batch.attention_mask)[:, p - 1 : -1, :vocab].double() / t
    if kw["temperature"] == 0:
        assert torch.equal(batch.completion_ids, logits.argmax(-1))
    ref = logits.log_softmax(-1).gather(-1, batch.completion_ids[..., None])[..., 0]
    torch.testing.assert_close(batch.logprobs.double(), ref, rtol=1e-5, atol=1e-5)
    unrestricted = RolloutEngine(model, horizon=12, generator=torch.Generator().manual_seed(0), **kw)
    if kw["temperature"] != 0:  # random weights give the padding rows real mass: without vocab_size they are drawn
        assert int(unrestricted.generate(PROMPTS).completion_ids.max()) >= vocab


@pytest.mark.parametrize("kw,match", [
    pytest.param(dict(vocab_size=0), r"vocab_size must be .*\[1, 97\]", id="zero"),
    pytest.param(dict(vocab_size=98), r"vocab_size must be .*\[1, 97\]", id="beyond-head"),
    pytest.param(dict(vocab_size=2.5), "vocab_size must be", id="float"),
    pytest.param(dict(vocab_size=50, eos_token_id=[3, 60]), "vocab_size=50 never samples", id="eos-beyond"),
])
def test_bad_vocab_size_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        RolloutEngine(llama(), horizon=2, **kw)


def test_greedy_equals_hf_generate_where_the_argmax_is_the_configs_eos_id():
    model = llama(num_key_value_heads=4)  # MHA; row 0 picks id 2, LlamaConfig's default EOS, at step 4
    batch = RolloutEngine(model, horizon=7, temperature=0).generate(PROMPTS)
    assert int(batch.completion_ids[0, 4]) == model.generation_config.eos_token_id == 2
    assert torch.equal(batch.completion_ids, hf_greedy(model, batch, 7))


def perturbed(model):
    """`model` (eval mode) with its biases and norm weights moved off HF's init of zeros and ones."""
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                prm.add_(0.3 * torch.randn_like(prm))
    return model.eval()


def gpt2(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, n_positions=64, initializer_range=0.2)
    return perturbed(transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**cfg, **kw})))


def family(cls, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
    config_cls = {transformers.LlamaForCausalLM: transformers.LlamaConfig,
                  transformers.Qwen2ForCausalLM: transformers.Qwen2Config,
                  transformers.MistralForCausalLM: transformers.MistralConfig}[cls]
    return perturbed(cls(config_cls(**{**cfg, **kw})))


LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8)
VARIANTS = [
    pytest.param(transformers.LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True), id="llama-attn-and-mlp-bias"),
    pytest.param(transformers.LlamaForCausalLM, dict(head_dim=20, num_key_value_heads=1, tie_word_embeddings=True),
                 id="llama-headdim20-kv1-tied"),
    pytest.param(transformers.LlamaForCausalLM, dict(rope_theta=100.0, rms_norm_eps=1e-2), id="llama-theta100-eps1e-2"),
    pytest.param(transformers.LlamaForCausalLM, dict(rope_scaling=dict(rope_type="linear", factor=4.0)),
                 id="llama-rope-linear"),
    pytest.param(transformers.LlamaForCausalLM, dict(rope_scaling=LLAMA3), id="llama-rope-llama3"),
    pytest.param(transformers.LlamaForCausalLM, dict(rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=8, attention_factor=1.3)), id="llama-rope-yarn"),
    pytest.param(transformers.Qwen2ForCausalLM, dict(num_key_value_heads=4, head_dim=16, rope_scaling=dict(
        rope_type="yarn", factor=2.0, original_max_position_embeddings=8)), id="qwen2-mha-headdim16-yarn"),
    pytest.param(transformers.MistralForCausalLM, dict(head_dim=8, num_key_value_heads=1, sliding_window=30,
                                                      rope_scaling=dict(rope_type="linear", factor=3.0)),
                 id="mistral-headdim8-kv1-window30-linear"),
    pytest.param(gpt2, dict(scale_attn_by_inverse_layer_idx=True, layer_norm_epsilon=1e-2),
                 id="gpt2-inverse-layer-idx-eps1e-2"),
    pytest.param(gpt2, dict(scale_attn_weights=False, n_inner=72, activation_function="gelu"),
                 id="gpt2-unscaled-ninner72-gelu"),
    pytest.param(gpt2, dict(activation_function="relu", tie_word_embeddings=False), id="gpt2-relu-untied"),
]


@pytest.mark.parametrize("make,kw", VARIANTS)
def test_config_variants_equal_hf_generate_and_forward(make, kw):
    model = family(make, **kw) if make is not gpt2 else gpt2(**kw)
    assert type(as_adapter(model)).__name__ in ("HFLlamaAdapter", "HFGPT2Adapter")
    assert_greedy_equals_hf(model, PROMPTS, 12)
    batch, ref = sampled_batch_with_hf_logprobs(model, PROMPTS)
    torch.testing.assert_close(batch.logprobs.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw,match", [
    pytest.param(dict(hidden_act="gelu"), "hidden_act='gelu'", id="hidden-act-gelu"),
    pytest.param(dict(hidden_act="relu"), "hidden_act='relu'", id="hidden-act-relu"),
    pytest.param(dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)), "rope_type='dynamic'", id="rope-dynamic"),
    pytest.param(dict(rope_scaling=dict(rope_type="longrope", short_factor=[1.0] * 6, long_factor=[2.0] * 6,
                                        original_max_position_embeddings=32)), "rope_type='longrope'",
                 id="rope-longrope"),
])
def test_llama_family_settings_the_adapter_does_not_compute_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        as_adapter(family(transformers.LlamaForCausalLM, **kw))
