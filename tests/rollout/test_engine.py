"""RolloutEngine against Hugging Face generate and plain full forwards, on random-weight models built from configs."""

import contextlib
import gc
import logging
import weakref

import numpy as np
import pytest
import torch
import transformers
from hf_reference import hf_greedy

from fastopd.models import Transformer, TransformerConfig, build_attention_mask
from fastopd.models.layers import positions_from_mask
from fastopd.rollout import Horizon, ModelAdapter, RolloutEngine, as_adapter

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 96
PROMPTS = [[5, 6, 7, 8, 9], [1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


def llama(seed=0, hidden=64, layers=2, heads=4, kv_heads=2, max_pos=128):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=max_pos, initializer_range=0.1)
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, initializer_range=0.1)
    return transformers.GPT2LMHeadModel(cfg).eval()


def qwen2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                                   initializer_range=0.1, tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def builtin(seed=0, hidden=48):
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=80, num_layers=2, num_heads=4,
                            num_kv_heads=2, max_position_embeddings=128, initializer_range=0.2)
    return Transformer(cfg).eval()


def full_hidden(model, ids, mask):
    """Plain forward (no cache) final hidden states [B, S, D] of padded rows, positions counted from the mask."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        if isinstance(model, Transformer):
            return model(ids, positions, mask)
        base = model.transformer if hasattr(model, "transformer") else model.model
        return base(input_ids=ids, attention_mask=mask.long(), position_ids=positions).last_hidden_state


def full_logits(model, ids, mask):
    adapter = as_adapter(model)
    return adapter.logits(full_hidden(model, ids, mask))


def mistral(seed=0, sliding_window=None):
    torch.manual_seed(seed)
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     initializer_range=0.1, sliding_window=sliding_window)
    return transformers.MistralForCausalLM(cfg).eval()


def qwen3(seed=0):
    """Qwen3: per-head q/k RMSNorm (weights perturbed from HF's init of ones, q's unlike k's), head_dim 12 against
    hidden / heads = 10, GQA 5:1 (odd head counts), tied head."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=50, intermediate_size=70, num_hidden_layers=2,
                                   num_attention_heads=5, num_key_value_heads=1, head_dim=12,
                                   max_position_embeddings=128, initializer_range=0.15, tie_word_embeddings=True)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("norm.weight"):
                prm.add_(0.5 * torch.randn_like(prm))
    return model


HF_MODELS = [pytest.param(llama, id="llama-gqa"), pytest.param(gpt2, id="gpt2"), pytest.param(qwen2, id="qwen2-tied"),
             pytest.param(mistral, id="mistral-no-window"), pytest.param(qwen3, id="qwen3-qk-norm-tied")]


@pytest.mark.parametrize("prompts", [pytest.param(PROMPTS, id="mixed-lengths"),
                                     pytest.param([p[:2] for p in PROMPTS[:3]], id="no-padding")])
@pytest.mark.parametrize("make", HF_MODELS)
@pytest.mark.parametrize("layout", [pytest.param("auto", id="decode-kernel"), pytest.param("torch", id="torch-mm")])
def test_greedy_equals_hf_generate(make, prompts, layout, monkeypatch):
    """Mixed prompt lengths run the decode step under an additive padding mask, equal lengths without a mask;
    with fastopd's CPU decode kernel (where it is built) and with FASTOPD_IMPL=torch's torch.mm layout."""
    if layout == "torch":
        monkeypatch.setenv("FASTOPD_IMPL", "torch")
    model = make()
    engine = RolloutEngine(model, horizon=Horizon.full(14), temperature=0, pad_token_id=0)
    batch = engine.generate(prompts)
    assert torch.equal(batch.completion_ids, hf_greedy(model, batch, 14))
    assert batch.completion_mask.all() and batch.truncated.all() and batch.horizon == 14


@pytest.mark.parametrize("make", HF_MODELS)
def test_greedy_with_eos_equals_hf_generate(make):
    """EOS chosen among tokens the greedy run emits: per-sequence stop, EOS kept in the completion mask, padding
    after it, exactly as HF generate pads finished rows."""
    model = make()
    free = RolloutEngine(model, horizon=12, temperature=0, pad_token_id=0).generate(PROMPTS)
    eos = int(free.completion_ids[1, 3])
    engine = RolloutEngine(model, horizon=12, temperature=0, eos_token_id=eos, pad_token_id=0)
    batch = engine.generate(PROMPTS)
    ref = hf_greedy(model, batch, 12, eos_token_id=eos)
    assert torch.equal(batch.completion_ids[:, : ref.shape[1]], ref)
    assert (batch.completion_ids[:, ref.shape[1] :] == 0).all()
    comp = batch.completion_ids
    for r in range(comp.shape[0]):
        hits = (comp[r] == eos).nonzero()
        stop = int(hits[0]) + 1 if hits.numel() and batch.completion_mask[r, hits[0]] else 12
        assert batch.completion_mask[r].tolist() == [True] * stop + [False] * (12 - stop)
        assert bool(batch.truncated[r]) == (stop == 12 and comp[r, -1] != eos)
    assert not batch.truncated[1]


