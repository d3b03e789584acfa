"""fastopd: fast on-policy distillation.

Fused vocab-chunked divergence losses from hidden states and LM-head weights (`fused_linear_divergence`),
truncated-rollout generation, sparse-masked optimizers and update analysis.
"""

from fastopd.losses import DivergenceStats, FusedLinearDivergenceLoss, divergence, fused_linear_divergence

__version__ = "0.1.0"

_LAZY = {"OPDTrainer": "fastopd.train.trainer", "OPDConfig": "fastopd.train.config",
         "RolloutEngine": "fastopd.rollout", "Horizon": "fastopd.rollout", "RolloutBatch": "fastopd.rollout",
         "SparseMaskedAdamW": "fastopd.optim", "analyze_update": "fastopd.analysis"}


def __getattr__(name: str):
    """The trainer, rollout, optimizer and analysis entry points, imported on first use (keeps `import fastopd`
    light)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastopd' has no attribute {name!r}")


__all__ = ["DivergenceStats", "FusedLinearDivergenceLoss", "Horizon", "OPDConfig", "OPDTrainer", "RolloutBatch",
           "RolloutEngine", "SparseMaskedAdamW", "__version__", "analyze_update", "divergence",
           "fused_linear_divergence"]
