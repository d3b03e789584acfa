"""Hugging Face helpers: the distillation loss of any `AutoModelForCausalLM` pair, from forwards without logits.

    import torch
    from fastopd.integrations.hf import distillation_loss, trainer_loss_scale

    class DistillTrainer(transformers.Trainer):
        def __init__(self, *args, teacher, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.eval()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = distillation_loss(model, self.teacher, inputs["input_ids"], inputs.get("attention_mask"),
                                     inputs.get("labels"), divergence="jsd", beta=0.5,
                                     num_items_in_batch=num_items_in_batch)
            loss = loss * trainer_loss_scale(self, num_items_in_batch)  # DDP: as Trainer.compute_loss does
            if not return_outputs:
                return loss
            with torch.no_grad():  # evaluate()/predict() read the student's logits here (full [B, T, V]: HF
                # asks on every eval batch; return (loss, {}) instead when no compute_metrics needs them)
                return loss, model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))

`trainer_loss_scale`: under data parallelism with `average_tokens_across_devices` (HF's default), the Trainer sums
`num_items_in_batch` over the ranks and DDP averages the gradients, so `Trainer.compute_loss` multiplies the loss by
the number of ranks; an overriding `compute_loss` has to do the same (1 on one process).

Each model runs its own forward with `logits_to_keep=1` (logits of one position only; under no_grad, the teacher's,
the final hidden states are taken from its decoder's output by a forward hook, not through `output_hidden_states`,
which would keep every layer's output alive), so wrappers (DDP, FSDP, accelerate's mixed-precision autocast) apply,
or, for models without `logits_to_keep`, its decoder (`model.get_decoder()`); either way only final hidden states
[B, T, D] are used, and `fastopd.fused_linear_divergence` applies both LM heads chunk by chunk. Configs are read
through `config.get_text_config()`, so multimodal classes that `AutoModelForCausalLM` returns (Gemma 3n/4
`*ForConditionalGeneration`) are covered. Logit multipliers are honoured per model (folded into its hidden states),
in the direction each architecture's modeling file applies them (`_LOGIT_FACTORS`): Cohere `logits * logit_scale`,
Granite and MiniCPM3 `/ logits_scaling`, HyperCLOVAX `* logits_scaling`, FalconH1 `* lm_head_multiplier`, Muse
`* output_multiplier`. Final-logit soft-capping (Gemma 2/3/3n/4, RecurrentGemma, xLSTM, ...) is honoured when both
models agree: the fused loss applies one softcap to both, so differing caps raise ValueError.

Self-check: the first time a model runs in "hidden_states" mode, the last position's logits its forward returns
are compared with softcap(h[:, -1] @ W^T + b) as the loss computes them (h with the multiplier folded in); if they
differ (relative L2 error above 1e-2, 3e-2 in 16-bit or autocast) a ValueError names the architecture, so a
post-processing fastopd does not know fails instead of training on other logits. A cap that does not bind on
that batch cannot be told apart (nor can it change the loss much there). "decoder" mode has no logits to check.
"""

from __future__ import annotations

import inspect
import sys
import weakref

import torch
from torch import nn

from fastopd.losses import fused_linear_divergence


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/FSDP1 (`.module`) and torch.compile (`._orig_mod`) wrappers. A compiled model is run
    through its wrapper (`causal_lm_hidden_states` picks "hidden_states" mode for any wrapped model), so it runs
    compiled; its decoder is not run on its own."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # only a process that imported dynamo holds one
    while True:
        if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