def test_early_exit_when_every_sequence_stopped():
    model = builtin()
    first = RolloutEngine(model, horizon=1, temperature=0).generate([[7]])
    eos = int(first.completion_ids[0, 0])
    engine = RolloutEngine(model, horizon=50, temperature=0, eos_token_id=[eos, VOCAB - 1], pad_token_id=3)
    batch = engine.generate([[7], [7]])
    assert engine.last_stats["decode_steps"] == 1
    assert batch.completion_ids.shape == (2, 50) and (batch.completion_ids[:, 1:] == 3).all()
    assert batch.completion_mask[:, 0].all() and not batch.completion_mask[:, 1:].any() and not batch.truncated.any()


def test_builtin_greedy_equals_naive_recompute_loop():
    model = builtin()
    batch = RolloutEngine(model, horizon=10, temperature=0).generate(PROMPTS)
    p = batch.prompt_width
    ids, mask = batch.input_ids[:, :p], batch.attention_mask[:, :p]
    for _ in range(10):
        nxt = full_logits(model, ids, mask)[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(batch.input_ids, ids)


class _BooleanMaskAdapter(ModelAdapter):
    """A minimal custom adapter (embeddings, one attention layer, a head) written to `ModelAdapter.forward`'s
    contract: it masks scores with `~mask`, which only the documented boolean mask supports."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.ModuleDict(dict(embed=torch.nn.Embedding(VOCAB, 16), pos=torch.nn.Embedding(64, 16),
                                              qkv=torch.nn.Linear(16, 48), head=torch.nn.Linear(16, VOCAB)))
        self.vocab_size, self.hidden_size, self.num_layers, self.num_kv_heads, self.head_dim = VOCAB, 16, 1, 1, 16
        self.max_positions = 64

    @property
    def output_weight(self):
        return self.model["head"].weight

    @property
    def output_bias(self):
        return self.model["head"].bias

    def forward(self, input_ids, positions, mask, cache=None, start=0, expand=1):
        x = self.model["embed"](input_ids) + self.model["pos"](positions)
        q, k, v = self.model["qkv"](x)[:, None].chunk(3, -1)  # [B, 1, T, 16] each
        if cache is not None:
            cache.write(0, start, k, v, expand)
            if start > 0:
                k, v = cache.layer(0)
        assert mask.shape[-1] == k.shape[2], "the mask spans the keys: the cache's active window with a cache"
        scores = (q @ k.transpose(-1, -2) / 4).masked_fill(~mask, float("-inf"))
        return x + (scores.softmax(-1) @ v)[:, 0]


def test_custom_adapter_forward_gets_a_boolean_mask_on_padded_prompts():
    """Mixed prompt lengths make the engine's eager decode mask an additive one; the default decode step hands the
    adapter's forward its boolean form over the cache's whole active window (what cache.layer returns, as in
    scoring), and the rollout equals a greedy loop of plain forwards (no cache)."""
    adapter = _BooleanMaskAdapter()
    batch = RolloutEngine(adapter, horizon=6, temperature=0).generate(PROMPTS)
    p = batch.prompt_width
    ids, mask = batch.input_ids[:, :p], batch.attention_mask[:, :p]
    logprobs = []
    with torch.no_grad():
        for _ in range(6):
            hidden = adapter.forward(ids, positions_from_mask(mask), build_attention_mask(mask, 0, ids.shape[1]))
            logp = adapter.logits(hidden[:, -1]).log_softmax(-1)
            nxt = logp.argmax(-1)
            logprobs.append(logp.gather(-1, nxt[:, None])[:, 0])
            ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(batch.input_ids, ids)
    torch.testing.assert_close(batch.logprobs, torch.stack(logprobs, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make,kw",
    [pytest.param(builtin, dict(temperature=1.0), id="builtin-T1"),
     pytest.param(llama, dict(temperature=0.7, top_k=20, top_p=0.9), id="llama-T0.7-topk20-topp0.9"),
     pytest.param(gpt2, dict(temperature=1.3, top_p=0.95), id="gpt2-T1.3-topp0.95")],
)
def test_sampled_logprobs_equal_full_forward_and_seed_reproduces(make, kw):
    model = make()
    engine = RolloutEngine(model, horizon=9, num_samples=3, eos_token_id=5, pad_token_id=0, **kw)
    torch.manual_seed(1234)
    batch = engine.generate(PROMPTS)
    torch.manual_seed(1234)
    again = engine.generate(PROMPTS)
    assert torch.equal(batch.input_ids, again.input_ids) and torch.equal(batch.logprobs, again.logprobs)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = RolloutEngine(model, horizon=9, num_samples=3, generator=g1, **kw).generate(PROMPTS)
    b = RolloutEngine(model, horizon=9, num_samples=3, generator=g2, **kw).generate(PROMPTS)
    assert torch.equal(a.input_ids, b.input_ids)

    p, h = batch.prompt_width, batch.horizon
    logits = full_logits(model, batch.input_ids, batch.attention_mask)[:, p - 1 : p - 1 + h]
    ref = (logits.double() / kw["temperature"]).log_softmax(-1).gather(-1, batch.completion_ids[..., None])[..., 0]
    ref = ref.masked_fill(~batch.completion_mask, 0.0)
    torch.testing.assert_close(batch.logprobs.double(), ref, rtol=1e-5, atol=1e-5)
    assert batch.input_ids.shape == (len(PROMPTS) * 3, p + h)
    assert torch.equal(batch.prompt_lengths, torch.tensor([len(x) for x in PROMPTS]).repeat_interleave(3))


def test_prefix_sharing_matches_separate_prefill():
    model = llama()
    kw = dict(horizon=8, num_samples=4, temperature=1.0)
    shared = RolloutEngine(model, **kw, generator=torch.Generator().manual_seed(9))
    separate = RolloutEngine(model, **kw, share_prefix=False, generator=torch.Generator().manual_seed(9))
    a, b = shared.generate(PROMPTS), separate.generate(PROMPTS)
    assert torch.equal(a.input_ids, b.input_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    width = a.prompt_width
    assert shared.last_stats["prefill_tokens"] == len(PROMPTS) * width
    assert separate.last_stats["prefill_tokens"] == 4 * len(PROMPTS) * width
    assert shared.last_stats["prefill_tokens_saved"] == 3 * len(PROMPTS) * width
    assert len({tuple(r) for r in a.completion_ids[:4].tolist()}) > 1  # samples of one prompt differ


@pytest.mark.parametrize(
    "student,teacher",
    [pytest.param(llama, lambda: llama(seed=1, hidden=96, layers=3, heads=6, kv_heads=3), id="llama-to-llama96"),
     pytest.param(builtin, gpt2, id="builtin-to-gpt2"), pytest.param(gpt2, qwen2, id="gpt2-to-qwen2")],
)
def test_score_equals_plain_teacher_forward(student, teacher):
    s, t = student(), teacher()
    engine = RolloutEngine(s, teacher=t, horizon=7, num_samples=2, temperature=1.0, eos_token_id=4)
    torch.manual_seed(0)
    batch = engine.generate(PROMPTS)
    hidden = engine.score(batch)
    p, h = batch.prompt_width, batch.horizon
    assert hidden.shape == (8, h, as_adapter(t).hidden_size) and not hidden.requires_grad
    ref = full_hidden(t, batch.input_ids, batch.attention_mask)[:, p - 1 : p - 1 + h]
    m = batch.completion_mask
    torch.testing.assert_close(hidden[m], ref[m], rtol=1e-5, atol=1e-5)


def test_score_with_privileged_teacher_prompts():
    s, t = builtin(), llama(seed=3)
    engine = RolloutEngine(s, teacher=t, horizon=6, num_samples=2, temperature=1.0)
    batch = engine.generate(PROMPTS)
    privileged = [[9] * 4 + x + [17, 18] for x in PROMPTS]
    hidden = engine.score(batch, teacher_prompts=privileged)
    for r in range(8):
        ids = torch.tensor(privileged[r // 2] + batch.completion_ids[r].tolist())[None]
        ref = full_hidden(t, ids, torch.ones_like(ids, dtype=torch.bool))[0, len(privileged[r // 2]) - 1 :][:6]
        torch.testing.assert_close(hidden[r], ref, rtol=1e-5, atol=1e-5)
    per_row = engine.score(batch, teacher_prompts=[privileged[r // 2] for r in range(8)])
    torch.testing.assert_close(per_row, hidden, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        engine.score(batch, teacher_prompts=privileged[:3])


def test_student_hidden_has_autograd_and_matches_logprobs_and_loss():
    from fastopd import fused_linear_divergence

    s, t = builtin(), builtin(seed=1, hidden=64)
    engine = RolloutEngine(s, teacher=t, horizon=8, num_samples=2, temperature=1.0, eos_token_id=4)
    batch = engine.generate(PROMPTS)
    hs = engine.student_hidden(batch)
    assert hs.shape == (8, 8, 48) and hs.requires_grad
    ref = (hs @ engine.student_output_weight.T).double().log_softmax(-1)
    ref = ref.gather(-1, batch.completion_ids[..., None])[..., 0].masked_fill(~batch.completion_mask, 0)
    torch.testing.assert_close(batch.logprobs.double(), ref, rtol=1e-5, atol=1e-5)
    ht = engine.score(batch)
    loss = fused_linear_divergence(hs.reshape(-1, 48), engine.student_output_weight, ht.reshape(-1, 64),
                                   engine.teacher_output_weight, batch.labels().reshape(-1), divergence="fkl")
    loss.backward()
    assert torch.isfinite(loss) and s.lm_head.weight.grad is not None and s.embed_tokens.weight.grad.abs().sum() > 0
    assert t.lm_head.weight.grad is None


def _noise(prm, seed):
    return 0.1 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(seed))


def _add_in_place(model):
    with torch.no_grad():
        for i, prm in enumerate(model.parameters()):
            prm.add_(_noise(prm, i))  # bumps the version counters


def _write_through_data(model):
    for i, prm in enumerate(model.parameters()):
        prm.data.copy_(prm.data + _noise(prm, i))  # .data has its own version counter: the parameters' stay


def _fused_adamw_step(model):
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)  # leaves the version counters alone
    ids = torch.tensor([PROMPTS[0] + PROMPTS[2]])
    model(input_ids=ids).logits.logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _sparse_adamw_step(model):
    from fastopd.optim import SparseMaskedAdamW

    named = [(n, prm) for n, prm in model.named_parameters() if prm.dim() == 2]
    masks = {n: torch.rand(prm.shape, generator=torch.Generator().manual_seed(i)) < 0.3
             for i, (n, prm) in enumerate(named)}
    opt = SparseMaskedAdamW(named, masks=masks, lr=0.05)
    ids = torch.tensor([PROMPTS[0] + PROMPTS[2]])
    model(input_ids=ids).logits.logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _replace_parameters(model):
    for i, module in enumerate(model.modules()):
        for name, prm in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(prm.detach() + _noise(prm, i)))  # new storage


@pytest.mark.parametrize("update", [
    pytest.param(_add_in_place, id="in-place-add"), pytest.param(_write_through_data, id="data-copy"),
    pytest.param(_fused_adamw_step, id="fused-adamw"), pytest.param(_sparse_adamw_step, id="sparse-adamw"),
    pytest.param(_replace_parameters, id="new-parameters")])
@pytest.mark.parametrize("make", [pytest.param(llama, id="llama"), pytest.param(gpt2, id="gpt2"),
                                  pytest.param(qwen3, id="qwen3")])
def test_weight_update_between_generate_calls_is_picked_up(make, update):
    """The decode step's packed/transposed weight copies are kept between calls; every kind of weight update
    (including those that leave the version counters alone) makes the next call use the new weights."""
    model = make()
    engine = RolloutEngine(model, horizon=10, temperature=0, pad_token_id=0)
    before = engine.generate(PROMPTS)
    assert torch.equal(engine.generate(PROMPTS).input_ids, before.input_ids)  # cached copies, same tokens
    update(model)
    after = engine.generate(PROMPTS)
    p = after.prompt_width
    assert torch.equal(after.completion_ids, hf_greedy(model, after, 10))
    assert not torch.equal(after.completion_ids, before.completion_ids)
    logits = full_logits(model, after.input_ids, after.attention_mask)[:, p - 1 : p + 9]
    ref_logprobs = logits.log_softmax(-1).gather(-1, after.completion_ids[..., None])[..., 0]
    torch.testing.assert_close(after.logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)


def _cast_to_bf16(model):
    model.to(torch.bfloat16)


def _cast_weights_keep_fp32_inv_freq(model):
    owner = model if isinstance(model, Transformer) else model.model.rotary_emb
    inv_freq = owner.inv_freq  # the same fp32 tensor put back: only the weights' dtype tells the change
    model.to(torch.bfloat16)
    owner.inv_freq = inv_freq


@pytest.mark.parametrize("cast", [pytest.param(_cast_to_bf16, id="model-to-bf16"),
                                  pytest.param(_cast_weights_keep_fp32_inv_freq, id="bf16-weights-fp32-inv-freq")])
@pytest.mark.parametrize("make", [pytest.param(builtin, id="builtin"), pytest.param(llama, id="llama"),
                                  pytest.param(qwen3, id="qwen3")])
def test_dtype_cast_after_engine_built_equals_fresh_engine(make, cast):
    """Casting the model after a generate call: the engine's next rollout uses the model's current RoPE buffer and a
    rotary table of the new dtype, exactly as an engine built after the cast."""
    model = make()
    engine = RolloutEngine(model, horizon=8, temperature=0, pad_token_id=0)
    engine.generate(PROMPTS)
    cast(model)
    got = engine.generate(PROMPTS)
    ref = RolloutEngine(model, horizon=8, temperature=0, pad_token_id=0).generate(PROMPTS)
    assert torch.equal(got.input_ids, ref.input_ids)
    torch.testing.assert_close(got.logprobs, ref.logprobs, rtol=0, atol=0)


def test_kv_cache_sized_to_horizon_reused_and_grown():
    model = builtin()
    engine = RolloutEngine(model, horizon=Horizon.progressive(start=4, step=4, every=2, max_new_tokens=16),
                           temperature=0)
    prompts = [[1, 2, 3], [4, 5]]
    engine.generate(prompts, step=0)
    cache = engine._caches["student"]
    assert cache.capacity == (2, 3 + 4)
    first_bytes = engine.kv_cache_bytes
    per_column = first_bytes // 7
    assert first_bytes == 2 * 2 * 2 * 2 * 7 * 12 * 4  # k+v, layers, batch, kv heads, columns, head dim, fp32
    engine.generate(prompts, step=1)
    assert engine._caches["student"] is cache  # same horizon: reused
    batch = engine.generate(prompts, step=2)
    assert batch.horizon == 8 and engine._caches["student"].capacity == (2, 11)
    assert engine.kv_cache_bytes == per_column * 11 == engine.last_stats["kv_cache_bytes"]
    engine.generate([[1]], step=0)
    assert engine._caches["student"].capacity == (2, 11)  # smaller request fits: no reallocation
    engine.release_caches()
    assert engine.kv_cache_bytes == 0
    engine.generate(prompts, step=0)
    assert engine._caches["student"].capacity == (2, 7)


def _tensor_bytes(value):
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):  # a PackedLlamaLayer, the rotary (cos, sin) pair, a snapshot list
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _decode_copy_bytes(adapter):
    """Bytes held by a Llama-family adapter's derived decode copies: packed layers, rotary table, head, snapshots."""
    derived = [*adapter._packed, adapter._rope, adapter._head_t, adapter._head_mkl]
    return sum(_tensor_bytes(d._value) + _tensor_bytes(d._snapshot) for d in derived)


@pytest.mark.parametrize("make", [pytest.param(builtin, id="builtin"), pytest.param(llama, id="llama")])
def test_release_caches_frees_packed_layer_copies(make):
    """release_caches() frees every derived decode copy, including the per-layer packed weights held in a list."""
    engine = RolloutEngine(make(), horizon=4, temperature=0, pad_token_id=0)
    before = engine.generate(PROMPTS)
    assert sum(_tensor_bytes(d._value) for d in engine.student._packed) > 0
    engine.release_caches()
    assert _decode_copy_bytes(engine.student) == 0 and engine.kv_cache_bytes == 0
    assert torch.equal(engine.generate(PROMPTS).input_ids, before.input_ids)  # rebuilt on the next call


def test_kv_cache_growth_frees_the_old_cache_before_allocating(monkeypatch):
    """When a longer horizon grows the cache, the old storage is gone by the time the new one is allocated."""
    engine = RolloutEngine(builtin(), horizon=Horizon.progressive(start=4, step=4, every=1, max_new_tokens=16),
                           temperature=0)
    engine.generate([[1, 2, 3]], step=0)
    old_storage = weakref.ref(engine._caches["student"].storage)
    old_alive_at_allocation = []
    new_cache = engine.student.new_cache

    def spy(batch_size, length):
        old_alive_at_allocation.append(old_storage() is not None)
        return new_cache(batch_size, length)

    monkeypatch.setattr(engine.student, "new_cache", spy)
    engine.generate([[1, 2, 3]], step=1)
    assert old_alive_at_allocation == [False]


def test_horizon_capped_by_context_and_recorded():
    model = builtin()
    engine = RolloutEngine(model, horizon=500, temperature=0)
    batch = engine.generate([[1] * 120])
    assert batch.horizon == 8 and batch.input_ids.shape == (1, 128)


def test_tensor_prompts_any_padding_side_equal_list_prompts():
    model = builtin()
    engine = RolloutEngine(model, horizon=5, temperature=0)
    ref = engine.generate(PROMPTS)
    width = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(PROMPTS):  # right padding
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    got = engine.generate(ids, mask)
    assert torch.equal(got.input_ids, ref.input_ids) and torch.equal(got.attention_mask, ref.attention_mask)


def test_integer_like_prompt_ids_equal_int_lists():
    """NumPy integer rows and integer tensor rows are token ids like Python ints (only bools and floats are not)."""
    engine = RolloutEngine(builtin(), horizon=3, temperature=0)
    ref = engine.generate(PROMPTS[:3])
    got = engine.generate([np.array(PROMPTS[0]), torch.tensor(PROMPTS[1]), [np.int32(x) for x in PROMPTS[2]]])
    assert torch.equal(got.input_ids, ref.input_ids)


@pytest.mark.parametrize(
    "call,match",
    [pytest.param(lambda e: e.generate([]), "at least one prompt", id="no-prompts"),
     pytest.param(lambda e: e.generate([[1, 2], []]), r"prompts\[1\] is empty", id="empty-prompt"),
     pytest.param(lambda e: e.generate([[1] * 128]), "context", id="prompt-too-long"),
     pytest.param(lambda e: e.generate([[1, VOCAB]]), "vocabulary", id="id-eq-vocab"),
     pytest.param(lambda e: e.generate([[-1, 3]]), "vocabulary", id="negative-id"),
     pytest.param(lambda e: e.generate([[1]], step=-1), "step", id="negative-step"),
     pytest.param(lambda e: e.generate(torch.ones(2, 3)), "integer ids", id="float-tensor"),
     pytest.param(lambda e: e.generate(torch.ones(2, 3, dtype=torch.bool)), "integer ids", id="bool-tensor"),
     pytest.param(lambda e: e.generate([[1, 2], [1.7, 2.9]]), r"prompts\[1\] .*1\.7 at position 0",
                  id="float-ids-in-list"),
     pytest.param(lambda e: e.generate([[1, 2], [3, 2.0]]), r"prompts\[1\] .*2\.0 at position 1",
                  id="integral-float-id-in-list"),
     pytest.param(lambda e: e.generate([[True, False]]), r"prompts\[0\] .*True at position 0", id="bool-ids-in-list"),
     pytest.param(lambda e: e.generate([[1, 2], torch.tensor([1.0, 2.0])]), r"prompts\[1\] .*1\.0",
                  id="float-tensor-row"),
     pytest.param(lambda e: e.generate([torch.tensor([True, True])]), r"prompts\[0\] .*True", id="bool-tensor-row"),
     pytest.param(lambda e: e.generate(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4)), "does not match",
                  id="mask-shape")],
)
def test_bad_input_raises(call, match):
    engine = RolloutEngine(builtin(), horizon=4, temperature=0)
    with pytest.raises(ValueError, match=match):
        call(engine)


