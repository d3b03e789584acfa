"""nn.Module front end of the fused divergence: it only stores options."""

from __future__ import annotations

import torch

from fastopd.losses.functional import fused_linear_divergence


class FusedLinearDivergenceLoss(torch.nn.Module):
    """`fused_linear_divergence` with its options fixed at construction.

    forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
            student_bias=None, teacher_bias=None, num_items_in_batch=None)
    """

    def __init__(self, divergence: str = "fkl", beta: float = 0.5, temperature: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean", vocab_size: int | None = None,
                 softcap: float | None = None, hard_label_weight: float = 0.0, soft_label_weight: float = 1.0,
                 hard_label_temperature: float | None = None, return_stats: bool = False, impl: str = "auto",
                 chunk_size: int | None = None, mode: str = "auto", vocab_parallel_group=None):
        super().__init__()
        self.options = dict(divergence=divergence, beta=beta, temperature=temperature, ignore_index=ignore_index,
                            reduction=reduction, vocab_size=vocab_size, softcap=softcap,
                            hard_label_weight=hard_label_weight, soft_label_weight=soft_label_weight,
                            hard_label_temperature=hard_label_temperature, return_stats=return_stats, impl=impl,
                            chunk_size=chunk_size, mode=mode, vocab_parallel_group=vocab_parallel_group)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None, num_items_in_batch=None):
        return fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                       student_bias=student_bias, teacher_bias=teacher_bias,
                                       num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
