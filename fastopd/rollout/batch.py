"""The rollout batch handed from generation to teacher scoring and the training forward."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class RolloutBatch:
    """Prompts and sampled completions, ``B*n`` rows (``B`` prompts x ``n = num_samples``, samples of one prompt
    in consecutive rows).

    Attributes:
        input_ids: ``[B*n, P+H]`` int64: prompts left-padded to a common width ``P``, completion tokens in columns
            ``P..P+H-1``, ``pad_token_id`` after a sequence's EOS (and after an early exit).
        attention_mask: ``[B*n, P+H]`` bool: real prompt tokens and generated tokens.
        completion_mask: ``[B*n, H]`` bool: generated tokens up to and including EOS.
        prompt_lengths: ``[B*n]`` int64: unpadded prompt lengths.
        logprobs: ``[B*n, H]`` fp32: the student's log-prob of each sampled token under the sampling temperature
            (``log_softmax(logits / temperature)``, before top-k/top-p filtering; temperature 1 for greedy); 0
            where ``completion_mask`` is 0.
        truncated: ``[B*n]`` bool: the sequence reached the horizon without emitting EOS (valid training data).
        horizon: ``H``, the horizon in force for this batch.
        num_samples: ``n``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    logprobs: torch.Tensor
    truncated: torch.Tensor
    horizon: int
    num_samples: int = 1

    @property
    def prompt_width(self) -> int:
        """``P``: the padded prompt width."""
        return self.input_ids.shape[1] - self.horizon

    @property
    def completion_ids(self) -> torch.Tensor:
        """``[B*n, H]`` completion tokens (a view of ``input_ids``)."""
        return self.input_ids[:, self.prompt_width :]

    def labels(self, ignore_index: int = -100) -> torch.Tensor:
        """``[B*n, H]`` completion tokens with ``ignore_index`` where ``completion_mask`` is 0: the ``labels`` of
        ``fused_linear_divergence`` for hidden states from :meth:`RolloutEngine.score`/``student_hidden``."""
        return self.completion_ids.masked_fill(~self.completion_mask, ignore_index)

    def to(self, device: torch.device | str) -> RolloutBatch:
        """A copy with every tensor moved to ``device``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return RolloutBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()})