@pytest.mark.parametrize(
    "kw,match",
    [pytest.param(dict(horizon=0), "positive int", id="horizon0"),
     pytest.param(dict(horizon=lambda k: 0), "positive int", id="callable-horizon0"),
     pytest.param(dict(horizon=4, num_samples=0), "num_samples", id="samples0"),
     pytest.param(dict(horizon=4, temperature=-1.0), "temperature", id="neg-temperature"),
     pytest.param(dict(horizon=4, temperature=float("inf")), "temperature must be a number >= 0 and finite",
                  id="inf-temperature"),
     pytest.param(dict(horizon=4, temperature=float("nan")), "temperature", id="nan-temperature"),
     pytest.param(dict(horizon=4, top_p=0.0), "top_p", id="top_p0"),
     pytest.param(dict(horizon=4, top_k=-3), "top_k", id="neg-topk"),
     pytest.param(dict(horizon=4, temperature="1"), "temperature must be a number", id="str-temperature"),
     pytest.param(dict(horizon=4, top_p="0.5"), "top_p must be a number", id="str-top_p"),
     pytest.param(dict(horizon=4, top_k=2.0), "top_k", id="float-topk"),
     pytest.param(dict(horizon=4, top_p=torch.tensor([0.5, 0.5])), "top_p must be a number", id="two-element-top_p"),
     pytest.param(dict(horizon=2.5), "horizon must be", id="float-horizon"),
     pytest.param(dict(horizon=4, eos_token_id=VOCAB), "eos_token_id", id="eos-outside-vocab"),
     pytest.param(dict(horizon=4, pad_token_id=VOCAB + 5), "pad_token_id", id="pad-outside-vocab"),
     pytest.param(dict(horizon=4, eos_token_id=True), "eos_token_id", id="eos-bool"),
     pytest.param(dict(horizon=4, eos_token_id=[3, np.True_]), "eos_token_id", id="eos-numpy-bool-in-list"),
     pytest.param(dict(horizon=4, eos_token_id=torch.tensor(3.0)), "eos_token_id", id="eos-float-tensor"),
     pytest.param(dict(horizon=4, eos_token_id=torch.tensor(VOCAB)), r"eos_token_id=96 is outside",
                  id="eos-tensor-outside-vocab"),
     pytest.param(dict(horizon=4, pad_token_id=np.float64(3.0)), "pad_token_id", id="pad-numpy-float"),
     pytest.param(dict(horizon=4, pad_token_id=torch.tensor(True)), "pad_token_id", id="pad-bool-tensor")],
)
def test_bad_engine_settings_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        RolloutEngine(builtin(), **kw).generate([[1, 2]])


