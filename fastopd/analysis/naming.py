"""Module kind and layer index from a parameter name (Llama/Qwen/Mistral, GPT-2, GPT-NeoX, Falcon, Phi, OPT,
BLOOM, GPT-J, MPT, T5, Meta-Llama checkpoints, MoE). The one classifier of fastopd: `fastopd.optim.masks` maps
its kinds to the mask-budget names (docs/optim.md)."""

from __future__ import annotations

import re

__all__ = ["FFN_KINDS", "KINDS", "layer_index", "module_kind"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def _part(alternatives: str) -> str:
    """A whole dotted component of the name equal to one of `alternatives`."""
    return rf"(?:^|\.)(?:{alternatives})(?:\.|$)"


# (kind, pattern on the name), first match wins. Patterns match whole dotted components, so LoRA/PEFT wrappers
# ("q_proj.lora_A.default.weight") keep their module's kind and biases take their module's. Order matters: norms
# first (they also sit inside embedding and attention modules), attention outputs before the FFN's "wo" (T5's
# DenseReluDense.wo is an FFN, Meta-Llama's attention.wo an attention output).
_RULES: list[tuple[str, re.Pattern[str]]] = [(k, re.compile(p)) for k, p in [
    ("norm", _part(r"ln_?\w*|\w*norm\w*")),
    ("embed", _part(r"embed_tokens|tok_embeddings|wte|wpe|word_embeddings|position_embeddings|embed_positions|"
                    r"embed_in|embeddings?")),
    ("lm_head", _part(r"lm_head|embed_out") + r"|(?:^|\.)output\.weight$"),
    ("ffn_gate_up", _part(r"gate_up_proj")),
    ("attn_qkv", _part(r"qkv_proj|c_attn|query_key_value|Wqkv|qkv|in_proj(?:_weight|_bias)?")),
    ("attn_q", _part(r"q_proj|query|wq|q")),
    ("attn_k", _part(r"k_proj|key|wk|k")),
    ("attn_v", _part(r"v_proj|value|wv|v")),
    ("attn_o", _part(r"o_proj|out_proj|o") + r"|(?:^|\.)\w*(?:attn|attention)\.(?:c_proj|dense|wo)(?:\.|$)"
     r"|(?:^|\.)attention\.output\.dense(?:\.|$)"),
    ("ffn_gate", _part(r"gate_proj|w1|wi_0")),
    ("ffn_up", _part(r"up_proj|c_fc|w3|fc1|fc_in|dense_h_to_4h|wi_1|wi")),
    ("ffn_down", _part(r"down_proj|w2|fc2|fc_out|dense_4h_to_h|wo") + r"|(?:^|\.)mlp\.c_proj(?:\.|$)"),
]]
KINDS = ("embed", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o", "ffn_gate", "ffn_up", "ffn_gate_up",
         "ffn_down", "norm", "lm_head", "other")
FFN_KINDS = frozenset({"ffn_gate", "ffn_up", "ffn_gate_up", "ffn_down"})


def module_kind(name: str) -> str:
    """The module kind of a parameter, one of `KINDS`; e.g. "model.layers.3.mlp.down_proj.weight" -> "ffn_down".

    >>> module_kind("model.layers.3.mlp.down_proj.weight"), module_kind("transformer.h.0.attn.c_attn.weight")
    ('ffn_down', 'attn_qkv')
    """
    for kind, pattern in _RULES:
        if pattern.search(name):
            return kind
    return "other"


def layer_index(name: str) -> int | None:
    """The transformer block index in a parameter name ("model.layers.7.mlp..." -> 7), or None (embeddings,
    final norm, head)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None
