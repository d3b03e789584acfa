"""TRL drop-in: `GKDTrainer` with fastopd's fused loss (hidden states and LM-head weights, never [B, T, V] logits).

    from fastopd.integrations.trl import FusedGKDTrainer   # instead of trl.experimental.gkd.GKDTrainer

    trainer = FusedGKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(...), train_dataset=...,
                              processing_class=tokenizer)
    trainer.train()

Everything but the loss is TRL's: on-policy generation with probability `lmbda`, sequence-level KD, data
collation, logging. `compute_loss` runs both models' decoders to final hidden states, shifts them with the labels
(position t predicts token t+1, the [B, T-1] slices flattened by the loss), and calls
`fastopd.fused_linear_divergence(divergence="jsd", beta=args.beta)` with TRL's normalization: the mean over tokens
whose label is not -100, or the sum over `num_items_in_batch` under gradient accumulation (TRL 1.7's
normalization: TRL 0.19 to 1.6 ignore `num_items_in_batch` and take each micro-batch's own mean, so with those and
gradient accumulation the updates differ from the stock trainer's). Like TRL's own
`compute_loss`, the divergence is taken at temperature 1 (`args.temperature` only affects sampling). Under data
parallelism the loss is multiplied by `fastopd.integrations.hf.trainer_loss_scale` (the number of ranks when HF sums
`num_items_in_batch` over them, `average_tokens_across_devices`), as HF's `Trainer.compute_loss` does (TRL's
`GKDTrainer.compute_loss` does not, so its loss is 1/world_size too small there). With `return_outputs` the outputs
are a student forward under no_grad, whose `.logits` TRL's `prediction_step` reads, as with the stock trainer; TRL
asks for them only when logits are wanted (predict(), or evaluate() with `compute_metrics`), so a loss-only
evaluation makes no [B, T, V] logits.

TRL's newer `trl.DistillationTrainer` already computes its loss from hidden states in chunks, so it needs no
drop-in.
"""

from __future__ import annotations

from typing import Any

import torch

from fastopd.integrations.hf import distillation_loss, trainer_loss_scale

try:
    from trl.experimental.gkd import GKDTrainer
except ImportError:  # older TRL kept GKD at the top level
    from trl import GKDTrainer


class FusedGKDTrainer(GKDTrainer):
    """`GKDTrainer` whose loss is `fastopd.fused_linear_divergence` on hidden states.

    Extra class attributes: `loss_impl` ("auto"; the `impl=` of the fused loss), `loss_chunk_size` (None: the
    default byte budget) and `loss_vocab_size` (None: both heads' rows; for a pair whose heads differ in rows, such
    as Qwen2.5 0.5B and 7B, the shared leading part, the `vocab_size=` of the fused loss). Set them on the class or
    on the instance before `train()`.
    """

    loss_impl: str = "auto"
    loss_chunk_size: int | None = None
    loss_vocab_size: int | None = None

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: int | torch.Tensor | None = None):
        loss = distillation_loss(model, self.teacher_model, inputs["input_ids"], inputs["attention_mask"],
                                 inputs["labels"], divergence="jsd", beta=self.beta, temperature=1.0,
                                 num_items_in_batch=num_items_in_batch, impl=self.loss_impl,
                                 chunk_size=self.loss_chunk_size, vocab_size=self.loss_vocab_size)
        loss = loss * trainer_loss_scale(self, num_items_in_batch)
        if not return_outputs:
            return loss
        with torch.no_grad():  # the logits evaluate()/predict() hand to compute_metrics, as GKDTrainer returns them
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return loss, outputs
