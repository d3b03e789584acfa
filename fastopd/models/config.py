"""Configuration of the built-in decoder-only transformer."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# The size fields: each an int (head_dim may be None until derived), each positive.
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
          "max_position_embeddings")


@dataclass
class TransformerConfig:
    """Shape and numerics of :class:`fastopd.models.Transformer` (a small Llama-like decoder).

    ``num_kv_heads < num_heads`` gives grouped-query attention; ``head_dim`` defaults to
    ``hidden_size // num_heads``. ``max_position_embeddings`` is the context length: rollouts refuse prompts
    that do not fit.
    """

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        for name in _SIZES:  # 1.5 layers or a 64.5 width were accepted
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"TransformerConfig.{name} must be an int, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):  # the string "false" tied the head
            raise ValueError(f"TransformerConfig.tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}")
        if self.num_heads <= 0:  # before the division below (num_heads=0 raised ZeroDivisionError)
            raise ValueError(f"TransformerConfig.num_heads must be positive, got {self.num_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; pass head_dim"
                )
            self.head_dim = self.hidden_size // self.num_heads
        for name in _SIZES:
            if getattr(self, name) <= 0:
                raise ValueError(f"TransformerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for name in ("rope_theta", "rms_norm_eps"):  # theta <= 0 gave inf/NaN rotary frequencies silently
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"TransformerConfig.{name} must be a positive finite number, got {value}")
        if not (self.initializer_range >= 0 and math.isfinite(self.initializer_range)):
            raise ValueError(f"TransformerConfig.initializer_range must be finite and >= 0, got "
                             f"{self.initializer_range}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TransformerConfig keys: {unknown}")
        return cls(**data)
