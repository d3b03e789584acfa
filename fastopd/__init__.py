"""fastopd: fast on-policy distillation.

Fused vocab-chunked divergence losses from hidden states and LM-head weights (`fused_linear_divergence`),
truncated-rollout generation, sparse-masked optimizers and update analysis.
"""

from fastopd.losses import DivergenceStats, FusedLinearDivergenceLoss, divergence, fused_linear_divergence

__version__ = "0.1.0"

__all__ = ["DivergenceStats", "FusedLinearDivergenceLoss", "__version__", "divergence", "fused_linear_divergence"]
