"""Hugging Face helpers: the distillation loss of any `AutoModelForCausalLM` pair, from forwards without logits.

    from fastopd.integrations.hf import distillation_loss

    class DistillTrainer(transformers.Trainer):
        def __init__(self, *args, teacher, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.eval()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return distillation_loss(model, self.teacher, inputs["input_ids"], inputs.get("attention_mask"),
                                     inputs.get("labels"), divergence="jsd", beta=0.5,
                                     num_items_in_batch=num_items_in_batch)

Each model runs its own forward with `output_hidden_states=True, logits_to_keep=1` (logits of one position only),
so wrappers (DDP, accelerate's mixed-precision autocast) apply, or, for models without `logits_to_keep`, its
decoder (`model.get_decoder()`); either way only final hidden states [B, T, D] are used, and
`fastopd.fused_linear_divergence` applies both LM heads chunk by chunk. Logit scales (Cohere `logit_scale`, Granite
`logits_scaling`) are honoured per model (folded into its hidden states). Final-logit soft-capping (Gemma 2/3) is
honoured when both models agree: the fused loss applies one softcap to both, so differing caps raise ValueError.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from fastopd.losses import fused_linear_divergence


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _logit_multiplier(config) -> float:
    """The factor HF applies to `hidden @ W^T` before soft-capping (1 for most models)."""
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    return scale


def shared_softcap(student: nn.Module, teacher: nn.Module) -> float | None:
    """The `final_logit_softcapping` of both models' configs (None: no cap), which must agree.

    Raises:
        ValueError: the caps differ (one None and one set included): the fused loss applies one softcap to both
            models, so it cannot reproduce a pair with different caps.
    """
    caps = [getattr(_unwrap(m).config, "final_logit_softcapping", None) for m in (student, teacher)]
    s, t = (float(c) if c is not None else None for c in caps)
    if s != t:
        raise ValueError(f"the student's final_logit_softcapping ({s}) differs from the teacher's ({t}): the fused "
                         "loss applies one softcap to both models; pass softcap= explicitly to use one cap for both")
    return s


def lm_head_of(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(weight [V, D], bias [V] or None)` of a causal LM's output embedding (the parameters themselves)."""
    head = _unwrap(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(_unwrap(model)).__name__} has no output embedding (get_output_embeddings())")
    return head.weight, getattr(head, "bias", None)


def causal_lm_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                            *, mode: str = "auto", **forward_kwargs) -> torch.Tensor:
    """Final (normed) hidden states [B, T, D] of a Hugging Face causal LM, without computing [B, T, V] logits.

    Args:
        mode: "decoder" runs `model.get_decoder()`; "hidden_states" runs the model's own forward with
            `output_hidden_states=True, logits_to_keep=1` (logits of one position only) and takes the last hidden
            state, so wrappers see a forward (DDP's hooks, the autocast accelerate wraps around `forward` under mixed
            precision); "auto" picks "hidden_states" when the model's forward takes `logits_to_keep` (or the model
            is wrapped), else "decoder".
        forward_kwargs: passed to the forward (e.g. position_ids).
    The states are multiplied by the model's logit scale, if it has one, so that `states @ W^T` are its logits.
    """
    inner = _unwrap(model)
    if mode == "auto":
        takes_keep = "logits_to_keep" in inspect.signature(inner.forward).parameters
        mode = "hidden_states" if inner is not model or takes_keep else "decoder"
    if mode == "decoder":
        decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
        if decoder is None or decoder is inner:
            raise ValueError(f"{type(inner).__name__} exposes no decoder module; use mode='hidden_states'")
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                         **forward_kwargs).last_hidden_state
    elif mode == "hidden_states":
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1,
                    use_cache=False, **forward_kwargs)
        hidden = out.hidden_states[-1]
    else:
        raise ValueError(f"mode must be 'auto', 'decoder' or 'hidden_states', got {mode!r}")
    scale = _logit_multiplier(inner.config)
    return hidden * scale if scale != 1.0 else hidden


def distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    teacher_input_ids: torch.Tensor | None = None,
    teacher_attention_mask: torch.Tensor | None = None,
    divergence: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    shift: bool = True,
    num_items_in_batch: int | torch.Tensor | None = None,
    mode: str = "auto",
    **loss_options,
):
    """Teacher-student divergence of two Hugging Face causal LMs on the same tokens, without logits.

    Args:
        input_ids, attention_mask: [B, T] for both models (teacher_input_ids/teacher_attention_mask, if given,
            must cover the same T positions; they let the teacher read other tokens, e.g. another tokenizer's
            padding, at positions aligned one to one).
        labels: [B, T]; positions equal to `ignore_index` do not count. Default: `input_ids`, with padding
            (attention_mask == 0) ignored. Like HF's causal-LM loss, position t's logits predict labels[t + 1]
            when `shift` (the default); pass shift=False for already aligned labels.
        divergence, beta, temperature, num_items_in_batch and `loss_options` (hard_label_weight, reduction,
            return_stats, impl, chunk_size, ...): as in `fastopd.fused_linear_divergence`. Soft-capping is taken
            from the models' configs (`final_logit_softcapping`, see `shared_softcap`) unless `softcap=` is given,
            which then applies to both models.
        mode: how hidden states are obtained (see `causal_lm_hidden_states`).
    Returns:
        The loss (and a DivergenceStats with return_stats=True). Gradients flow into the student only; the teacher
        runs in eval mode under torch.no_grad. A teacher on another device is moved per call (hidden states and
        head), not its weights.
    Raises:
        ValueError: the two models' `final_logit_softcapping` differ and no `softcap=` is given (checked before
            any forward); the hidden states do not cover the same positions.
    """
    softcap = loss_options.pop("softcap") if "softcap" in loss_options else shared_softcap(student, teacher)
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    hs = causal_lm_hidden_states(student, input_ids, attention_mask, mode=mode)
    ws, bs = lm_head_of(student)
    was_training = teacher.training
    teacher.eval()
    with torch.no_grad():
        t_ids = teacher_input_ids if teacher_input_ids is not None else input_ids
        t_mask = teacher_attention_mask if teacher_input_ids is not None else attention_mask
        ht = causal_lm_hidden_states(teacher, t_ids.to(_device_of(teacher)),
                                     t_mask.to(_device_of(teacher)) if t_mask is not None else None, mode=mode)
        wt, bt = lm_head_of(teacher)
        ht, wt = ht.to(hs.device), wt.detach().to(hs.device)
        bt = bt.detach().to(hs.device) if bt is not None else None
    teacher.train(was_training)
    if ht.shape[:2] != hs.shape[:2]:
        raise ValueError(f"teacher hidden states {tuple(ht.shape)} do not cover the student's positions "
                         f"{tuple(hs.shape)}")
    if shift:
        hs, ht, labels = hs[:, :-1], ht[:, :-1], labels[:, 1:]
    return fused_linear_divergence(hs, ws, ht, wt, labels.to(hs.device), divergence=divergence, beta=beta,
                                   temperature=temperature, ignore_index=ignore_index, student_bias=bs,
                                   teacher_bias=bt, softcap=softcap, num_items_in_batch=num_items_in_batch,
                                   **loss_options)


def _device_of(model: nn.Module) -> torch.device:
    return next(_unwrap(model).parameters()).device
