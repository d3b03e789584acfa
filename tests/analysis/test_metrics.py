"""Per-tensor metrics against float64 references written here, on planted updates with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from fastopd.analysis import AnalysisConfig, analyze_tensor, layer_index, module_kind

SMALL_CHUNKS = AnalysisConfig(chunk_elems=97)  # many chunks, odd boundaries: the streaming paths


def _ref_svals(delta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(delta.to(torch.float64).reshape(delta.shape[0], -1))


def _planted_low_rank(m, n, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype)
    upd = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)
    tuned = (base.to(torch.float64) + upd).to(dtype)
    return base, tuned


@pytest.mark.parametrize("m,n,r,dtype", [
    pytest.param(37, 53, 1, torch.float64, id="M37-N53-r1-fp64"),
    pytest.param(53, 37, 3, torch.float64, id="M53-N37-r3-fp64"),
    pytest.param(61, 29, 7, torch.float32, id="M61-N29-r7-fp32"),
    pytest.param(29, 71, 5, torch.float32, id="M29-N71-r5-fp32-wide"),
])
@pytest.mark.parametrize("cfg", [pytest.param(AnalysisConfig(), id="one-chunk"),
                                 pytest.param(SMALL_CHUNKS, id="chunked")])
def test_planted_rank_r(m, n, r, dtype, cfg):
    base, tuned = _planted_low_rank(m, n, r, dtype, seed=m * n + r)
    out, spectra = analyze_tensor("w", base, tuned, cfg)
    delta = tuned.to(torch.float64) - base.to(torch.float64)
    ref = _ref_svals(delta)
    assert out["numerical_rank"] == {"1e-06": r, "1e-05": r, "0.0001": r}
    assert out["topk_energy"][str(r)] == pytest.approx(1.0, abs=1e-12)
    if r > 1:
        assert out["topk_energy"][str(r - 1)] < 1 - 1e-6
    # full spectrum, not a truncation: all min(m, n) singular values, matching float64 SVD
    got = torch.from_numpy(spectra["delta"])
    assert got.shape == (min(m, n),)
    torch.testing.assert_close(got[:r], ref[:r], rtol=1e-9, atol=0)
    assert float(got[r:].max()) < 1e-7 * float(ref[0])
    energy = float((ref ** 2).sum())
    assert out["energy"] == pytest.approx(float((delta ** 2).sum()), rel=1e-12)
    assert out["stable_rank"] == pytest.approx(energy / float(ref[0]) ** 2, rel=1e-9)
    q = ref / ref.sum()
    q = q[q > 0]
    # the Gram resolves singular values down to ~sqrt(m * 2^-53) sigma_1; below that, noise-level terms differ
    assert out["effective_rank"] == pytest.approx(math.exp(-float((q * q.log()).sum())), rel=1e-5)
    cum = torch.cumsum(ref ** 2, 0) / energy
    for k in (1, 2, min(m, n)):
        assert out["topk_energy"][str(k)] == pytest.approx(float(cum[k - 1]), abs=1e-12)


@pytest.mark.parametrize("shape,density,dtype", [
    pytest.param((61, 47), 0.013, torch.bfloat16, id="61x47-d0.013-bf16"),
    pytest.param((128, 33), 0.25, torch.float16, id="128x33-d0.25-fp16"),
    pytest.param((1001,), 0.1, torch.float32, id="1001-d0.1-fp32-1d"),
    pytest.param((7, 5, 9), 0.5, torch.bfloat16, id="7x5x9-d0.5-bf16-3d"),
])
def test_planted_sparse_density_exact(shape, density, dtype):
    g = torch.Generator().manual_seed(7)
    base = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    numel = base.numel()
    k = round(density * numel)
    pos = torch.randperm(numel, generator=g)[:k]
    step = torch.empty(k).uniform_(0.01, 0.2, generator=g) * torch.sign(torch.randn(k, generator=g))
    flat = base.reshape(-1).clone()
    flat[pos] = (flat[pos].to(torch.float64) + step.to(torch.float64)).to(dtype)
    tuned = flat.view(shape)
    assert int((tuned != base).sum()) == k  # the planted steps all change the stored value
    out, _ = analyze_tensor("w", base, tuned, SMALL_CHUNKS)
    assert out["changed"] == k
    assert out["density_exact"] == k / numel
    # float64 references for the thresholded densities and the energy concentration
    d = (tuned.to(torch.float64) - base.to(torch.float64)).reshape(-1)
    for a in (1e-8, 1e-4):
        assert out["density_atol"][f"{a:g}"] == pytest.approx(float((d.abs() > a).double().mean()), abs=1e-12)
    rms = float(base.to(torch.float64).pow(2).mean().sqrt())
    for t in (1e-3, 1e-2):
        assert out["frac_below_tau_rms"][f"{t:g}"] == pytest.approx(float((d.abs() < t * rms).double().mean()),
                                                                    abs=1e-12)
    sq = d.square().sort(descending=True).values
    for f in (0.001, 0.01, 0.05):
        kk = max(1, math.ceil(f * numel))
        assert out["energy_top"][f"{f * 100:g}%"] == pytest.approx(float(sq[:kk].sum() / sq.sum()), rel=1e-9)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_frac_below_tau_rms_is_zero_when_the_base_is_all_zero(dtype):
    # a zero-initialised bias or LoRA B: RMS(base) = 0, so |Delta| < tau * 0 holds for no coordinate
    base = torch.zeros(40, dtype=dtype)
    tuned = base.clone()
    tuned[:3] = 1e-3
    out, _ = analyze_tensor("b", base, tuned, AnalysisConfig())
    assert out["rms_base"] == 0.0
    assert out["frac_below_tau_rms"] == {"0.0001": 0.0, "0.001": 0.0, "0.01": 0.0}
    assert out["density_atol"]["1e-08"] == pytest.approx(3 / 40)  # the atol counts share the bucketize


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("rel,below", [pytest.param(1e-12, 1.0, id="tau-rms-just-above-the-delta"),
                                       pytest.param(0.0, 0.5, id="tau-rms-equal-to-the-delta"),
                                       pytest.param(-1e-12, 0.5, id="tau-rms-just-below-the-delta")])
def test_frac_below_tau_rms_is_strict_at_a_float32_rounded_threshold(dtype, rel, below):
    """16-bit storage compares |Delta| with tau * RMS(base) rounded to float32: a threshold that rounds down onto a
    |Delta| value is still above it, so that coordinate is below tau * RMS (it was counted as not below)."""
    base = torch.ones(4, 8, dtype=dtype)  # RMS(base) = 1
    tuned = base.clone()
    tuned[:, :4] += 2.0 ** -7  # |Delta| = 2^-7 on half the coordinates, 0 on the others
    tau = 2.0 ** -7 * (1 + rel)
    out, _ = analyze_tensor("w", base, tuned, AnalysisConfig(taus=(tau,)))
    assert out["rms_base"] == 1.0
    assert out["frac_below_tau_rms"] == {f"{tau:g}": below}


def test_energy_top_exact_with_ties_in_the_boundary_bin():
    # 1000 coordinates share one |Delta| value; the top 5% boundary falls inside that tie group
    base = torch.zeros(40, 50, dtype=torch.float32)
    tuned = base.clone().reshape(-1)
    tuned[:1000] = 0.5
    tuned[1000:1010] = 3.0
    tuned[1010:1500] = 0.5001
    out, _ = analyze_tensor("w", base, tuned.view(40, 50), SMALL_CHUNKS)
    sq = tuned.to(torch.float64).square().sort(descending=True).values
    for f, key in ((0.001, "0.1%"), (0.01, "1%"), (0.05, "5%")):
        kk = math.ceil(f * 2000)
        assert out["energy_top"][key] == pytest.approx(float(sq[:kk].sum() / sq.sum()), rel=1e-12)


def test_update_on_smallest_weights_is_enriched():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(96, 80, generator=g)
    thr = base.abs().flatten().kthvalue(int(0.1 * base.numel())).values
    small = base.abs() <= thr
    pick = small & (torch.rand(base.shape, generator=g) < 0.5)
    tuned = torch.where(pick, base + 0.3, base)
    out, _ = analyze_tensor("w", base, tuned, AnalysisConfig(), null_models=True)
    # reference: P(small | updated) / P(small) with the same small set (bottom ~10% of |base|)
    assert out["enrichment_small"]["10%"] > 8.0
    assert out["enrichment_by_decile"][0] > 8.0
    assert all(v < 0.2 for v in out["enrichment_by_decile"][2:])
    assert 0.6 < out["null"]["shuffled"]["enrichment_small"]["10%"] < 1.6


def test_enrichment_matches_float64_reference():
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(64, 48, generator=g) * 0.02).bfloat16()
    p = torch.sigmoid(-base.float().abs() * 200)            # smaller weights more likely to change
    pick = torch.rand(base.shape, generator=g) < p
    tuned = torch.where(pick, (base.float() + 0.01).bfloat16(), base)
    out, _ = analyze_tensor("w", base, tuned, SMALL_CHUNKS)
    a = base.to(torch.float64).abs().flatten()
    upd = (tuned != base).flatten()
    for q in (0.05, 0.25):
        # bf16 magnitudes: the smallest threshold t with P(|base| <= t) >= q is an exact order statistic
        t = a.sort().values[math.ceil(q * a.numel()) - 1]
        small = a <= t
        ref = float(small[upd].double().mean() / small.double().mean())
        assert out["enrichment_small"][f"{q * 100:g}%"] == pytest.approx(ref, rel=1e-12)


def test_subspace_energy_matches_float64_reference():
    g = torch.Generator().manual_seed(5)
    m, n = 45, 60
    base = torch.randn(m, n, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(base)
    k = math.ceil(0.10 * min(m, n))  # the "10%" subspace
    inside = u[:, :k] @ torch.randn(k, k, generator=g, dtype=torch.float64) @ vh[:k]
    out, _ = analyze_tensor("w", base, base + inside, AnalysisConfig())
    # the base's singular vectors come from a float32 Gram (geometry needs no more): budget ~1e3 x fp32 eps
    assert out["subspace_energy"]["10%"] == pytest.approx(1.0, abs=1e-5)
    assert out["subspace_energy"]["1%"] < 0.9
    delta = torch.randn(m, n, generator=g, dtype=torch.float64)
    out, _ = analyze_tensor("w", base, base + delta, SMALL_CHUNKS)
    for key, f in (("1%", 0.01), ("5%", 0.05), ("20%", 0.20)):
        kk = math.ceil(f * min(m, n))
        ref = float((u[:, :kk].T @ delta @ vh[:kk].T).square().sum() / delta.square().sum())
        assert out["subspace_energy"][key] == pytest.approx(ref, rel=1e-4)


def test_one_ulp_changes_show_in_ulp_buckets():
    g = torch.Generator().manual_seed(2)
    base = (torch.randn(50, 40, generator=g) * 0.03).bfloat16()
    pick = torch.rand(base.shape, generator=g) < 0.3
    # one bf16 ulp away from zero: +1 on the sign-magnitude bit pattern (whatever the sign)
    up = (base.view(torch.int16) + 1).view(torch.bfloat16)
    tuned = torch.where(pick, up, base)
    out, _ = analyze_tensor("w", base, tuned, AnalysisConfig())
    total = sum(b["count"] for b in out["ulp_buckets"])
    assert total == base.numel()
    for b in out["ulp_buckets"]:
        if b["frac_changed"] > 0:
            # |Delta| = 1 ulp(base) exactly: log2(|Delta|/ulp) = 0, the bin at index -lo
            counts = b["log2_ulps_hist"]["counts"]
            assert counts[-b["log2_ulps_hist"]["lo"]] == sum(counts)
            assert b["frac_changed_lt_2ulp"] == 1.0


def test_unchanged_tensor_reports_zeros_not_nan():
    base = torch.randn(20, 30)
    out, _ = analyze_tensor("w", base, base.clone(), AnalysisConfig(), null_models=True)
    assert out["density_exact"] == 0.0 and out["changed"] == 0
    assert out["numerical_rank"] == {"1e-06": 0, "1e-05": 0, "0.0001": 0}
    assert out["energy_top"]["1%"] is None and out["null"] is None


def _with_nonfinite(case: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    base = torch.randn(24, 17, generator=g).to(dtype)
    tuned = torch.where(torch.rand(base.shape, generator=g) < 0.3, (base.float() + 0.01).to(dtype), base)
    nan, inf = float("nan"), float("inf")
    if case == "became-nan":
        tuned[0, 0], tuned[5, 3] = nan, nan
    elif case == "became-inf":
        tuned[2, 1], tuned[7, 9] = inf, -inf
    elif case == "unchanged-nan":   # NaN - NaN = NaN, but the stored value did not change
        base[3, 3] = nan
        tuned[3, 3] = base[3, 3]
    elif case == "inf-to-finite":
        base[4, 4] = inf
        tuned[4, 4] = 1.0
    return base, tuned


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("case,n_delta,n_base", [
    pytest.param("became-nan", 2, 0, id="became-nan"),
    pytest.param("became-inf", 2, 0, id="became-inf"),
    pytest.param("unchanged-nan", 0, 1, id="unchanged-nan"),
    pytest.param("inf-to-finite", 1, 1, id="inf-to-finite"),
])
def test_nonfinite_deltas_are_counted_and_excluded_from_energy_and_spectra(case, n_delta, n_base, dtype):
    base, tuned = _with_nonfinite(case, dtype)
    out, spectra = analyze_tensor("w", base, tuned, SMALL_CHUNKS, null_models=True)
    assert out["nonfinite_delta"] == n_delta and out["nonfinite_base"] == n_base
    changed = base.view(torch.int16 if dtype.itemsize == 2 else torch.int32) != tuned.view(
        torch.int16 if dtype.itemsize == 2 else torch.int32)
    assert out["changed"] == int(changed.sum())
    # float64 reference: Delta = 0 where the stored value is unchanged; non-finite Delta taken as 0
    d = torch.where(changed, tuned.to(torch.float64) - base.to(torch.float64), 0.0)
    bad = ~d.isfinite()
    assert int(bad.sum()) == n_delta
    d = d.masked_fill(bad, 0.0)
    assert out["energy"] == pytest.approx(float(d.square().sum()), rel=1e-12)
    torch.testing.assert_close(torch.from_numpy(spectra["delta"]), _ref_svals(d), rtol=1e-9, atol=1e-12)
    for key in ("null_shuffled", "null_rounding", "base"):
        assert bool(torch.from_numpy(spectra[key]).isfinite().all()), key
    assert out["null"]["shuffled"]["energy"] == pytest.approx(out["energy"], rel=1e-9)
    # a coordinate whose Delta is NaN/Inf changed by more than any tolerance
    for a in (1e-8, 1e-4):
        want = float(((d.abs() > a) | bad).double().mean())
        assert out["density_atol"][f"{a:g}"] == pytest.approx(want, abs=1e-12)
    rms = float(base.to(torch.float64).nan_to_num(0.0, 0.0, 0.0).square().mean().sqrt())
    assert out["rms_base"] == pytest.approx(rms, rel=1e-12)
    assert out["frac_below_tau_rms"]["0.01"] == pytest.approx(float(((d.abs() < 0.01 * rms) & ~bad).double().mean()),
                                                             abs=1e-12)
    assert math.isfinite(out["stable_rank"]) and math.isfinite(out["energy_top"]["1%"])


def test_shuffle_by_sampling_for_large_tensors_runs_and_is_unstructured():
    base, tuned = _planted_low_rank(64, 48, 2, torch.float32, seed=1)
    cfg = AnalysisConfig(exact_shuffle_max=0, chunk_elems=500)
    out, _ = analyze_tensor("w", base, tuned, cfg, null_models=True)
    assert out["null"]["shuffled"]["method"] == "sampled with replacement"
    assert out["null"]["shuffled"]["numerical_rank"]["0.0001"] == 48
    assert out["null"]["shuffled"]["topk_energy"]["2"] < 0.5 < out["topk_energy"]["2"]


@pytest.mark.parametrize("name,kind,layer", [
    pytest.param("model.layers.12.mlp.down_proj.weight", "ffn_down", 12, id="llama-down"),
    pytest.param("model.layers.0.self_attn.q_proj.weight", "attn_q", 0, id="llama-q"),
    pytest.param("model.layers.3.self_attn.o_proj.weight", "attn_o", 3, id="llama-o"),
    pytest.param("model.layers.3.post_attention_layernorm.weight", "norm", 3, id="llama-norm"),
    pytest.param("model.embed_tokens.weight", "embed", None, id="llama-embed"),
    pytest.param("lm_head.weight", "lm_head", None, id="lm-head"),
    pytest.param("transformer.h.5.mlp.c_proj.weight", "ffn_down", 5, id="gpt2-mlp-proj"),
    pytest.param("transformer.h.5.attn.c_proj.weight", "attn_o", 5, id="gpt2-attn-proj"),
    pytest.param("transformer.h.5.attn.c_attn.weight", "attn_qkv", 5, id="gpt2-qkv"),
    pytest.param("transformer.h.5.ln_1.weight", "norm", 5, id="gpt2-ln"),
    pytest.param("gpt_neox.layers.2.mlp.dense_h_to_4h.weight", "ffn_up", 2, id="neox-up"),
    pytest.param("model.layers.1.mlp.experts.3.w2.weight", "ffn_down", 1, id="moe-w2"),
    pytest.param("model.layers.1.mlp.gate_up_proj.weight", "ffn_gate_up", 1, id="fused-gate-up"),
    pytest.param("layers.4.attention.wo.weight", "attn_o", 4, id="meta-llama-wo"),
    pytest.param("layers.4.feed_forward.w2.weight", "ffn_down", 4, id="meta-llama-w2"),
    pytest.param("tok_embeddings.weight", "embed", None, id="meta-llama-embed"),
    pytest.param("output.weight", "lm_head", None, id="meta-llama-head"),
    pytest.param("encoder.block.2.layer.1.DenseReluDense.wo.weight", "ffn_down", 2, id="t5-wo"),
    pytest.param("decoder.block.2.layer.1.EncDecAttention.o.weight", "attn_o", 2, id="t5-o"),
    pytest.param("transformer.h.1.mlp.fc_out.bias", "ffn_down", 1, id="gptj-fc-out"),
    pytest.param("model.decoder.embed_positions.weight", "embed", None, id="opt-positions"),
    pytest.param("model.layers.0.self_attn.q_proj.lora_A.default.weight", "attn_q", 0, id="peft-lora"),
])
def test_module_kind_and_layer(name, kind, layer):
    assert module_kind(name) == kind
    assert layer_index(name) == layer


@pytest.mark.parametrize("n_exp,m,n,dtype", [
    pytest.param(4, 40, 24, torch.float64, id="E4-40x24-fp64"),
    pytest.param(3, 17, 29, torch.float32, id="E3-17x29-fp32-wide"),
])
@pytest.mark.parametrize("cfg", [pytest.param(AnalysisConfig(), id="one-chunk"),
                                 pytest.param(SMALL_CHUNKS, id="chunked")])
def test_moe_expert_stack_spectrum_is_the_union_of_the_experts(n_exp, m, n, dtype, cfg):
    """A rank-1 update per expert of a stack [E, m, n] has rank E out of E min(m, n), not full rank of [E, m n]."""
    g = torch.Generator().manual_seed(n_exp * m * n)
    base = torch.randn(n_exp, m, n, generator=g, dtype=torch.float64).to(dtype)
    upd = torch.randn(n_exp, m, 1, generator=g, dtype=torch.float64) @ torch.randn(n_exp, 1, n, generator=g,
                                                                                  dtype=torch.float64)
    tuned = (base.to(torch.float64) + upd).to(dtype)
    out, spectra = analyze_tensor("model.layers.0.mlp.experts.down_proj", base, tuned, cfg, null_models=True)
    delta = tuned.to(torch.float64) - base.to(torch.float64)
    ref = torch.linalg.svdvals(delta).flatten().sort(descending=True).values  # block-diagonal spectrum
    assert out["numerical_rank"] == {"1e-06": n_exp, "1e-05": n_exp, "0.0001": n_exp}
    assert out["spectral_min_dim"] == n_exp * min(m, n) and spectra["delta"].shape == (n_exp * min(m, n),)
    torch.testing.assert_close(torch.from_numpy(spectra["delta"])[:n_exp], ref[:n_exp], rtol=1e-6, atol=0)
    assert out["stable_rank"] == pytest.approx(float((ref ** 2).sum() / ref[0] ** 2), rel=1e-6)
    # subspace energy: each expert's Delta in its own base matrix's top-k singular subspaces, summed
    b64 = base.to(torch.float64)
    for f in (0.05, 0.20):
        k = max(1, math.ceil(f * min(m, n)))
        u, _, vh = torch.linalg.svd(b64, full_matrices=False)
        proj = u[..., :k].mT @ delta @ vh[..., :k, :].mT
        assert out["subspace_energy"][f"{f * 100:g}%"] == pytest.approx(float(proj.square().sum()
                                                                            / delta.square().sum()), rel=1e-4)
    assert "stack of" in out["spectral_layout"] and "numerical_rank" not in out["null"]["rounding"]


def test_rounding_null_reports_the_energy_ratio_it_achieves():
    """The rounding null's scale is fitted on a row sample: its energy matches the observed one approximately, and
    the report says how closely."""
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(512, 256, generator=g) * 0.02).to(torch.bfloat16)
    tuned = (base.float() + 2e-5 * torch.randn(512, 256, generator=g)).to(torch.bfloat16)
    out, _ = analyze_tensor("w", base, tuned, AnalysisConfig(), null_models=True)
    rounding = out["null"]["rounding"]
    assert rounding["energy_ratio"] == pytest.approx(rounding["energy"] / out["energy"], rel=1e-12)
    assert 0.9 < rounding["energy_ratio"] < 1.1
