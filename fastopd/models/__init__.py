"""The small built-in decoder-only transformer and its preallocated KV cache."""

from fastopd.models.config import TransformerConfig
from fastopd.models.kv_cache import KVCache, attention, build_attention_mask
from fastopd.models.transformer import Transformer

__all__ = ["KVCache", "Transformer", "TransformerConfig", "attention", "build_attention_mask"]
