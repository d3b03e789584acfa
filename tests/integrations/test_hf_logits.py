"""fastopd.integrations.hf reproduces each architecture's logit post-processing (multipliers in the direction its
modeling file applies them, soft-caps read from the text config of multimodal classes), refuses a forward whose
logits it cannot reproduce, and scales the loss under data parallelism as HF's Trainer.compute_loss does."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

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


def _llama(seed: int = 0):
    return _model(transformers.LlamaConfig(**_DECODER), seed)


def _calls_of(model) -> list[dict]:
    """Records the keyword arguments of every call of `model.forward`."""
    calls, forward = [], model.forward
    model.forward = lambda *a, **k: (calls.append(k), forward(*a, **k))[1]
    return calls


def test_hidden_states_mode_keeps_no_layer_outputs_and_equals_the_forwards_last_hidden_state():
    model = _llama()
    ids = torch.randint(3, VOCAB - 4, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        calls = _calls_of(model)
        got = causal_lm_hidden_states(model, ids, mode="hidden_states")
    assert len(calls) == 1 and not calls[0].get("output_hidden_states")  # L + 1 [B, T, D] outputs were kept
    assert calls[0]["logits_to_keep"] == 1
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_hidden_states_mode_without_a_decoder_falls_back_to_output_hidden_states():
    model = _llama()
    model.get_decoder = lambda: None
    ids = torch.randint(3, VOCAB - 4, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        calls = _calls_of(model)
        got = causal_lm_hidden_states(model, ids, mode="hidden_states")
    assert [c.get("output_hidden_states") for c in calls] == [True]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("grad", [pytest.param(False, id="no-grad-teacher"), pytest.param(True, id="grad-student")])
def test_a_torch_compiled_model_runs_compiled_and_gives_its_final_hidden_states(grad):
    model = _llama().eval()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    assert final_softcap(compiled) is None and lm_head_of(compiled)[0] is model.lm_head.weight
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):  # the second input must not get the first's states
        ids = torch.randint(3, VOCAB - 4, (2, 7), generator=gen)
        with torch.set_grad_enabled(grad):
            got = causal_lm_hidden_states(compiled, ids)
        with torch.no_grad():
            want = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert got.requires_grad == grad
    assert graphs, "the compiled model's forward was bypassed (its decoder ran eagerly)"


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
    pytest.param(_trainer(1, n_gpu=2), 10, 1, id="dataparallel-2gpu-loss-on-the-gathered-batch"),
    pytest.param(_trainer(1, average=False, n_gpu=2), 10, 0.5, id="dataparallel-2gpu-not-averaged"),
    pytest.param(_trainer(4, average=False), 10, 1, id="ddp4-not-averaged-across-devices"),
    pytest.param(_trainer(4), None, 1, id="ddp4-no-num-items"),
    pytest.param(_trainer(4, accepts_loss_kwargs=False), 10, 1, id="ddp4-model-without-loss-kwargs"),
    pytest.param(_trainer(1), 10, 1, id="one-process"),
])
def test_trainer_loss_scale_follows_trainer_compute_loss(trainer, num_items, scale):
    assert trainer_loss_scale(trainer, num_items) == scale


@pytest.mark.parametrize("average", [pytest.param(True, id="average_tokens_across_devices"),
                                     pytest.param(False, id="not-averaged")])
def test_dataparallel_scale_gives_the_trainers_own_loss(average):
    """Under nn.DataParallel HF computes one loss per replica on its share of the batch (normalized by the
    num_items_in_batch it hands each replica), multiplies by n_gpu when averaging tokens, and averages the replicas'
    losses; distillation_loss sees the gathered batch, and trainer_loss_scale must bring it to the same value."""
    config = transformers.LlamaConfig(**_DECODER)
    student, teacher = _model(config, 0), _model(config, 1)
    ids = torch.randint(3, VOCAB, (4, 7), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 5:] = -100
    n_gpu, counted = 2, int((labels[:, 1:] != -100).sum())
    per_replica = counted if average else counted // n_gpu  # Trainer._get_num_items_in_batch
    num_items = torch.tensor(per_replica).unsqueeze(0).expand(n_gpu, -1)  # [n_gpu, 1], as the Trainer passes it
    hf = torch.stack([distillation_loss(student, teacher, ids[i::n_gpu], labels=labels[i::n_gpu],
                                        num_items_in_batch=per_replica) * (n_gpu if average else 1)
                      for i in range(n_gpu)]).mean()
    trainer = _trainer(1, average=average, n_gpu=n_gpu)
    ours = distillation_loss(student, teacher, ids, labels=labels, num_items_in_batch=num_items)
    torch.testing.assert_close(ours * trainer_loss_scale(trainer, num_items), hf, rtol=1e-5, atol=1e-7)


class _LoraLikeHead(nn.Module):
    """The shape of a peft LoRA layer on lm_head: `.weight` is the base layer's, the forward adds B(A(x))."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def test_an_adapter_layer_on_the_lm_head_is_refused():
    config = transformers.LlamaConfig(**_DECODER)
    student, teacher = _model(config, 0), _model(config, 1)
    student.set_output_embeddings(_LoraLikeHead(student.get_output_embeddings()))
    ids = torch.randint(3, VOCAB, (2, 5))
    with pytest.raises(ValueError, match=r"output embedding of LlamaForCausalLM is a PEFT adapter layer "
                                         r"\(.*_LoraLikeHead\): its logits are not hidden @ weight\^T \+ bias"):
        distillation_loss(student, teacher, ids, divergence="fkl")


