"""Sparse-masked optimizers: AdamW on a chosen subnetwork with compact state, and the masks that choose it."""

from fastopd.optim import masks
from fastopd.optim.sparse_adamw import SparseMaskedAdamW

__all__ = ["SparseMaskedAdamW", "masks"]
