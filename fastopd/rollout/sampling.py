"""Next-token sampling: greedy, temperature, top-k, top-p, without host synchronization."""

from __future__ import annotations

import math

import torch


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``logits`` ``[B, V]``.

    Returns ``(tokens [B] int64, logprobs [B] fp32)`` where ``logprobs = log_softmax(logits / temperature)`` at the
    token, before top-k/top-p filtering (temperature 1 when greedy): the log-prob a training forward of the
    student recomputes. ``temperature == 0`` is greedy (argmax, ties to the lowest id). Otherwise the token is
    drawn from ``softmax(filtered / temperature)`` by inverse CDF (one uniform per row, a cumulative sum and a
    binary search: no host sync, and far fewer random numbers than a Gumbel/exponential race over the
    vocabulary); ``top_k = 0`` and ``top_p = 1`` disable the filters, and
    top-p keeps the smallest prefix of the sorted distribution whose mass reaches ``top_p`` (at least one token).
    A tiny positive temperature gives the greedy limit: ``logits / temperature`` is taken after shifting each row's
    maximum to 0, so it never overflows to +inf (a temperature below fp32's smallest normal divides as it).
    Randomness comes from ``generator``, or torch's global RNG when None.
    """
    if not (temperature >= 0 and math.isfinite(temperature)):  # inf: 0 * a -inf logit is NaN
        raise ValueError(f"temperature must be a number >= 0 and finite (0: greedy), got {temperature!r}")
    z = logits.float()
    if temperature == 0:
        best, tokens = z.max(-1)  # max(dim) is ~3x faster than argmax on CPU; same first-index tie rule
        return tokens, best - z.logsumexp(-1)
    if temperature != 1.0:
        # The top logit shifted to 0 first (softmax is shift-invariant): z / T then lies in [-inf, 0], where a tiny
        # T would overflow raw fp32 logits to +-inf and make log_softmax NaN. It is a product with 1 / T, as CUDA
        # divides by a scalar anyway (so CPU tests see what a GPU does), and T is clamped to 2**-126, fp32's
        # smallest normal, so that 1 / T stays finite (0 * inf would be NaN at the top logit); any smaller T gives
        # the same greedy limit.
        z = (z - z.amax(-1, keepdim=True)) * (1.0 / max(temperature, 2.0**-126))
    logp = torch.log_softmax(z, -1)
    filtered = logp
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(filtered, top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logp, order = torch.sort(filtered, dim=-1, descending=True)
        probs = sorted_logp.exp()
        mass_before = probs.cumsum(-1) - probs
        drop = (mass_before >= top_p * probs.sum(-1, keepdim=True))
        drop[:, 0] = False
        filtered = filtered.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    u = torch.rand(z.shape[0], 1, generator=generator, device=z.device, dtype=torch.float64)
    tokens = inverse_cdf(filtered, u)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def inverse_cdf(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of ``logp`` ``[B, V]`` (log-probabilities, -inf for dropped tokens, not necessarily normalized), the
    first column whose running sum of ``exp(logp)`` exceeds ``u * total`` (``u`` ``[B, 1]`` float64 in [0, 1)):
    a draw from ``softmax(logp)`` for uniform ``u``. Zero-probability columns never qualify.

    The running sum is float64: in float32 each token's share of it is rounded to the spacing of the sum (6e-8
    near 1), so a token of probability below 3e-8 that comes after most of the mass would get no share at all and
    never be drawn (up to V x 3e-8 of the mass misplaced: 0.5% at V = 150k)."""
    cdf = logp.exp().to(torch.float64).cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