def test_a_zero3_partitioned_head_is_named():
    config = transformers.LlamaConfig(**_DECODER)
    student, teacher = _model(config, 0), _model(config, 1)
    empty = nn.Parameter(torch.empty(0))
    empty.ds_id = 7  # what DeepSpeed ZeRO-3 leaves in place of a partitioned parameter
    student.get_output_embeddings().weight = empty
    with pytest.raises(ValueError, match=r"weight of LlamaForCausalLM is \(0,\), not \[V, D\]: a DeepSpeed ZeRO-3"):
        distillation_loss(student, teacher, torch.randint(3, VOCAB, (2, 5)))


def test_an_fsdp1_flat_parameter_view_of_the_head_is_named():
    """FSDP1 with use_orig_params=True (HF Trainer's fsdp_config default) leaves the head a 1-D flat view."""
    config = transformers.LlamaConfig(**_DECODER)
    student = _model(config, 0)
    student.get_output_embeddings().weight = nn.Parameter(torch.empty(VOCAB * 32 // 2))
    with pytest.raises(ValueError, match=r"is \(1024,\), not \[V, D\]: a view into an FSDP1 flat parameter"):
        lm_head_of(student)


def test_peft_models_use_their_forward_and_refuse_lora_on_the_lm_head():
    peft = pytest.importorskip("peft")
    config = transformers.LlamaConfig(**_DECODER)
    teacher = _model(config, 1)
    student = peft.get_peft_model(_model(config, 0), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_()
    seen = []
    student.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    ids = torch.randint(3, VOCAB, (2, 6))
    loss = distillation_loss(student, teacher, ids, divergence="fkl")
    assert seen == [1]  # the PeftModel's own forward ran ("hidden_states" mode, logits_to_keep=1), self-checked
    seen.clear()
    torch.testing.assert_close(loss.double(), _fkl_from_logits(student, teacher, ids).detach(), rtol=1e-4, atol=1e-6)
    lora_head = peft.get_peft_model(_model(config, 0), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="is a PEFT adapter layer"):
        distillation_loss(lora_head, teacher, ids, divergence="fkl")
    saved_head = peft.get_peft_model(_model(config, 0), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                        modules_to_save=["lm_head"]))
    tokens = peft.get_peft_model(_model(config, 0), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                    trainable_token_indices={"lm_head": [3, 5]}))
    for model in (saved_head, tokens):  # the wrappers' .weight is their effective weight
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modules_to_save" in name or "trainable_tokens_delta" in name:
                    p.add_(torch.randn_like(p))
        torch.testing.assert_close(distillation_loss(model, teacher, ids, divergence="fkl").double(),
                                   _fkl_from_logits(model, teacher, ids).detach(), rtol=1e-4, atol=1e-6)


_IDS = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("kwargs,message", [
    pytest.param(dict(input_ids=_IDS[0]), r"input_ids must be an integer tensor \[B, T\], got \(7,\)", id="1d-ids"),
    pytest.param(dict(input_ids=_IDS.float()), r"input_ids must be an integer tensor \[B, T\], got \(2, 7\) "
                 r"torch.float32", id="float-ids"),
    pytest.param(dict(attention_mask=torch.ones(2, 5)), r"attention_mask must have input_ids' shape \(2, 7\)",
                 id="mask-2x5"),
    pytest.param(dict(labels=_IDS[:, :5]), r"labels must have input_ids' shape \(2, 7\) .*before any shift\), got "
                 r"\(2, 5\)", id="labels-2x5"),
    pytest.param(dict(teacher_input_ids=_IDS[:, :5]), r"teacher_input_ids must have input_ids' shape", id="t-ids-2x5"),
    pytest.param(dict(teacher_attention_mask=torch.ones(3, 7)), r"teacher_attention_mask must have input_ids' "
                 r"shape \(2, 7\).*got \(3, 7\)", id="t-mask-3x7"),
])
def test_bad_batches_are_refused_naming_the_tensor_before_any_forward(kwargs, message):
    config = transformers.LlamaConfig(**_DECODER)
    student, teacher = _model(config, 0), _model(config, 1)
    calls = []
    student.register_forward_pre_hook(lambda *a: calls.append(1))
    kwargs = dict(input_ids=_IDS) | kwargs
    with pytest.raises(ValueError, match=message):
        distillation_loss(student, teacher, **kwargs)
    assert not calls


def test_a_base_model_without_lm_head_is_named():
    config = transformers.LlamaConfig(**_DECODER)
    with pytest.raises(ValueError, match=r"LlamaModel has no output embedding .*pass a causal LM with an LM head"):
        distillation_loss(transformers.LlamaModel(config), _model(config, 1), _IDS)


def test_teacher_attention_mask_is_used_without_teacher_input_ids():
    config = transformers.LlamaConfig(**_DECODER)
    student, teacher = _model(config, 0), _model(config, 1)
    mask = torch.ones_like(_IDS)
    teacher_mask = mask.clone()
    teacher_mask[:, 1] = 0  # the teacher does not see token 1 (it is still predicted and scored)
    alone = distillation_loss(student, teacher, _IDS, mask, teacher_attention_mask=teacher_mask, divergence="fkl")
    with_ids = distillation_loss(student, teacher, _IDS, mask, teacher_input_ids=_IDS,
                                 teacher_attention_mask=teacher_mask, divergence="fkl")
    plain = distillation_loss(student, teacher, _IDS, mask, divergence="fkl")
    torch.testing.assert_close(alone, with_ids, rtol=0, atol=0)
    assert not torch.allclose(alone, plain)
    # teacher_input_ids without a mask of their own read the student's attention_mask
    torch.testing.assert_close(distillation_loss(student, teacher, _IDS, teacher_mask, teacher_input_ids=_IDS,
                                                 divergence="fkl"),
                               distillation_loss(student, teacher, _IDS, teacher_mask, divergence="fkl"),
                               rtol=0, atol=0)