# How each architecture's forward scales `hidden @ W^T` (before any soft-capping), by the model_type of its text
# config: (config attribute, True: logits * value, False: logits / value), as the modeling files of transformers do
# (`grep -n "logits = " models/*/modeling_*.py`). Not listed: no factor (MPT's `logit_scale` is unused by HF's MPT);
# the self-check in `causal_lm_hidden_states` catches an architecture that scales otherwise.
_LOGIT_FACTORS: dict[str, tuple[str, bool]] = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass_text"), ("logit_scale", True)),
    **dict.fromkeys(("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa", "granitemoe_swa",
                     "granite4_vision_text", "granite_docling_text", "minicpm3"), ("logits_scaling", False)),
    "hyperclovax": ("logits_scaling", True),
    "falcon_h1": ("lm_head_multiplier", True),
    **dict.fromkeys(("muse_spark_text", "muse_glimmer_text"), ("output_multiplier", True)),
}
# Top-level model types whose forward ignores the text config's final_logit_softcapping
# (Gemma3ForConditionalGeneration applies no cap; Gemma3ForCausalLM, model type "gemma3_text", does).
_IGNORES_SOFTCAP = frozenset({"gemma3"})
# Text-config model types that name their final cap otherwise than `final_logit_softcapping` (xLSTM's forward takes
# no logits_to_keep, so it runs in "decoder" mode, where no self-check would catch a missed cap).
_SOFTCAP_ATTRS = {"recurrent_gemma": "logits_soft_cap", "xlstm": "output_logit_soft_cap"}
_LOGITS_CHECKED: weakref.WeakSet = weakref.WeakSet()  # models whose forward's logits passed the self-check


def _text_config(config):
    """The decoder's config: `config.get_text_config()` where it exists (multimodal wrappers), else `config`."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _logit_multiplier(config) -> float:
    """The factor the architecture applies to `hidden @ W^T` before soft-capping (1 for most models)."""
    text = _text_config(config)
    attr, multiplies = _LOGIT_FACTORS.get(getattr(text, "model_type", None), (None, True))
    value = getattr(text, attr, None) if attr is not None else None
    if value is None:
        return 1.0
    return float(value) if multiplies else 1.0 / float(value)


def final_softcap(model: nn.Module) -> float | None:
    """The `final_logit_softcapping` a causal LM's forward applies (None: none), read from its text config
    (RecurrentGemma's `logits_soft_cap`, xLSTM's `output_logit_soft_cap`)."""
    config = _unwrap(model).config
    if getattr(config, "model_type", None) in _IGNORES_SOFTCAP:
        return None
    text = _text_config(config)
    cap = getattr(text, _SOFTCAP_ATTRS.get(getattr(text, "model_type", None), "final_logit_softcapping"), None)
    return float(cap) if cap is not None else None


def shared_softcap(student: nn.Module, teacher: nn.Module) -> float | None:
    """The `final_logit_softcapping` of both models (see `final_softcap`; None: no cap), which must agree.

    Raises:
        ValueError: the caps differ (one None and one set included): the fused loss applies one softcap to both
            models, so it cannot reproduce a pair with different caps.
    """
    s, t = final_softcap(student), final_softcap(teacher)
    if s != t:
        raise ValueError(f"the student's final_logit_softcapping ({s}) differs from the teacher's ({t}): the fused "
                         "loss applies one softcap to both models; pass softcap= explicitly to use one cap for both")
    return s


def trainer_loss_scale(trainer, num_items_in_batch: int | torch.Tensor | None) -> float:
    """The factor that gives a loss normalized by `num_items_in_batch` the scale HF's `Trainer.compute_loss` gives
    its own loss.

    With `args.average_tokens_across_devices` (default True) and more than one rank, the Trainer sums
    `num_items_in_batch` over the ranks while DDP averages the gradients, so it multiplies the loss by the number of
    data-parallel ranks (`accelerator.num_processes // tp_size`); an overriding `compute_loss` that normalizes by
    `num_items_in_batch` must multiply by this too. Under `nn.DataParallel` (`args.n_gpu` > 1, one process) the
    loss computed here is one scalar over the whole gathered batch, not one per replica as the model's own loss
    (which the Trainer multiplies by `n_gpu` and then averages over replicas), so the factor is 1, or 1 / n_gpu
    without `average_tokens_across_devices` (the Trainer then hands over `num_items_in_batch // n_gpu`). 1 when
    `num_items_in_batch` is None (the loss is then a per-batch mean) or the Trainer would not count items (the model
    takes no loss kwargs and there is no `compute_loss_func`).
    """
    args = trainer.args
    if num_items_in_batch is None or not (getattr(trainer, "model_accepts_loss_kwargs", False)
                                          or getattr(trainer, "compute_loss_func", None) is not None):
        return 1
    average = getattr(args, "average_tokens_across_devices", False)
    n_gpu = int(getattr(args, "n_gpu", 1))
    if n_gpu > 1:
        return 1 if average else 1 / n_gpu
    if not average:
        return 1
    tp = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
    return int(trainer.accelerator.num_processes) // max(1, int(tp))


def lm_head_of(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(weight [V, D], bias [V] or None)` of a causal LM's output embedding (the parameters themselves).

    Under FSDP2 (and FSDP1 without use_orig_params) take them after the model's forward, which leaves the root
    unit's parameters (the head's, with the usual per-layer wrapping) unsharded until its backward: before it they
    are shards.

    Raises:
        ValueError: the model has no output embedding, its weight is not [V, D] (a DeepSpeed ZeRO-3 partitioned
            parameter, an FSDP shard), or its head is a PEFT adapter layer (LoRA on `lm_head`), whose logits are
            not `hidden @ weight^T + bias`.
    """
    head = _output_embedding(model)
    _check_head_weight(model, head.weight)
    return head.weight, getattr(head, "bias", None)


