"""A drop-in for Liger-Kernel's `LigerFusedLinearJSDLoss`: same constructor and forward signatures, fastopd inside.

Switching is one line::

    # from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    from fastopd.integrations.liger import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, temperature=2.0)
    loss = loss_fn(student_hidden, student_lm_head.weight, teacher_hidden, teacher_lm_head.weight, labels)

Semantics are Liger's (0.6.5 and later; before, Liger averaged the soft loss over the ignored tokens too): loss =
weight_hard_loss * CE + weight_soft_loss * JSD_beta, both means over the tokens whose label is not `ignore_index`;
the JSD compares the temperature-scaled distributions while the CE is taken on the student's unscaled logits (as
Liger does); beta = 0 is forward KL, beta = 1 reverse KL. Differences: `compiled` is accepted and ignored (nothing
to compile), `chunk_size` is the rows per chunk of fastopd's loss (default: from its memory budget), `true_labels`
may be None (soft loss over every row, no hard loss), 3-D inputs [B, T, D] are accepted, and mismatched vocab sizes
need `vocab_size=` (Liger pads the student's logits with zeros instead).
"""

from __future__ import annotations

import torch

from fastopd.losses import fused_linear_divergence


class LigerFusedLinearJSDLoss(torch.nn.Module):
    """Liger's `LigerFusedLinearJSDLoss` interface on `fastopd.fused_linear_divergence`.

    Args (Liger's order):
        weight_hard_loss: weight of the cross-entropy on `true_labels` (student logits at temperature 1).
        weight_soft_loss: weight of the generalized JSD between the temperature-scaled distributions.
        beta: JSD mixture weight (0: KL(teacher||student), 1: KL(student||teacher)).
        ignore_index: label value of tokens that do not count.
        temperature: divides both models' logits in the soft loss.
        compiled: accepted for compatibility; ignored.
        chunk_size: token rows per chunk (None: fastopd's byte budget).
        return_soft_hard_loss: also return the soft and hard losses (detached values), as Liger does.
    Extra keyword-only options: vocab_size, impl (passed to `fused_linear_divergence`).
    """

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, compiled: bool = True,
                 chunk_size: int | None = None, return_soft_hard_loss: bool = False, *,
                 vocab_size: int | None = None, impl: str = "auto"):
        super().__init__()
        if temperature == 0:
            raise ValueError("temperature cannot be 0")
        self.weight_hard_loss = float(weight_hard_loss)
        self.weight_soft_loss = float(weight_soft_loss)
        self.beta = float(beta)
        self.ignore_index = int(ignore_index)
        self.temperature = float(temperature)
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss
        self.vocab_size = vocab_size
        self.impl = impl

    def forward(self, student_input: torch.Tensor, student_weight: torch.Tensor, teacher_input: torch.Tensor,
                teacher_weight: torch.Tensor, true_labels: torch.Tensor | None = None,
                student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None):
        """Loss of student_input [N, Ds] (or [B, T, Ds]) against teacher_input [N, Dt]; true_labels [N] or [B, T].

        Returns the loss (fp32 scalar), or (loss, soft_loss, hard_loss) with `return_soft_hard_loss`.
        """
        common = dict(divergence="jsd", beta=self.beta, ignore_index=self.ignore_index, reduction="mean",
                      student_bias=student_bias, teacher_bias=teacher_bias, vocab_size=self.vocab_size,
                      impl=self.impl, chunk_size=self.chunk_size)
        args = (student_input, student_weight, teacher_input, teacher_weight, true_labels)
        w_hard = self.weight_hard_loss if true_labels is not None else 0.0
        # One fused pass: the JSD at `temperature`, the CE at temperature 1 (Liger's convention).
        t = self.temperature
        loss = fused_linear_divergence(*args, temperature=t, hard_label_weight=w_hard,
                                       soft_label_weight=self.weight_soft_loss, hard_label_temperature=1.0, **common)
        if not self.return_soft_hard_loss:
            return loss
        with torch.no_grad():  # Liger returns the unweighted parts as values; an inspection aid, recomputed here
            frozen = tuple(a.detach() if a is not None else None for a in args)
            soft = fused_linear_divergence(*frozen, temperature=t, **common)
            if true_labels is None:
                hard = torch.zeros_like(soft)
            else:
                hard = fused_linear_divergence(*frozen, temperature=1.0, hard_label_weight=1.0, soft_label_weight=0.0,
                                               **common)
        return loss, soft, hard

    def extra_repr(self) -> str:
        return (f"weight_hard_loss={self.weight_hard_loss}, weight_soft_loss={self.weight_soft_loss}, "
                f"beta={self.beta}, ignore_index={self.ignore_index}, temperature={self.temperature}")