@pytest.mark.parametrize("horizon", [pytest.param(0, id="zero"), pytest.param(-3, id="negative"),
                                     pytest.param(np.int64(0), id="numpy-zero")])
def test_a_fixed_non_positive_horizon_is_refused_when_the_engine_is_built(horizon):
    """It was accepted, and refused only by the first generate (possibly after the training setup)."""
    with pytest.raises(ValueError, match="horizon must be a positive int"):
        RolloutEngine(builtin(), horizon=horizon)


@pytest.mark.parametrize("method", ["score", "student_hidden"])
def test_score_and_student_hidden_name_a_batch_that_is_not_a_rollout_batch(method):
    """A dict or the ids tensor gave an AttributeError from inside the method."""
    model = builtin()
    engine = RolloutEngine(model, teacher=model, horizon=3, temperature=0)
    with pytest.raises(TypeError, match=f"RolloutEngine.{method} takes the RolloutBatch that generate returned, "
                                        "got Tensor"):
        getattr(engine, method)(engine.generate(PROMPTS[:2]).input_ids)


@pytest.mark.parametrize("eos,pad,eos_ids", [
    pytest.param(np.int64(3), np.int64(7), [3], id="numpy-ints"),
    pytest.param(torch.tensor(3), torch.tensor(7), [3], id="0d-tensors"),
    pytest.param([np.int32(3), torch.tensor(5)], np.int64(7), [3, 5], id="list-of-int-likes"),
    pytest.param(torch.tensor([3, 5]), 7, [3, 5], id="1d-tensor-eos")])