def _check_head_weight(model: nn.Module, weight: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.numel() == 0:  # DeepSpeed ZeRO-3 leaves a partitioned parameter empty
        raise ValueError(f"the output embedding weight of {type(_unwrap(model)).__name__} is {tuple(weight.shape)}, "
                         "not [V, D]" + (": a DeepSpeed ZeRO-3 partitioned parameter; gather it first "
                                         "(deepspeed.zero.GatheredParameters) or use ZeRO stage 1/2"
                                         if hasattr(weight, "ds_id") else
                                         ": a view into an FSDP1 flat parameter (use_orig_params=True, the default "
                                         "of HF Trainer's fsdp_config); use FSDP2, or FSDP1 with "
                                         "use_orig_params=False" if weight.dim() == 1 else ""))


def _output_embedding(model: nn.Module) -> nn.Module:
    """The output embedding module of `model`, checked as far as it can be before a forward (an FSDP model's head
    is sharded there, so its weight's shape is checked by `lm_head_of`, after the forward; a ZeRO-3 partitioned
    weight is recognized here). Raises ValueError as `lm_head_of` does."""
    head = _unwrap(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(_unwrap(model)).__name__} has no output embedding (get_output_embeddings() gives "
                         f"{type(head).__name__}): pass a causal LM with an LM head (AutoModelForCausalLM), not its "
                         "base model")
    if hasattr(head, "base_layer"):  # a peft tuner layer (LoRA, ...): its .weight is the base layer's, without the
        # adapter's delta (peft's ModulesToSaveWrapper and TrainableTokensWrapper give their effective weight: fine)
        raise ValueError(f"the output embedding of {type(_unwrap(model)).__name__} is a PEFT adapter layer "
                         f"({type(head).__module__}.{type(head).__qualname__}): its logits are not hidden @ weight^T "
                         "+ bias, so the fused loss would train the base head and ignore the adapter; leave lm_head "
                         "out of the adapter's target_modules (modules_to_save=['lm_head'] trains it in full, "
                         "trainable_token_indices some of its rows; both work)")
    if hasattr(head.weight, "ds_id"):  # DeepSpeed ZeRO-3: partitioned at rest, so refused before any forward
        _check_head_weight(model, head.weight)
    return head


def causal_lm_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                            *, mode: str = "auto", **forward_kwargs) -> torch.Tensor:
    """Final (normed) hidden states [B, T, D] of a Hugging Face causal LM, without computing [B, T, V] logits.

    Args:
        mode: "decoder" runs `model.get_decoder()`; "hidden_states" runs the model's own forward with
            `logits_to_keep=1` (logits of one position only) and takes the final hidden states its decoder returns
            (under no_grad a forward hook; with autograd, or where no decoder is found, `output_hidden_states=True`),
            so wrappers see a forward (DDP's and FSDP's hooks, the autocast accelerate wraps around `forward` under
            mixed precision); "auto" picks "hidden_states" when the model's forward takes `logits_to_keep` (or the model
            is wrapped; for a PeftModel, when its base model's forward does), else "decoder".
        forward_kwargs: passed to the forward (e.g. position_ids).
    The states are multiplied by the model's logit scale, if it has one, so that `states @ W^T` are its logits.
    """
    inner = _unwrap(model)
    if mode == "auto":
        get_base = getattr(inner, "get_base_model", None)  # a PeftModel forwards logits_to_keep to its base model
        base = get_base() if callable(get_base) else inner
        takes_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        mode = "hidden_states" if inner is not model or takes_keep else "decoder"
    if mode == "decoder":
        decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
        if decoder is None or decoder is inner:
            raise ValueError(f"{type(inner).__name__} exposes no decoder module; use mode='hidden_states'")
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                         **forward_kwargs).last_hidden_state
    elif mode == "hidden_states":
        out, hidden = _forward_keeping_last_hidden(model, inner, input_ids=input_ids, attention_mask=attention_mask,
                                                   logits_to_keep=1, use_cache=False, **forward_kwargs)
    else:
        raise ValueError(f"mode must be 'auto', 'decoder' or 'hidden_states', got {mode!r}")
    scale = _logit_multiplier(inner.config)
    hidden = hidden * scale if scale != 1.0 else hidden
    logits = getattr(out, "logits", None) if mode == "hidden_states" else None
    if logits is not None and inner not in _LOGITS_CHECKED and _check_logits(inner, hidden[:, -1], logits[:, -1]):
        _LOGITS_CHECKED.add(inner)
    return hidden


