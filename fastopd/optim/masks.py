"""Masks for SparseMaskedAdamW: which coordinates of which parameters to train.

A mask dict maps a parameter name to either a bool tensor of the parameter's shape or a 1-D integer tensor of
sorted flat (row-major) indices. Sources: a finished run's delta (`from_delta`), calibration statistics over a
few batches (`calibrate`), baselines (`random`, `smallest_weights`), optionally under per-module-kind budgets
(`module_kind`, `budgets=`). Files: `save`/`load` (safetensors, format "fastopd.masks.v1", see docs/optim.md).
"""

from __future__ import annotations

import re

import torch

FORMAT = "fastopd.masks.v1"
MODULE_KINDS = ("attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "ffn_gate", "ffn_up", "ffn_down", "ffn_gate_up",
                "embedding", "lm_head", "norm", "other")
# Groups usable as budget keys besides the kinds themselves.
KIND_GROUPS = {
    "attention": ("attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv"),
    "ffn": ("ffn_gate", "ffn_up", "ffn_down", "ffn_gate_up"),
    "embeddings": ("embedding", "lm_head"),
}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")

# (pattern on the module path, i.e. the name without its final ".weight"/".bias", kind): first match wins.
# Covers Llama/Qwen2/Mistral (q_proj, gate_proj, input_layernorm, embed_tokens), GPT-2 (c_attn, attn.c_proj,
# c_fc, mlp.c_proj, ln_1, wte/wpe), GPT-NeoX/BLOOM and the usual variants. Biases take their module's kind.
_KIND_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), k) for p, k in (
    (r"(norm|(^|\.)ln_\w*|layer_norm)[^.]*$", "norm"),
    (r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|position_embeddings|embed_positions|tok_embeddings)$",
     "embedding"),
    (r"(^|\.)(lm_head|embed_out)$", "lm_head"),
    (r"(^|\.)(c_attn|qkv_proj|query_key_value|Wqkv|qkv)$", "attn_qkv"),
    (r"(^|\.)(q_proj|query|wq)$", "attn_q"),
    (r"(^|\.)(k_proj|key|wk)$", "attn_k"),
    (r"(^|\.)(v_proj|value|wv)$", "attn_v"),
    (r"(^|\.)(o_proj|out_proj|wo)$|attn\.c_proj$|attention\.dense$|attention\.output\.dense$", "attn_o"),
    (r"(^|\.)gate_up_proj$", "ffn_gate_up"),
    (r"(^|\.)(gate_proj|w1)$", "ffn_gate"),
    (r"(^|\.)(up_proj|c_fc|w3|fc1|dense_h_to_4h)$", "ffn_up"),
    (r"(^|\.)(down_proj|w2|fc2|dense_4h_to_h)$|mlp\.c_proj$", "ffn_down"),
))
_SUFFIX = re.compile(r"\.(weight|bias)$")


def module_kind(name: str) -> str:
    """The module kind of a parameter from its name (Llama/Qwen2/GPT-2 naming): one of MODULE_KINDS.

    >>> module_kind("model.layers.3.mlp.down_proj.weight"), module_kind("transformer.h.0.attn.c_attn.weight")
    ('ffn_down', 'attn_qkv')
    """
    path = _SUFFIX.sub("", name)
    for pattern, kind in _KIND_RULES:
        if pattern.search(path):
            return kind
    return "other"


def layer_index(name: str) -> int | None:
    """The transformer block index in a parameter name ("model.layers.7.mlp..." -> 7), else None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def to_indices(mask: torch.Tensor, shape: torch.Size | tuple[int, ...], name: str = "mask") -> torch.Tensor | None:
    """Normalizes a mask for a parameter of `shape` to sorted unique int64 flat indices [k] on the mask's device,
    or None when every coordinate is selected.

    Raises ValueError for a bool mask of another shape, a non-1-D or non-integer index tensor, out-of-range or
    duplicated indices. Unsorted indices are sorted. Synchronizes (validation reads the values).
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask {name!r} must be a tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"bool mask {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(shape)}")
        idx = mask.reshape(-1).nonzero().view(-1)
    elif not mask.is_floating_point() and not mask.is_complex():
        if mask.dim() != 1:
            raise ValueError(f"index mask {name!r} must be 1-D flat indices, got shape {tuple(mask.shape)}")
        idx = mask.long()
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= numel:
                raise ValueError(f"index mask {name!r} has indices in [{lo}, {hi}], out of range for a parameter "
                                 f"of shape {tuple(shape)} (numel {numel})")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                idx = idx.sort().values
                if bool((idx[1:] == idx[:-1]).any()):
                    raise ValueError(f"index mask {name!r} has duplicated indices")
    else:
        raise ValueError(f"mask {name!r} must be bool (shape {tuple(shape)}) or integer flat indices, got {mask.dtype}")
    return None if idx.numel() == numel else idx
