"""Truncated-rollout engine: horizon schedules, static KV cache, prefix sharing, teacher scoring."""

from fastopd.rollout.adapters import (
    BuiltinAdapter,
    HFCausalLMAdapter,
    HFGPT2Adapter,
    HFLlamaAdapter,
    ModelAdapter,
    as_adapter,
)
from fastopd.rollout.batch import RolloutBatch
from fastopd.rollout.engine import RolloutEngine
from fastopd.rollout.horizon import Horizon, resolve_horizon
from fastopd.rollout.sampling import sample_tokens

__all__ = [
    "BuiltinAdapter",
    "HFCausalLMAdapter",
    "HFGPT2Adapter",
    "HFLlamaAdapter",
    "Horizon",
    "ModelAdapter",
    "RolloutBatch",
    "RolloutEngine",
    "as_adapter",
    "resolve_horizon",
    "sample_tokens",
]