def test_int_like_special_ids_equal_python_ints(eos, pad, eos_ids):
    """eos_token_id/pad_token_id given as NumPy integers or integer tensors act as the same Python ints."""
    model = builtin()
    engine = RolloutEngine(model, horizon=6, temperature=0, eos_token_id=eos, pad_token_id=pad)
    assert engine.eos_ids == eos_ids and all(type(i) is int for i in engine.eos_ids)
    assert engine.pad_token_id == 7 and type(engine.pad_token_id) is int
    ref = RolloutEngine(model, horizon=6, temperature=0, eos_token_id=eos_ids, pad_token_id=7)
    got, want = engine.generate(PROMPTS), ref.generate(PROMPTS)
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.completion_mask, want.completion_mask)


def test_numpy_and_tensor_settings_equal_python_numbers():
    """Settings given as NumPy numbers or integer tensors (a config read through numpy) act as the same Python
    numbers, as token ids already do."""
    model = builtin()
    kw = dict(horizon=np.int64(5), num_samples=np.int64(2), temperature=torch.tensor(0.7), top_k=np.int64(7),
              top_p=np.float64(0.9))
    torch.manual_seed(3)
    got = RolloutEngine(model, **kw).generate(PROMPTS, step=torch.tensor(2))
    torch.manual_seed(3)
    want = RolloutEngine(model, horizon=5, num_samples=2, temperature=float(torch.tensor(0.7)), top_k=7,
                         top_p=0.9).generate(PROMPTS, step=2)
    assert torch.equal(got.input_ids, want.input_ids) and got.horizon == want.horizon == 5
    assert type(got.horizon) is int


