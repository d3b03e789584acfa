"""Fused teacher-student divergence losses (forward KL, reverse KL, generalized JSD, hard-label mix)."""

from fastopd.losses.functional import DivergenceStats, divergence, fused_linear_divergence
from fastopd.losses.module import FusedLinearDivergenceLoss

__all__ = ["DivergenceStats", "FusedLinearDivergenceLoss", "divergence", "fused_linear_divergence"]
