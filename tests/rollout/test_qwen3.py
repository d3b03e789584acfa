"""Qwen3ForCausalLM through the Llama-family adapter: per-head q/k RMSNorm before RoPE in prefill, scoring, the
training forward and the packed decode step, against Hugging Face's own forward and generate. Random-weight models
built from configs, with the norm weights perturbed from HF's init of ones (q's unlike k's)."""

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

from fastopd.models.layers import pack_llama_layer
from fastopd.rollout import RolloutEngine, as_adapter

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 101
PROMPTS = [[5, 6, 7, 8, 9], [1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]  # mixed lengths: left-padded to 9


def qwen3(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=42, intermediate_size=74, num_hidden_layers=3, num_attention_heads=6,
               num_key_value_heads=2, head_dim=10, max_position_embeddings=96, initializer_range=0.15,
               tie_word_embeddings=False)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("norm.weight"):
                prm.add_(0.5 * torch.randn_like(prm))
    return model


CONFIGS = [
    pytest.param({}, id="gqa3-untied-headdim10"),  # head_dim 10, hidden / heads = 7
    pytest.param(dict(hidden_size=33, num_attention_heads=3, num_key_value_heads=3, head_dim=14,
                      tie_word_embeddings=True), id="mha-tied-headdim14"),
    pytest.param(dict(num_attention_heads=5, num_key_value_heads=1, head_dim=6, attention_bias=True,
                      rms_norm_eps=1e-3), id="gqa5-bias-eps1e-3"),
]


def test_qwen3_is_a_llama_family_model_with_q_and_k_norms():
    adapter = as_adapter(qwen3())
    assert type(adapter).__name__ == "HFLlamaAdapter" and adapter.head_dim == 10 and adapter.num_kv_heads == 2
    packed = pack_llama_layer(adapter.layers[0])
    attn = adapter.layers[0].self_attn
    assert packed.qk_norm.shape == (6 + 2, 1, 10)  # q weight per query head, then k weight per key head
    assert torch.equal(packed.qk_norm[:6, 0], attn.q_norm.weight.detach().expand(6, 10))
    assert torch.equal(packed.qk_norm[6:, 0], attn.k_norm.weight.detach().expand(2, 10))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2))
    plain = pack_llama_layer(llama.model.layers[0])
    assert plain.qk_norm is None and plain.qk_norm_eps is None  # nothing more runs on the Llama path


@pytest.mark.parametrize("kw", CONFIGS)
def test_greedy_equals_hf_generate(kw):
    assert_greedy_equals_hf(qwen3(**kw), PROMPTS)


@pytest.mark.parametrize("kw", CONFIGS)
def test_sampled_logprobs_equal_a_full_hf_forward(kw):
    model = qwen3(**kw)
    batch, ref = sampled_batch_with_hf_logprobs(model, PROMPTS)
    torch.testing.assert_close(batch.logprobs.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", CONFIGS)
def test_score_and_student_hidden_equal_hf_forward_and_its_gradients(kw):
    """Teacher: a Qwen3 of another shape, scored with prefix sharing and a cache; student: the training forward,
    whose gradients (q_norm/k_norm weights included) equal those of HF's forward under the same upstream gradient."""
    student, teacher = qwen3(**kw), qwen3(seed=1)
    engine = RolloutEngine(student, teacher=teacher, horizon=10, num_samples=2, temperature=1.0, eos_token_id=3,
                           generator=torch.Generator().manual_seed(2))
    batch = engine.generate(PROMPTS)
    assert_scores_and_training_forward_match_hf(engine, student, teacher, batch)
    assert student.model.layers[0].self_attn.k_norm.weight.grad.abs().sum() > 0


def test_update_of_the_q_and_k_norms_alone_is_picked_up_by_the_decode_step():
    """The packed decode weights are rebuilt when only q_norm/k_norm change (they are sources of the packing)."""
    model = qwen3()
    engine = RolloutEngine(model, horizon=12, temperature=0, pad_token_id=0)
    before = engine.generate(PROMPTS)
    for layer in model.model.layers:  # .data: the parameters' version counters stay
        layer.self_attn.q_norm.weight.data.mul_(-1.5)
        layer.self_attn.k_norm.weight.data.add_(0.7)
    after = engine.generate(PROMPTS)
    assert not torch.equal(after.completion_ids, before.completion_ids)
    assert torch.equal(after.completion_ids, hf_greedy(model, after, 12))


def test_q_and_k_norms_with_different_epsilons_are_refused_by_the_packed_step():
    model = qwen3()
    model.model.layers[1].self_attn.k_norm.variance_epsilon = 1e-3
    with pytest.raises(ValueError, match="q_norm eps 1e-06 != k_norm eps 0.001"):
        RolloutEngine(model, horizon=4, temperature=0).generate(PROMPTS)


def test_sliding_window_layers_run_with_the_window_as_their_context():
    window = 15  # prompt width 9 leaves a horizon of 6, which HF's windowed attention computes as full attention
    model = qwen3(use_sliding_window=True, sliding_window=window, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    engine = RolloutEngine(model, teacher=model, horizon=10, temperature=0, pad_token_id=0)
    assert engine.student.sliding_window == window == engine.student.max_positions
    batch = engine.generate(PROMPTS)
    assert batch.horizon == window - 9
    assert torch.equal(batch.completion_ids, hf_greedy(model, batch, batch.horizon))
    p = batch.prompt_width
    with torch.no_grad():
        ref = hf_hidden(model, batch.input_ids, batch.attention_mask)[:, p - 1 : -1]
    torch.testing.assert_close(engine.score(batch), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="15 positions .*sliding-window"):
        engine.generate([list(range(1, 16))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_cuda_graph_decode_equals_eager_on_gpu(dtype):
    model = qwen3(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=48).to("cuda", dtype)
    eager = RolloutEngine(model, horizon=24, num_samples=2, temperature=0, eos_token_id=7)
    graphed = RolloutEngine(model, horizon=24, num_samples=2, temperature=0, eos_token_id=7, cuda_graphs=True)
    a, b = eager.generate(PROMPTS), graphed.generate(PROMPTS)
    assert torch.equal(a.input_ids, b.input_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=0)
    if dtype == torch.float32:
        ref = hf_greedy(model, a, 24, eos_token_id=7)
        assert torch.equal(b.completion_ids[:, : ref.shape[1]], ref[:, : b.completion_ids.shape[1]])