def test_score_errors():
    s = builtin()
    batch = RolloutEngine(s, horizon=3).generate([[1, 2]])
    with pytest.raises(ValueError, match="needs a teacher"):
        RolloutEngine(s, horizon=3).score(batch)
    with pytest.raises(ValueError, match="teacher_attention_mask .* without teacher_prompts"):
        RolloutEngine(s, teacher=s, horizon=3).score(batch, teacher_attention_mask=torch.ones(1, 2))
    small_vocab = Transformer(TransformerConfig(vocab_size=8, hidden_size=16, intermediate_size=16, num_layers=1,
                                                num_heads=2))
    batch.input_ids[:, -1] = 50
    with pytest.raises(ValueError, match="vocabulary"):
        RolloutEngine(s, teacher=small_vocab, horizon=3).score(batch)
    batch = RolloutEngine(s, horizon=8, temperature=0).generate([[1, 2, 3, 4]])
    assert batch.horizon == 8
    for ctx, fits in ((10, False), (11, True)):  # scoring feeds prompt + completion[:-1]: 4 + 8 - 1 positions
        short = Transformer(TransformerConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=16, num_layers=1,
                                              num_heads=2, max_position_embeddings=ctx))
        if fits:
            assert RolloutEngine(s, teacher=short, horizon=8).score(batch).shape[:2] == (1, 8)
        else:
            with pytest.raises(ValueError, match="needs 11 positions .* teacher's context 10"):
                RolloutEngine(s, teacher=short, horizon=8).score(batch)