def _forward_keeping_last_hidden(model: nn.Module, inner: nn.Module, **kwargs):
    """`model(**kwargs)` and its final hidden states [B, T, D]. The states are taken from the decoder's output by a
    forward hook, so the forward runs without `output_hidden_states`, which would keep every layer's [B, T, D] output
    alive (for a no-grad teacher, L + 1 of them: 33 x [16384, 4096] bf16 = 4.1 GiB for a 32-layer 4096-wide model at
    16k tokens). A model whose decoder is not found, or not run once by its forward, is run again with
    `output_hidden_states`. With autograd on (the student) the forward takes `output_hidden_states` instead: the
    layers' outputs are saved for backward anyway, and wrappers that hook the backward onto the forward's outputs
    (FSDP1's pre-backward hooks, whose post-backward hook asserts them) need the states to be one of them."""
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if isinstance(decoder, nn.Module) and decoder is not inner and not torch.is_grad_enabled():
        seen = []
        handle = decoder.register_forward_hook(lambda module, args, output: seen.append(output))
        try:
            out = model(**kwargs)
        finally:
            handle.remove()
        if len(seen) == 1:
            last = getattr(seen[0], "last_hidden_state", None)
            if last is None and isinstance(seen[0], (tuple, list)) and seen[0]:
                last = seen[0][0]
            if isinstance(last, torch.Tensor):
                return out, last
    out = model(output_hidden_states=True, **kwargs)
    return out, out.hidden_states[-1]


