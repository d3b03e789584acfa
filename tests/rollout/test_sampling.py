"""sample_tokens against distributions computed here in float64."""

import pytest
import torch

from fastopd.rollout import sample_tokens


def _logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax_with_temperature_one_logprob():
    z = _logits(5, 33)
    tok, lp = sample_tokens(z, temperature=0)
    assert torch.equal(tok, z.argmax(-1))
    ref = z.double().log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-6)  # fp32 budget against float64


@pytest.mark.parametrize("temperature", [pytest.param(0.7, id="T0.7"), pytest.param(1.0, id="T1"),
                                         pytest.param(1.6, id="T1.6")])
def test_logprob_is_under_the_temperature(temperature):
    z = _logits(6, 41)
    tok, lp = sample_tokens(z, temperature=temperature, top_k=5, top_p=0.8)
    ref = (z.double() / temperature).log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    torch.testing.assert_close(lp.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw", [pytest.param(dict(temperature=1e-39), id="T1e-39-subnormal"),
                                pytest.param(dict(temperature=1e-38), id="T1e-38"),
                                pytest.param(dict(temperature=2.0**-140), id="T2^-140-reciprocal-overflows"),
                                pytest.param(dict(temperature=1e-300), id="T1e-300-below-fp32"),
                                pytest.param(dict(temperature=1e-39, top_k=5, top_p=0.9), id="T1e-39-topk5-topp0.9")])
def test_tiny_temperature_gives_greedy_tokens_with_finite_logprobs(kw):
    """logits / T overflows fp32 for a tiny T (to +-inf, then log_softmax is NaN and the draw the last id), and a T
    below fp32's range rounds to 0 (and CUDA's z * (1 / T) makes 0 * inf at the top logit for T < 2^-128); under the
    shift of each row's maximum to 0 and T clamped to 2^-126 the draw is the argmax with log-prob 0."""
    z = _logits(16, 41) * 10
    tok, lp = sample_tokens(z, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(tok, z.argmax(-1))
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp, torch.zeros(16), rtol=0, atol=1e-6)


def _empirical(z_row: torch.Tensor, draws: int, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    tok, _ = sample_tokens(z_row.expand(draws, -1), generator=g, **kw)
    return torch.bincount(tok, minlength=z_row.numel()).double() / draws


@pytest.mark.parametrize(
    "kw",
    [pytest.param(dict(temperature=1.0), id="T1"), pytest.param(dict(temperature=0.5), id="T0.5"),
     pytest.param(dict(temperature=1.0, top_k=4), id="topk4"),
     pytest.param(dict(temperature=1.0, top_p=0.7), id="topp0.7"),
     pytest.param(dict(temperature=0.8, top_k=6, top_p=0.9), id="T0.8-topk6-topp0.9")],
)
def test_sampling_distribution(kw):
    """Frequencies over 40k draws match the float64 target distribution (4 sigma per token)."""
    z = _logits(1, 12, seed=5)[0]
    x = z.double() / kw["temperature"]
    keep = torch.ones(12, dtype=torch.bool)
    if kw.get("top_k"):
        keep &= x >= x.topk(kw["top_k"]).values[-1]
    if kw.get("top_p", 1.0) < 1.0:
        p = x.masked_fill(~keep, float("-inf")).softmax(-1)
        order = p.argsort(descending=True)
        before = p[order].cumsum(0) - p[order]
        keep_sorted = before < kw["top_p"]
        keep_p = torch.zeros(12, dtype=torch.bool)
        keep_p[order[keep_sorted]] = True
        keep &= keep_p
    target = x.masked_fill(~keep, float("-inf")).softmax(-1)
    draws = 40_000
    freq = _empirical(z, draws, **kw)
    sigma = (target * (1 - target) / draws).sqrt()
    assert ((freq - target).abs() <= 4 * sigma + 1e-12).all(), (freq, target)
    assert (freq[~keep] == 0).all()


def test_seeded_generator_reproducible_and_global_rng():
    z = _logits(8, 50)
    a = sample_tokens(z, generator=torch.Generator().manual_seed(7))[0]
    b = sample_tokens(z, generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b)
    torch.manual_seed(11)
    c = sample_tokens(z)[0]
    torch.manual_seed(11)
    assert torch.equal(c, sample_tokens(z)[0])


def test_top_k_one_is_greedy():
    z = _logits(16, 30)
    assert torch.equal(sample_tokens(z, top_k=1)[0], z.argmax(-1))


def test_inverse_cdf_keeps_tokens_far_below_the_float32_spacing():
    """A dominant token then 1000 tokens of probability 1e-8 each (tail mass 1e-5): in a float32 running sum each
    would add less than half the spacing near 1 and get no share, so no u could draw one. u in the middle of the
    tail must land in the middle of the tail, and u just below the dominant token's mass on the dominant token."""
    from fastopd.rollout.sampling import inverse_cdf

    p = torch.full((1, 1001), 1e-8, dtype=torch.float64)
    p[0, 0] = 1.0 - 1000 * 1e-8
    logp = p.log().float()
    total = float(logp.double().exp().sum())
    head = float(logp[0, 0].double().exp()) / total
    for frac, want in ((0.5, 500), (0.1, 100), (0.9, 900)):
        u = torch.tensor([[head + frac * (1.0 - head)]], dtype=torch.float64)
        assert abs(int(inverse_cdf(logp, u)) - want) <= 1, (frac, int(inverse_cdf(logp, u)))
    assert int(inverse_cdf(logp, torch.tensor([[head * 0.999]], dtype=torch.float64))) == 0


@pytest.mark.parametrize("temperature", [pytest.param(float("inf"), id="inf"), pytest.param(float("nan"), id="nan"),
                                         pytest.param(-0.5, id="negative")])
def test_a_temperature_that_is_not_finite_and_non_negative_is_refused(temperature):
    """T = inf multiplied the shifted logits by 0: a uniform draw, and NaN log-probs where a logit was -inf."""
    with pytest.raises(ValueError, match="temperature must be a number >= 0 and finite"):
        sample_tokens(_logits(2, 7), temperature=temperature)