def test_unsupported_model_raises():
    with pytest.raises(ValueError, match="no rollout adapter"):
        RolloutEngine(torch.nn.Linear(3, 3), horizon=3)


@pytest.mark.parametrize("make", [pytest.param(builtin, id="builtin"), pytest.param(llama, id="llama"),
                                  pytest.param(qwen3, id="qwen3")])
def test_decode_step_with_tensor_column_and_full_mask(make):
    """The CUDA-graph form of the decode step (column as a device tensor, one static full-width mask) computes
    what the eager CPU form (int column, mask narrowed to the filled columns) computes."""
    adapter = as_adapter(make())
    cfg_cache = [adapter.new_cache(3, 12) for _ in range(2)]
    ids = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4], [0, 9, 8, 7]])
    mask = ids != 0
    mask[1, 0] = True
    with torch.inference_mode():
        for cache in cfg_cache:
            adapter.forward(ids, (mask.long().cumsum(-1) - 1).clamp(min=0), build_attention_mask(mask, 0, 4), cache)
        step = adapter.prepare_decode()
        key_mask = torch.zeros(3, 12, dtype=torch.bool)
        key_mask[:, :4] = mask
        positions = mask.sum(1, keepdim=True)
        tok = torch.tensor([11, 12, 13])
        for t in range(3):
            key_mask[:, 4 + t] = True
            a = step(tok + t, positions + t, key_mask[:, None, None, : 5 + t], cfg_cache[0], 4 + t)
            b = step(tok + t, positions + t, key_mask[:, None, None, :], cfg_cache[1], torch.tensor(4 + t))
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            ref = adapter.logits(adapter.forward((tok + t)[:, None], positions + t, key_mask[:, None, None, :],
                                                 cfg_cache[1], 4 + t))[:, 0]
            torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_cuda_graph_decode_equals_eager_on_gpu(dtype):
    model = llama(hidden=128, layers=3, heads=4, kv_heads=2).to("cuda", dtype)
    eager = RolloutEngine(model, horizon=24, num_samples=2, temperature=0, eos_token_id=7)
    graphed = RolloutEngine(model, horizon=24, num_samples=2, temperature=0, eos_token_id=7, cuda_graphs=True)
    a, b = eager.generate(PROMPTS), graphed.generate(PROMPTS)
    assert torch.equal(a.input_ids, b.input_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=0)
    ref = hf_greedy(model, a, 24, eos_token_id=7, pad_token_id=7)
    if dtype == torch.float32:
        assert torch.equal(b.completion_ids[:, : ref.shape[1]], ref)