def _check_logits(model: nn.Module, hidden_last: torch.Tensor, logits_last: torch.Tensor) -> bool:
    """Raise ValueError if the forward's last-position logits [B, V] are not softcap(hidden_last @ W^T + b) (rows
    whose logits are not all finite are left out; False: no row left, nothing checked). Synchronizes once."""
    with torch.no_grad():
        weight, bias = lm_head_of(model)
        h = hidden_last.detach()
        low = min(h.dtype.itemsize, weight.dtype.itemsize, logits_last.dtype.itemsize) <= 2
        with torch.autocast(h.device.type, enabled=False):
            z = (h.to(weight.dtype) @ weight.T).float()  # in the head's dtype: no float32 copy of a [V, D] head
        if bias is not None:
            z = z + bias.float()
        cap = final_softcap(model)
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        ref = logits_last.detach().float()
        rows = ref.isfinite().all(-1)
        if not bool(rows.any()):
            return False
        z, ref = z[rows], ref[rows]
        err = float((z - ref).norm() / ref.norm().clamp_min(torch.finfo(torch.float32).tiny))
    tol = 3e-2 if low or torch.is_autocast_enabled(h.device.type) else 1e-2
    if not err <= tol:  # NaN fails too
        name = type(model).__name__
        model_type = getattr(_text_config(model.config), "model_type", None)
        raise ValueError(
            f"{name} (model_type {model_type!r}): the logits its forward returns differ from softcap(hidden @ W^T + b) "
            f"* multiplier as fastopd computes them (multiplier {_logit_multiplier(model.config):g}, softcap {cap}; "
            f"relative L2 error {err:.3g} > {tol:g} at the last position): this architecture post-processes its "
            "logits in a way fastopd.integrations.hf does not know, so the fused loss would train on other logits "
            "(add it to fastopd.integrations.hf._LOGIT_FACTORS / _IGNORES_SOFTCAP)")
    return True


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
            must be [B, T] too; they let the teacher read other tokens, e.g. another tokenizer's padding, at
            positions aligned one to one). The teacher's mask is `teacher_attention_mask` if given (with or
            without teacher_input_ids), else `attention_mask`.
        labels: [B, T]; positions equal to `ignore_index` do not count. Default: `input_ids`, with padding
            (attention_mask == 0) ignored. Like HF's causal-LM loss, position t's logits predict labels[t + 1]
            when `shift` (the default); pass shift=False for already aligned labels.
        divergence, beta, temperature, num_items_in_batch and `loss_options` (hard_label_weight, reduction,
            return_stats, impl, chunk_size, ...): as in `fastopd.fused_linear_divergence`. Soft-capping is taken
            from the models' text configs (`final_logit_softcapping`, see `shared_softcap`) unless `softcap=` is given,
            which then applies to both models.
        mode: how hidden states are obtained (see `causal_lm_hidden_states`).
    Returns:
        The loss (and a DivergenceStats with return_stats=True). Gradients flow into the student only; the teacher
        runs in eval mode under torch.no_grad. A teacher on another device is moved per call (hidden states and
        head), not its weights.
    Raises:
        ValueError: input_ids is not an integer [B, T] tensor, or attention_mask, labels, teacher_input_ids or
            teacher_attention_mask is not [B, T]; a model has no usable LM head (see `lm_head_of`); the two
            models' `final_logit_softcapping` differ and no `softcap=` is given (checked before
            any forward); the hidden states do not cover the same positions; a model's forward post-processes its
            logits in a way not known here (the self-check of `causal_lm_hidden_states`).
    """
    _check_batch(input_ids, attention_mask=attention_mask, labels=labels, teacher_input_ids=teacher_input_ids,
                 teacher_attention_mask=teacher_attention_mask)
    softcap = loss_options.pop("softcap") if "softcap" in loss_options else shared_softcap(student, teacher)
    _output_embedding(student)  # before any forward: a model without a usable head fails at once
    _output_embedding(teacher)
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    hs = causal_lm_hidden_states(student, input_ids, attention_mask, mode=mode)
    ws, bs = lm_head_of(student)  # after the forward: FSDP's root unit (the head's) is unsharded until backward
    was_training = teacher.training
    teacher.eval()
    with torch.no_grad():
        t_ids = teacher_input_ids if teacher_input_ids is not None else input_ids
        t_mask = teacher_attention_mask if teacher_attention_mask is not None else attention_mask
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


def _check_batch(input_ids: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Raise ValueError unless input_ids is an integer [B, T] tensor and every other given tensor is [B, T]."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        what = (f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor)
                else type(input_ids).__name__)
        raise ValueError(f"input_ids must be an integer tensor [B, T], got {what}")
    for name, t in others.items():
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != input_ids.shape):
            what = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)} ([B, T], one entry per "
                             f"token, before any shift), got {what}")


def _device_of(model: nn.Module) -> torch.device:
    return next(_unwrap(model).parameters()).device
