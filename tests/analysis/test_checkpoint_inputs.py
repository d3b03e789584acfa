"""Real-world checkpoint pairs: wrapper prefixes, one-prefix name differences, nested torch files, autograd tensors,
unchanged pairs; statistics against numpy float64 and the null models' seeding."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastopd.analysis import (
    AnalysisConfig,
    CheckpointError,
    MismatchError,
    analyze_tensor,
    analyze_update,
    open_checkpoint,
)
from fastopd.cli import main as cli_main


def _sd(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(13, 6, generator=g).to(dtype),
            "model.layers.0.mlp.up_proj.weight": torch.randn(11, 6, generator=g).to(dtype),
            "model.layers.0.mlp.up_proj.bias": torch.randn(11, generator=g).to(dtype),
            "model.norm.weight": torch.ones(6, dtype=dtype)}


def _tuned(sd: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.double() + 0.01 * torch.randn(v.shape, generator=g, dtype=torch.float64)
                * (torch.rand(v.shape, generator=g) < 0.3)).to(v.dtype) for k, v in sd.items()}


def _rename(sd: dict, f) -> dict:
    return {f(k): v for k, v in sd.items()}


BASE = _sd()
TUNED = _tuned(BASE)


@pytest.fixture(scope="module")
def reference():
    return analyze_update(BASE, TUNED, progress=False, null_models="all")


@pytest.mark.parametrize("wrap,side", [
    pytest.param(lambda k: "module." + k, "base", id="ddp-module-on-base"),
    pytest.param(lambda k: "_orig_mod." + k, "tuned", id="torch-compile-orig-mod-on-tuned"),
    pytest.param(lambda k: "module._orig_mod." + k, "tuned", id="ddp-of-compiled"),
    pytest.param(lambda k: "_orig_mod.module." + k, "base", id="compiled-ddp"),
    pytest.param(lambda k: k.replace("layers.0.", "layers.0._fsdp_wrapped_module._checkpoint_wrapped_module."),
                 "base", id="fsdp-and-checkpoint-wrappers-inside-names"),
])
def test_wrapper_prefixes_are_removed_before_names_are_compared(reference, wrap, side):
    base, tuned = (_rename(BASE, wrap), TUNED) if side == "base" else (BASE, _rename(TUNED, wrap))
    report = analyze_update(base, tuned, progress=False, null_models="all")
    assert sorted(report.tensors) == sorted(reference.tensors)  # the unwrapped names, on either side
    assert report.summary == reference.summary
    assert not report.mismatches
    assert list(report.meta["renamed"]) == [side]


def test_leading_module_is_kept_when_not_every_name_has_it():
    """A model may own a submodule called "module": only DDP's uniform prefix is a wrapper's."""
    base, tuned = ({"module.proj.weight": sd["model.layers.0.mlp.up_proj.weight"],
                    "head.weight": sd["model.norm.weight"]} for sd in (BASE, TUNED))
    report = analyze_update(base, tuned, progress=False, null_models="none")
    assert sorted(report.tensors) == ["head.weight", "module.proj.weight"] and report.meta["renamed"] == {}


def test_wrapper_removal_that_makes_two_names_one_is_an_error():
    with pytest.raises(CheckpointError, match=r"'norm.weight' and '_orig_mod.norm.weight' are both 'norm.weight'"):
        analyze_update({"norm.weight": torch.ones(3), "_orig_mod.norm.weight": torch.ones(3)},
                       {"norm.weight": torch.ones(3)}, progress=False)


@pytest.mark.parametrize("side", [pytest.param("tuned", id="tuned-lacks-model-prefix"),
                                  pytest.param("base", id="base-lacks-model-prefix")])
def test_names_differing_by_one_prefix_are_compared_under_base_names(reference, side):
    strip = lambda k: k.removeprefix("model.")  # noqa: E731 - a bare model's names against a CausalLM's
    base, tuned = (BASE, _rename(TUNED, strip)) if side == "tuned" else (_rename(BASE, strip), TUNED)
    report = analyze_update(base, tuned, progress=False, null_models="all")
    assert sorted(report.tensors) == sorted(base)
    assert report.summary == reference.summary
    how = "added to" if side == "tuned" else "removed from"
    assert report.meta["renamed"]["tuned"] == [f"the prefix 'model.' is {how} TUNED's names to match BASE's"]


def test_prefix_alignment_leaves_a_tensor_missing_on_one_side_a_mismatch():
    base = {**BASE, "model.rotary_emb.inv_freq": torch.ones(3)}
    tuned = _rename(TUNED, lambda k: k.removeprefix("model."))
    with pytest.raises(MismatchError, match=r"only in BASE \(1\):\n    model.rotary_emb.inv_freq"):
        analyze_update(base, tuned, progress=False)
    report = analyze_update(base, tuned, progress=False, allow_partial=True, null_models="none")
    assert report.mismatches == {"only_in_base": ["model.rotary_emb.inv_freq"]} and len(report.tensors) == 4


def test_unrelated_names_are_not_aligned():
    with pytest.raises(MismatchError, match="only in TUNED"):
        analyze_update({"a.x.weight": torch.ones(3)}, {"b.x.weight": torch.ones(3)}, progress=False)


def test_cli_reports_the_renaming_of_a_compiled_ddp_bin_against_a_safetensors_folder(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    save_file(BASE, str(tmp_path / "base" / "model.safetensors"))
    torch.save({"module._orig_mod." + k: v for k, v in TUNED.items()}, tmp_path / "tuned.bin")
    rc = cli_main(["analyze", str(tmp_path / "base"), str(tmp_path / "tuned.bin"), "--out", str(tmp_path / "r"),
                   "--no-plots", "--quiet", "--mask-out", str(tmp_path / "m.safetensors")])
    assert rc == 0
    assert "(names of TUNED: the wrapper components '_orig_mod' are removed and the leading 'module.'" in \
        capsys.readouterr().out
    from fastopd.optim.masks import load

    assert sorted(load(tmp_path / "m.safetensors")) == sorted(BASE)
    assert "TUNED names:" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize("wrap", [
    pytest.param(lambda sd: {"state_dict": sd, "global_step": torch.tensor(7), "epoch": 2}, id="lightning-with-step"),
    pytest.param(lambda sd: {"model": sd, "step": torch.tensor(3)}, id="model-beside-a-step-tensor"),
    pytest.param(lambda sd: {"module": sd, "lr": torch.tensor(1e-4)}, id="deepspeed-module"),
])
def test_torch_file_nesting_the_state_dict_beside_other_tensors_reads_the_nested_one(tmp_path, reference, wrap):
    torch.save(wrap(BASE), tmp_path / "base.pt")
    report = analyze_update(tmp_path / "base.pt", TUNED, progress=False, null_models="all")
    assert report.summary == reference.summary


def test_safetensors_file_without_its_suffix_is_read(tmp_path, reference):
    save_file(BASE, str(tmp_path / "base.weights"))
    report = analyze_update(tmp_path / "base.weights", TUNED, progress=False, null_models="all")
    assert report.summary == reference.summary


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.uint16, id="U16"),
    pytest.param(torch.uint32, id="U32-packed-quantized-weights"),
    pytest.param(torch.uint64, id="U64"),
    pytest.param(torch.float8_e8m0fnu, id="F8_E8M0-mx-scales"),
])
def test_safetensors_tensors_of_other_torch_dtypes_are_skipped_not_refused(tmp_path, reference, dtype):
    """Unsigned and E8M0 tensors (quantized checkpoints) are skipped as non-float/8-bit tensors, as the docs say of
    integer and 8-bit ones; the file was refused as holding a dtype "which torch cannot hold"."""
    extra = torch.arange(1, 9).to(dtype)
    save_file({**BASE, "model.layers.0.mlp.up_proj.qzeros": extra}, str(tmp_path / "base.safetensors"))
    save_file({**TUNED, "model.layers.0.mlp.up_proj.qzeros": extra}, str(tmp_path / "tuned.safetensors"))
    report = analyze_update(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", progress=False,
                            null_models="all")
    assert report.summary == reference.summary
    assert report.skipped["model.layers.0.mlp.up_proj.qzeros"].startswith("not a 16/32/64-bit floating-point")


def test_parameters_that_require_grad_are_analysed(reference):
    """`dict(model.named_parameters())` holds leaves that require grad: the analysis must not build a graph."""
    params = {k: torch.nn.Parameter(v.clone()) for k, v in BASE.items()}
    report = analyze_update(params, TUNED, progress=False, null_models="all")
    assert report.summary == reference.summary
    assert all(p.grad is None for p in params.values())


def test_unchanged_pair_says_so_and_plots_without_warnings(tmp_path, capsys):
    save_file(BASE, str(tmp_path / "base.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "No artists with labels" legend warnings, no NaN
        rc = cli_main(["analyze", str(tmp_path / "base.safetensors"), str(tmp_path / "base.safetensors"), "--out",
                       str(tmp_path / "r"), "--quiet", "--null-models", "all"])
    assert rc == 0
    assert "! no coordinate changed" in capsys.readouterr().out
    assert "no coordinate changed" in (tmp_path / "r" / "report.md").read_text()
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["summary"]["density_exact"] == 0.0 and report["summary"]["energy"] == 0.0
    assert report["findings"] == []
    assert all((tmp_path / "r" / f).stat().st_size > 0 for f in ("sparsity_by_layer.png", "singular_energy.png",
                                                                  "enrichment_by_magnitude.png", "density_by_kind.png"))


def test_report_md_does_not_call_an_fp32_rounding_null_bf16():
    report = analyze_update(BASE, TUNED, progress=False, null_models="all")
    assert report.tensors["model.layers.0.mlp.up_proj.weight"]["null"]["rounding"]["dtype"] == "float32"
    assert "bf16" not in report.markdown()


def _numpy_reference(base: torch.Tensor, tuned: torch.Tensor, cfg: AnalysisConfig) -> dict:
    """The metric definitions of docs/analysis.md, in numpy float64."""
    b = base.double().numpy()
    b = b.reshape(b.shape[0], -1) if b.ndim >= 2 else b.reshape(-1, 1)
    d = tuned.double().numpy().reshape(b.shape) - b
    ad = np.abs(d).ravel()
    ints = {2: torch.int16, 4: torch.int32}[base.element_size()]
    changed = (base.view(ints) != tuned.view(ints)).numpy().ravel()
    rms = math.sqrt(float(np.mean(b ** 2)))
    e = np.sort(ad ** 2)[::-1]
    out = {"density_exact": changed.mean(), "density_atol": {f"{a:g}": (ad > a).mean() for a in cfg.atols},
           "frac_below_tau_rms": {f"{t:g}": (ad < t * rms).mean() for t in cfg.taus},
           "energy_top": {f"{f * 100:g}%": e[: math.ceil(f * ad.size)].sum() / e.sum() for f in cfg.energy_fracs}}
    if b.shape[1] >= 2:
        s = np.linalg.svd(d, compute_uv=False)
        q = s / s.sum()
        u, _, vt = np.linalg.svd(b, full_matrices=False)
        ks = {f"{f * 100:g}%": max(1, math.ceil(f * min(b.shape))) for f in cfg.subspace_fracs}
        out.update({"numerical_rank": {f"{t:g}": int((s > t * s[0]).sum()) for t in cfg.rank_tols},
                    "stable_rank": (s ** 2).sum() / s[0] ** 2, "effective_rank": math.exp(-(q * np.log(q)).sum()),
                    "subspace_energy": {p: np.linalg.norm(u[:, :k].T @ d @ vt[:k].T) ** 2 / (s ** 2).sum()
                                        for p, k in ks.items()}})
    return out


@pytest.mark.parametrize("shape,dtype", [pytest.param((41, 23), torch.float32, id="41x23-fp32"),
                                         pytest.param((19, 43), torch.bfloat16, id="19x43-bf16-wide"),
                                         pytest.param((3, 7, 5), torch.float16, id="3x7x5-fp16-as-3x35"),
                                         pytest.param((101,), torch.float32, id="101-fp32-1d")])
def test_metrics_match_numpy_float64(shape, dtype):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    step = 1e-2 * torch.randn(shape, generator=g, dtype=torch.float64) * (torch.rand(shape, generator=g) < 0.3)
    base, tuned = base.to(dtype), (base + step).to(dtype)
    cfg = AnalysisConfig(chunk_elems=61)
    view = base.reshape(shape[0], -1) if len(shape) == 3 else base  # 3-D: the [B, m, n] stack, checked elementwise
    ours, _ = analyze_tensor("x.weight", base, tuned, cfg)
    ref = _numpy_reference(view, tuned.reshape(view.shape), cfg)
    for key, want in ref.items():
        if len(shape) == 3 and key in ("numerical_rank", "stable_rank", "effective_rank", "subspace_energy"):
            continue
        got = ours[key]
        if isinstance(want, dict):
            assert got.keys() == want.keys(), key
            for k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-5 if key == "subspace_energy" else 1e-9), (key, k)
        else:
            assert got == pytest.approx(want, rel=1e-9), key


def test_null_models_are_seeded_and_the_shuffle_keeps_density_and_energy():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(37, 29, generator=g).bfloat16()
    tuned = (base.float() + 0.05 * torch.randn(37, 29, generator=g) * (torch.rand(37, 29, generator=g) < 0.2))
    tuned = tuned.bfloat16()
    runs = [analyze_tensor("x.weight", base, tuned, AnalysisConfig(seed=s), null_models=True) for s in (0, 0, 1)]
    (a, sa), (b, sb), (c, _) = runs
    assert a["null"] == b["null"] and all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert a["null"]["shuffled"] != c["null"]["shuffled"]
    shuf = a["null"]["shuffled"]
    assert shuf["method"] == "permutation"
    assert shuf["density_exact"] == a["density_exact"]  # the same values at random coordinates: same density
    assert shuf["energy"] == pytest.approx(a["energy"], rel=1e-12)
    assert a["null"]["rounding"]["energy_ratio"] == pytest.approx(1.0, abs=0.05)


def test_hf_folder_without_tied_head_against_bare_names_with_a_cloned_head(tmp_path):
    """save_pretrained's "model."-named folder (tied head left out) against a bare model's state dict (fastopd's
    Transformer: no "model.", the tied head saved as a clone): one prefix apart, and the head is the embedding."""
    (tmp_path / "base").mkdir()
    save_file(BASE, str(tmp_path / "base" / "model.safetensors"))
    tuned = _rename(TUNED, lambda k: k.removeprefix("model."))
    tuned["lm_head.weight"] = tuned["embed_tokens.weight"].clone()
    report = analyze_update(tmp_path / "base", tuned, progress=False, null_models="none")
    assert sorted(report.tensors) == sorted(BASE) and not report.mismatches
    assert report.skipped == {"lm_head.weight": "tied to model.embed_tokens.weight (only in TUNED: BASE leaves the "
                                                "tied copy out)"}


@pytest.mark.parametrize("ext", [pytest.param("safetensors", id="safetensors-shards"),
                                 pytest.param("bin", id="pytorch-bin-shards")])
def test_folder_with_a_shard_missing_and_no_index_is_refused(tmp_path, ext):
    """A save that stopped part-way (the index is written last) must not pass for a smaller model."""
    names = sorted(BASE)
    for i, part in enumerate((names[:2], names[2:3], names[3:]), start=1):
        if i == 2:
            continue
        shard = {k: BASE[k] for k in part}
        stem = "model" if ext == "safetensors" else "pytorch_model"
        path = tmp_path / f"{stem}-{i:05d}-of-00003.{ext}"
        save_file(shard, str(path)) if ext == "safetensors" else torch.save(shard, path)
    with pytest.raises(CheckpointError, match=r"has 2 of the 3 shards .* and no index: missing "
                                              rf"(pytorch_)?model-00002-of-00003\.{ext}"):
        analyze_update(tmp_path, TUNED, progress=False)


@pytest.mark.parametrize("dtype", [pytest.param("bf16", id="string-not-a-dtype"),
                                   pytest.param(torch.int32, id="integer-dtype"),
                                   pytest.param(torch.float8_e4m3fn, id="fp8-not-a-storage-dtype")])
def test_python_dtype_that_is_not_a_storage_dtype_is_refused_before_reading(dtype):
    from fastopd.analysis import AnalysisInputError

    with pytest.raises(AnalysisInputError, match=r"dtype must be None or one of torch.bfloat16, .*got"):
        analyze_update("/nonexistent/base", "/nonexistent/tuned", dtype=dtype, progress=False)


@pytest.mark.parametrize("constant", [pytest.param("norms-at-one", id="norm-weights-all-one"),
                                      pytest.param("zero-biases", id="zero-initialised-biases")])
def test_plots_of_a_kind_whose_base_magnitudes_are_all_equal_warn_nothing(tmp_path, constant):
    """A freshly initialised norm (all 1.0) or a zero bias has every coordinate in one |base| decile: the others are
    undefined for every tensor of that kind, which must not make numpy warn about an all-NaN median."""
    base = {k: v.clone() for k, v in BASE.items()}  # its model.norm.weight is all 1.0
    if constant == "zero-biases":  # varied norms; the only attention-output tensor is a zero bias
        base["model.norm.weight"] = 1 + 0.1 * torch.randn(6, generator=torch.Generator().manual_seed(3))
        base["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(7)
    tuned = _tuned(base)
    report = analyze_update(base, tuned, progress=False, null_models="all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = report.write(tmp_path, plots=True)
    assert tmp_path / "enrichment_by_magnitude.png" in written


@pytest.mark.parametrize("case", [pytest.param("index-json", id="weight-index-json-passed-as-a-file"),
                                  pytest.param("config-json", id="config-json-passed-as-a-file"),
                                  pytest.param("latest-pointer", id="fastopd-latest-pointer-passed-as-a-file"),
                                  pytest.param("text", id="plain-text-file")])
def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path, capsys, case):
    """Not torch's unpickler error (which advises weights_only=False for a JSON file): what the file is, and the
    folder to pass where there is one."""
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(BASE, str(folder / "model.safetensors"))
    if case == "index-json":
        path, says = folder / "model.safetensors.index.json", rf"weight index.*pass the folder .*{folder}"
        path.write_text(json.dumps({"metadata": {}, "weight_map": {k: "model.safetensors" for k in BASE}}))
    elif case == "config-json":
        path, says = folder / "config.json", r"a JSON file"
        path.write_text(json.dumps({"model_type": "llama"}, indent=2))
    elif case == "latest-pointer":
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "step_00000007").mkdir()
        path = tmp_path / "checkpoints" / "latest"
        path.write_text("step_00000007\n")
        says = rf"names the folder {tmp_path / 'checkpoints' / 'step_00000007'}.*pass that folder"
    else:
        path, says = tmp_path / "notes.txt", r"a text file \('trained for 3 epochs'"
        path.write_text("trained for 3 epochs\nlr 1e-5\n")
    with pytest.raises(CheckpointError, match=says) as e:
        open_checkpoint(path)
    assert str(path) in str(e.value) and "weights_only" not in str(e.value)
    assert cli_main(["analyze", str(path), str(folder), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "weights_only" not in err


@pytest.mark.parametrize("layout,passed,says", [
    pytest.param("fastopd-run", "checkpoints", r"step_00000002, step_00000004 hold model weights: pass one",
                 id="fastopd-checkpoints-folder"),
    pytest.param("fastopd-run", ".", r"its subfolder final_student holds model weights: pass it",
                 id="fastopd-run-folder"),
    pytest.param("hf-trainer", ".", r"checkpoint-10, checkpoint-20 hold model weights: pass one",
                 id="hf-trainer-output-dir"),
])
def test_folder_whose_subfolders_hold_the_weights_names_them(tmp_path, layout, passed, says):
    """A training run's output folder (fastopd distill's run folder or its checkpoints/, a Trainer's output_dir)
    holds the weights one level down: the error names those subfolders."""
    if layout == "fastopd-run":
        for sub in ("checkpoints/step_00000002", "checkpoints/step_00000004", "final_student"):
            (tmp_path / sub).mkdir(parents=True)
            save_file(BASE, str(tmp_path / sub / "model.safetensors"))
        (tmp_path / "checkpoints" / "latest").write_text("step_00000004\n")
        (tmp_path / "logs").mkdir()
    else:
        for sub in ("checkpoint-10", "checkpoint-20"):
            (tmp_path / sub).mkdir()
            save_file(BASE, str(tmp_path / sub / "model.safetensors"))
        (tmp_path / "runs").mkdir()
    with pytest.raises(CheckpointError, match=r"folder holds no model weights.*" + says):
        open_checkpoint(tmp_path / passed)