class _CpuCudaGraph:
    """torch.cuda.CUDAGraph on the CPU with a graph's ownership: capture records the one decode-step call made under
    it, keeping the step and its inputs by weak reference only (a CUDA graph holds raw device addresses, not owners:
    what its kernels read must be kept alive by someone else), and its output by strong reference (the capture pool
    owns it); every replay reruns that call from the same buffers into the same output, so the engine's in-place
    buffer updates, the capture's warm-up writes and reuse of the logits buffer are exercised as on a GPU. With
    ``collect``, each replay first runs gc.collect() (about 0.1 s), so that unowned objects in reference cycles are
    gone too."""

    capturing: "_CpuCudaGraph | None" = None

    def __init__(self, collect):
        self.call = None
        self.collect = collect
        self.alive_at_replay = []  # per replay: whether the step and each of its inputs still existed

    def replay(self):
        if self.collect:
            gc.collect()
        step_ref, input_refs, out = self.call
        step, inputs = step_ref(), [r() for r in input_refs]
        self.alive_at_replay.append([step is not None] + [x is not None for x in inputs])
        if step is not None and all(x is not None for x in inputs):
            out.copy_(step(*inputs))


class _RecordingStep:
    """Wraps the decode step that prepare_decode returned: the call made under a `_CpuCudaGraph` capture is recorded
    into that graph."""

    def __init__(self, step):
        self.step, self.head = step, step.head

    def __call__(self, *inputs):
        out = self.step(*inputs)
        if _CpuCudaGraph.capturing is not None:
            _CpuCudaGraph.capturing.call = (weakref.ref(self), [weakref.ref(x) for x in inputs], out)
        return out


class _NoStream:
    def wait_stream(self, other):
        pass


@contextlib.contextmanager
def _capture(graph):
    _CpuCudaGraph.capturing = graph
    try:
        yield
    finally:
        _CpuCudaGraph.capturing = None


def _cpu_cuda_graphs(monkeypatch, engine, collect=False):
    """Runs engine._GraphedDecodeStep itself on the CPU: no-op streams, `_CpuCudaGraph(collect)` for the graph,
    capture allowed. Returns the graphs captured and weak references to the steps that prepare_decode made."""
    import fastopd.rollout.engine as engine_mod

    graphs, steps = [], []
    monkeypatch.setattr(engine_mod, "_can_capture", lambda device: True)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: _NoStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _NoStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: graphs.append(_CpuCudaGraph(collect)) or graphs[-1])
    monkeypatch.setattr(torch.cuda, "graph", _capture)
    prepare = engine.student.prepare_decode

    def prepare_recording(*args, **kwargs):
        step = _RecordingStep(prepare(*args, **kwargs))
        steps.append(weakref.ref(step))
        return step

    monkeypatch.setattr(engine.student, "prepare_decode", prepare_recording)
    return graphs, steps


def test_cuda_graph_step_keeps_the_captured_step_and_inputs_alive_at_every_replay(monkeypatch):
    """The graph reads the step's packed weights, rotary tables and scratch (on CUDA the step is their only owner)
    and the engine's positions, mask and cache by address: the graphed step must own all of them while it replays,
    although the engine drops its own reference to the step once the graph is captured."""
    engine = RolloutEngine(builtin(), horizon=6, num_samples=2, temperature=0, cuda_graphs=True)
    graphs, steps = _cpu_cuda_graphs(monkeypatch, engine, collect=True)
    engine.generate(PROMPTS)
    assert len(graphs) == 1 and len(steps) == 1
    # step, tokens, positions, mask, cache, column at each of the H - 1 replays
    assert graphs[0].alive_at_replay == [[True] * 6] * 5
    gc.collect()
    assert steps[0]() is None  # released with the graph once generate returns


@pytest.mark.parametrize("make", [pytest.param(builtin, id="builtin"), pytest.param(llama, id="llama"),
                                  pytest.param(qwen3, id="qwen3")])
@pytest.mark.parametrize("temperature", [pytest.param(0.0, id="greedy"), pytest.param(1.0, id="sampled")])
def test_cuda_graph_path_equals_eager_with_a_cpu_stand_in_graph(monkeypatch, make, temperature):
    """The graphed decode loop (one static full-width boolean mask whose completion columns turn on as they are
    written, static token/column buffers, one logits buffer), through the real `_GraphedDecodeStep` over a CPU
    stand-in graph, gives the eager loop's rollouts: same tokens, same log-probs, same masks, across mixed prompt
    lengths, EOS stops and several samples per prompt."""
    model = make()
    kw = dict(horizon=12, num_samples=2, temperature=temperature, eos_token_id=7, pad_token_id=0)
    eager = RolloutEngine(model, generator=torch.Generator().manual_seed(3), **kw).generate(PROMPTS)
    engine = RolloutEngine(model, cuda_graphs=True, generator=torch.Generator().manual_seed(3), **kw)
    graphs, _ = _cpu_cuda_graphs(monkeypatch, engine)
    graphed = engine.generate(PROMPTS)
    assert len(graphs) == 1 and graphs[0].alive_at_replay  # the graphed path ran, captured once per generate
    assert torch.equal(eager.input_ids, graphed.input_ids)
    assert torch.equal(eager.completion_mask, graphed.completion_mask)
    assert torch.equal(eager.truncated, graphed.truncated)
    torch.testing.assert_close(eager.logprobs, graphed.logprobs, rtol=1e-5, atol=1e-5)
