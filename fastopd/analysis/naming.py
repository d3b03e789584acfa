"""Module kind and layer index from a parameter name (Llama/Qwen/Mistral, GPT-2, GPT-NeoX, Falcon, Phi, MoE)."""

from __future__ import annotations

import re

__all__ = ["FFN_KINDS", "KINDS", "layer_index", "module_kind"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")

# (kind, pattern on the name), first match wins; order matters (norms before projections, FFN c_proj before attn)
_RULES: list[tuple[str, re.Pattern[str]]] = [(k, re.compile(p)) for k, p in [
    ("norm", r"(norm|(^|\.)ln_?\w*\.|layernorm|rmsnorm)"),
    ("embed", r"(embed_tokens|(^|\.)wte\.|(^|\.)wpe\.|word_embeddings|embed_in|(^|\.)embeddings?\.)"),
    ("lm_head", r"(lm_head|embed_out|(^|\.)output\.weight$)"),
    ("ffn_gate_up", r"gate_up_proj"),
    ("ffn_gate", r"(gate_proj|(^|\.)w1\.|\.wi_0\.)"),
    ("ffn_up", r"(up_proj|(^|\.)w3\.|c_fc|fc1|dense_h_to_4h|\.wi_1\.|\.wi\.)"),
    ("ffn_down", r"(down_proj|(^|\.)w2\.|mlp\.c_proj|fc2|dense_4h_to_h|\.wo\.)"),
    ("attn_qkv", r"(qkv_proj|c_attn|query_key_value|Wqkv|in_proj)"),
    ("attn_q", r"(q_proj|\.query\.|\.q\.)"),
    ("attn_k", r"(k_proj|\.key\.|\.k\.)"),
    ("attn_v", r"(v_proj|\.value\.|\.v\.)"),
    ("attn_o", r"(o_proj|out_proj|attn\.c_proj|attention\.dense|self_attn\.dense|\.o\.)"),
]]
KINDS = ("embed", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o", "ffn_gate", "ffn_up", "ffn_gate_up",
         "ffn_down", "norm", "lm_head", "other")
FFN_KINDS = frozenset({"ffn_gate", "ffn_up", "ffn_gate_up", "ffn_down"})


def module_kind(name: str) -> str:
    """The module kind of a parameter, one of `KINDS`; e.g. "model.layers.3.mlp.down_proj.weight" -> "ffn_down"."""
    for kind, pattern in _RULES:
        if pattern.search(name):
            return kind
    return "other"


def layer_index(name: str) -> int | None:
    """The transformer block index in a parameter name, or None (embeddings, final norm, head)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None
