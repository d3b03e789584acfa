"""analyze_update end to end: aggregation, null-model findings, checkpoint formats, errors, CLI, masks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastopd.analysis import (
    AnalysisConfig,
    AnalysisInputError,
    CheckpointError,
    MismatchError,
    analyze_update,
    open_checkpoint,
    select_null_tensors,
)
from fastopd.cli import main as cli_main


def _llama(seed: int, layers: int = 2, hidden: int = 64, inter: int = 160, vocab: int = 97,
           dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + 0.05 * torch.randn(hidden, generator=g)
        sd[p + "self_attn.q_proj.weight"] = torch.randn(hidden, hidden, generator=g) * 0.02
        sd[p + "self_attn.k_proj.weight"] = torch.randn(hidden // 4, hidden, generator=g) * 0.02
        sd[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden, generator=g) * 0.02
        sd[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=g) * 0.02
    return {k: v.to(dtype) for k, v in sd.items()}


def _bump(sd: dict, which, seed: int = 1, scale: float = 0.01) -> dict:
    """Add a dense random step (large enough to change every bf16 value it touches) to the chosen tensors."""
    g = torch.Generator().manual_seed(seed)
    return {k: ((v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) if which(k) else v.clone())
            for k, v in sd.items()}


def test_update_only_in_ffn_gives_ffn_share_one():
    base = _llama(0)
    tuned = _bump(base, lambda n: ".mlp." in n)
    r = analyze_update(base, tuned, null_models="none", progress=False)
    assert r.summary["ffn_share_updated"] == 1.0
    assert r.summary["ffn_share_energy"] == 1.0
    ffn_numel = sum(v.numel() for k, v in base.items() if ".mlp." in k)
    assert r.summary["ffn_share_params"] == pytest.approx(ffn_numel / sum(v.numel() for v in base.values()))
    assert r.by_kind["attn_q"]["density_exact"] == 0.0 and r.by_kind["embed"]["changed"] == 0
    assert r.by_kind["ffn_up"]["share_updated"] + r.by_kind["ffn_down"]["share_updated"] == pytest.approx(1.0)
    assert set(r.by_layer) == {"0", "1", "none"}
    ffn_heavy = next(f for f in r.findings if f["id"] == "ffn_heavy") if r.findings else None
    assert ffn_heavy is None  # no null models ran: no finding claims to have survived one


def _rounded_low_rank_pair(scale: float):
    base = {k: v for k, v in _llama(0).items() if v.dim() == 2 and "embed" not in k}
    g = torch.Generator().manual_seed(4)
    tuned = {}
    for k, v in base.items():
        m, n = v.shape
        u = torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g) * (scale / math.sqrt(2))
        tuned[k] = (v.float() + u).bfloat16()
    return base, tuned


def test_bf16_rounding_of_a_tiny_dense_low_rank_update_is_flagged_by_the_null_model():
    base, tuned = _rounded_low_rank_pair(1e-5)
    r = analyze_update(base, tuned, null_models="all", progress=False)
    f = {x["id"]: x for x in r.findings}
    # the artefacts: looks sparse, full-rank and near-zero-heavy although the update is dense and rank 2 ...
    assert f["coordinate_sparse"]["holds"] and f["coordinate_sparse"]["observed"] < 0.3
    assert f["full_rank"]["holds"]
    assert f["near_zero_heavy"]["holds"] and f["near_zero_heavy"]["observed"] > 3
    # ... and the bf16-rounding null reproduces each of them, so none survives it
    for key in ("coordinate_sparse", "full_rank", "near_zero_heavy"):
        assert f[key]["survives_rounding"] is False, key
        assert f[key]["verdict"] == "holds, but is explained by a null model"
    # the shuffled null keeps the values but scatters them: enrichment ~1, spectrum flat
    assert 0.7 < f["near_zero_heavy"]["null_shuffled"] < 1.4
    assert f["spectrally_concentrated"]["survives_shuffled"] is True
    # report text states it
    assert "explained by a null model" in r.markdown()


def test_genuinely_sparse_update_survives_the_rounding_null():
    base = {k: v for k, v in _llama(0).items() if v.dim() == 2}
    g = torch.Generator().manual_seed(9)
    tuned = {k: torch.where(torch.rand(v.shape, generator=g) < 0.02,
                            (v.float() + 0.01 * torch.randn(v.shape, generator=g)).bfloat16(), v)
             for k, v in base.items()}
    r = analyze_update(base, tuned, null_models="all", progress=False)
    f = {x["id"]: x for x in r.findings}
    assert f["coordinate_sparse"]["holds"] and f["coordinate_sparse"]["survives_rounding"] is True
    assert f["coordinate_sparse"]["null_rounding"] > 0.5
    assert not f["near_zero_heavy"]["holds"]


def test_select_null_tensors_samples_first_middle_last_per_kind():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(7)] + ["model.embed_tokens.weight"]
    chosen = select_null_tensors(names, "sample")
    assert chosen == {"model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight",
                      "model.layers.6.mlp.up_proj.weight", "model.embed_tokens.weight"}
    assert select_null_tensors(names, "none") == set() and select_null_tensors(names, "all") == set(names)
    numels = {n: 1000 for n in names} | {"model.embed_tokens.weight": 2**26 + 1}
    assert "model.embed_tokens.weight" not in select_null_tensors(names, "sample", numels)


@pytest.mark.parametrize("changed_layers,dtype", [
    pytest.param((2,), None, id="only-layer-2-of-7-changed"),
    pytest.param((1, 4), None, id="layers-1-and-4-of-7-changed"),
    pytest.param((5,), torch.bfloat16, id="layer-5-changed-after-casting-to-bf16"),
])
def test_null_sample_is_drawn_among_the_tensors_that_changed(changed_layers, dtype):
    """An update confined to a few layers (partial fine-tuning) must not get its null models only on the unchanged
    first/middle/last layers, which have none: the findings would all vanish without a word."""
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(23, 17, generator=g) for i in range(7)}
    tuned = {k: v.clone() for k, v in base.items()}
    for i in changed_layers:
        tuned[f"model.layers.{i}.mlp.up_proj.weight"] += 0.05 * torch.randn(23, 17, generator=g)
    if dtype is not None:  # a change below bf16 resolution on layer 0: unchanged in the storage dtype analysed
        tuned["model.layers.0.mlp.up_proj.weight"] = base["model.layers.0.mlp.up_proj.weight"].bfloat16().float()
        base["model.layers.0.mlp.up_proj.weight"] = tuned["model.layers.0.mlp.up_proj.weight"] * (1 + 2.0 ** -20)
        assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"], tuned["model.layers.0.mlp.up_proj.weight"])
    r = analyze_update(base, tuned, dtype=dtype, progress=False)
    with_null = {n for n, t in r.tensors.items() if t.get("null")}
    assert with_null == {f"model.layers.{i}.mlp.up_proj.weight" for i in changed_layers}
    assert r.summary["null_tensors"] == len(changed_layers)
    assert {f["id"] for f in r.findings} >= {"coordinate_sparse", "full_rank", "ffn_heavy"}


def test_no_null_models_says_why_there_are_no_findings(tmp_path, capsys):
    base = _llama(0, layers=1)
    tuned = _bump(base, lambda n: "mlp" in n)
    r = analyze_update(base, tuned, null_models="none", progress=False)
    assert r.findings == []
    assert "no null models" in r.markdown()
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    assert cli_main(["analyze", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--out",
                     str(tmp_path / "o"), "--quiet", "--no-plots", "--null-models", "none"]) == 0
    assert "no null models" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ formats and errors
def _write_formats(tmp_path, sd: dict, tag: str) -> dict:
    """The same state dict as a single safetensors file, a sharded HF folder with index, and a torch file."""
    single = tmp_path / f"{tag}.safetensors"
    save_file(sd, str(single))
    folder = tmp_path / f"{tag}_hf"
    folder.mkdir()
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(folder / fname))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    pt = tmp_path / f"{tag}.bin"
    torch.save(sd, pt)
    return {"single": single, "hf": folder, "torch": pt, "memory": sd}


def test_all_checkpoint_formats_give_the_same_report(tmp_path):
    base = _llama(0, layers=1)
    tuned = _bump(base, lambda n: "q_proj" in n or "up_proj" in n)
    fb, ft = _write_formats(tmp_path, base, "base"), _write_formats(tmp_path, tuned, "tuned")
    reports = {k: analyze_update(fb[k], ft[k], null_models="none", progress=False) for k in fb}
    ref = reports["memory"]
    for k, r in reports.items():
        assert r.summary == ref.summary, k
        for name, t in ref.tensors.items():
            for key in ("density_exact", "energy", "numerical_rank", "energy_top", "enrichment_small"):
                assert r.tensors[name][key] == t[key], (k, name, key)


def _hf_folder(folder, sd: dict, layout: str) -> None:
    """A model folder as transformers/Trainer write it, with the non-weight files beside the weights."""
    import argparse

    folder.mkdir()
    names = sorted(sd)
    if layout == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    elif layout == "bin-sharded":
        shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        for fname, keys in shards.items():
            torch.save({k: sd[k] for k in keys}, folder / fname)
        (folder / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    else:
        save_file(sd, str(folder / "model.safetensors"))
        save_file({"base_model.lora_A.weight": torch.zeros(2, 2)}, str(folder / "adapter_model.safetensors"))
    torch.save(argparse.Namespace(learning_rate=1e-5), folder / "training_args.bin")  # not weights_only-loadable
    torch.save({"state": {}, "param_groups": [{"lr": 1e-5}]}, folder / "optimizer.pt")
    torch.save({"python": 1}, folder / "rng_state.pth")


@pytest.mark.parametrize("layout", [pytest.param("bin", id="pytorch_model.bin"),
                                    pytest.param("bin-sharded", id="bin-shards-with-index"),
                                    pytest.param("safetensors", id="model.safetensors-beside-adapter")])
def test_model_folder_reads_only_the_model_weights(tmp_path, layout):
    base = _llama(0, layers=1)
    tuned = _bump(base, lambda n: "up_proj" in n)
    _hf_folder(tmp_path / "base", base, layout)
    _hf_folder(tmp_path / "tuned", tuned, layout)
    ckpt = open_checkpoint(tmp_path / "tuned")
    assert set(ckpt.names()) == set(tuned)
    for n in tuned:
        assert torch.equal(ckpt.load(n), tuned[n]), n
    r = analyze_update(tmp_path / "base", tmp_path / "tuned", null_models="none", progress=False)
    assert r.summary == analyze_update(base, tuned, null_models="none", progress=False).summary


def test_folder_without_model_weights_names_what_it_holds(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(folder / "weights.safetensors"))
    with pytest.raises(CheckpointError, match=r"no model weights.*weights\.safetensors.*pass a file"):
        open_checkpoint(folder)
    assert open_checkpoint(folder / "weights.safetensors").names() == ["w"]


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_safetensors_tensors_are_memory_mapped(tmp_path):
    sd = {"a": torch.randn(30, 20), "w": torch.randn(300, 200)}
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    t = open_checkpoint(path).load("w")
    torch.testing.assert_close(t, sd["w"], rtol=0, atol=0)
    ptr = t.data_ptr()
    spans = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(str(path)):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            spans.append((lo, hi))
    # the tensor's bytes live in a mapping of the checkpoint file, not in a heap copy
    assert any(lo <= ptr < hi for lo, hi in spans), spans
    del t
    assert not any(line.rstrip().endswith(str(path)) for line in open("/proc/self/maps"))  # unmapped when dropped


def test_mismatched_names_and_shapes_are_listed(tmp_path):
    base = _llama(0, layers=1)
    tuned = _bump(base, lambda n: "up_proj" in n)
    tuned["model.layers.0.extra.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    del tuned["model.layers.0.self_attn.k_proj.weight"]
    tuned["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 63, dtype=torch.bfloat16)
    with pytest.raises(MismatchError) as e:
        analyze_update(base, tuned, progress=False)
    msg = str(e.value)
    assert "only in BASE (1)" in msg and "model.layers.0.self_attn.k_proj.weight" in msg
    assert "only in TUNED (1)" in msg and "model.layers.0.extra.weight" in msg
    assert "model.layers.0.self_attn.q_proj.weight: [64, 64] vs [64, 63]" in msg
    assert "--allow-partial" in msg
    r = analyze_update(base, tuned, allow_partial=True, null_models="none", progress=False)
    assert set(r.tensors) == set(base) - {"model.layers.0.self_attn.k_proj.weight",
                                          "model.layers.0.self_attn.q_proj.weight"}
    assert r.mismatches == {"only_in_base": ["model.layers.0.self_attn.k_proj.weight"],
                            "only_in_tuned": ["model.layers.0.extra.weight"],
                            "shape_differs": ["model.layers.0.self_attn.q_proj.weight"]}
    # CLI: exit code 2, message on stderr, and --allow-partial goes through
    fb, ft = tmp_path / "b.safetensors", tmp_path / "t.safetensors"
    save_file(base, str(fb))
    save_file(tuned, str(ft))
    assert cli_main(["analyze", str(fb), str(ft), "--out", str(tmp_path / "o"), "--quiet", "--no-plots"]) == 2
    assert cli_main(["analyze", str(fb), str(ft), "--out", str(tmp_path / "o"), "--quiet", "--no-plots",
                     "--allow-partial", "--null-models", "none"]) == 0
    assert json.loads((tmp_path / "o" / "report.json").read_text())["mismatches"]["only_in_tuned"] == [
        "model.layers.0.extra.weight"]


def test_nonfinite_delta_is_reported_and_the_other_tensors_are_analysed(tmp_path, capsys):
    base = _llama(0, layers=1, dtype=torch.float32)
    tuned = _bump(base, lambda n: "mlp" in n or "q_proj" in n)
    up, down = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"
    tuned[up][3, 5] = float("inf")   # a diverged weight
    base[down][1, 2] = float("nan")  # a NaN weight the run left alone
    tuned[down][1, 2] = float("nan")
    fb, ft = tmp_path / "b.safetensors", tmp_path / "t.safetensors"
    save_file(base, str(fb))
    save_file(tuned, str(ft))
    out = tmp_path / "o"
    assert cli_main(["analyze", str(fb), str(ft), "--out", str(out), "--quiet", "--no-plots",
                     "--null-models", "all"]) == 0
    printed = capsys.readouterr().out
    assert "non-finite values" in printed and "1 changed coordinates with a NaN/Inf Delta" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["summary"]["nonfinite_delta"] == 1 and rep["summary"]["nonfinite_base"] == 1
    assert rep["summary"]["nonfinite_tensors"] == sorted([up, down])
    assert rep["tensors"][up]["nonfinite_delta"] == 1 and rep["tensors"][down]["nonfinite_base"] == 1
    assert rep["tensors"][up]["numerical_rank"] is not None and rep["tensors"][down]["null"] is not None
    assert "non-finite values" in (out / "report.md").read_text()
    # the tensors without NaN/Inf get exactly the metrics they get on their own
    q = "model.layers.0.self_attn.q_proj.weight"
    alone = analyze_update({q: base[q]}, {q: tuned[q]}, null_models="all", progress=False).tensors[q]
    for key in ("energy", "numerical_rank", "topk_energy", "energy_top", "null"):
        assert rep["tensors"][q][key] == json.loads(json.dumps(alone[key])), key


@pytest.mark.parametrize("sd,extra,says", [
    pytest.param({"lm_head.weight": torch.ones(4, 4)}, ["--include", "nomatch"],
                 "1 filtered by include/exclude", id="include-matches-nothing"),
    pytest.param({"lm_head.weight": torch.ones(4, 4)}, ["--include", "("],
                 "include (--include) '(' is not a valid regular expression", id="invalid-include-regex"),
    pytest.param({"lm_head.weight": torch.ones(4, 4)}, ["--exclude", "[a-"],
                 "exclude (--exclude) '[a-' is not a valid regular expression", id="invalid-exclude-regex"),
    pytest.param({"ids": torch.arange(5), "step": torch.tensor(3)}, [],
                 "2 not a 16/32/64-bit floating-point tensor", id="integer-tensors-only"),
])
def test_cli_input_errors_exit_2_with_an_error_line(tmp_path, capsys, sd, extra, says):
    fb, ft = tmp_path / "b.safetensors", tmp_path / "t.safetensors"
    save_file(sd, str(fb))
    save_file({k: v + 1 for k, v in sd.items()}, str(ft))
    rc = cli_main(["analyze", str(fb), str(ft), "--out", str(tmp_path / "o"), "--quiet", "--no-plots", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("fastopd analyze: error: ") and says in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def _pair(tmp_path):
    """A small BASE/TUNED pair of safetensors files in tmp_path."""
    fb, ft = tmp_path / "b.safetensors", tmp_path / "t.safetensors"
    save_file({"lm_head.weight": torch.ones(4, 4)}, str(fb))
    save_file({"lm_head.weight": torch.full((4, 4), 2.0)}, str(ft))
    return fb, ft


def _no_analysis(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the analysis ran despite an invalid option")
    monkeypatch.setattr("fastopd.analysis.cli.analyze_update", refuse)


def _tree(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("extra,option", [
    pytest.param(["--atol", "-1"], "--atol", id="atol-negative"),
    pytest.param(["--atol", "1e-6", "nan"], "--atol", id="atol-nan"),
    pytest.param(["--atol", "inf"], "--atol", id="atol-inf"),
    pytest.param(["--tau", "0"], "--tau", id="tau-zero"),
    pytest.param(["--tau", "-0.001"], "--tau", id="tau-negative"),
    pytest.param(["--tau", "nan"], "--tau", id="tau-nan"),
    pytest.param(["--tau", "-1e-3"], "--tau -0.001: relative", id="tau-negative-exponent-is-a-value-not-an-option"),
    pytest.param(["--atol", "1e-6", "-inf"], "--atol -inf:", id="atol-minus-inf-is-a-value"),
    pytest.param(["--mask-atol", "-1"], "--mask-atol", id="mask-atol-negative"),
    pytest.param(["--mask-atol", "nan"], "--mask-atol", id="mask-atol-nan"),
    pytest.param(["--threads", "0"], "--threads", id="threads-zero"),
    pytest.param(["--threads", "-2"], "--threads", id="threads-negative"),
    pytest.param(["--seed", str(10 ** 14)], "--seed", id="seed-beyond-generator-range"),
])
def test_cli_invalid_option_values_exit_2_before_the_analysis(tmp_path, capsys, monkeypatch, extra, option):
    fb, ft = _pair(tmp_path)
    _no_analysis(monkeypatch)
    threads = torch.get_num_threads()
    before = _tree(tmp_path)
    rc = cli_main(["analyze", str(fb), str(ft), "--out", str(tmp_path / "o"), "--quiet", "--no-plots",
                   "--mask-out", str(tmp_path / "m" / "m.safetensors"), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"fastopd analyze: error: {option} ") and err.count("\n") == 1 and "Traceback" not in err
    assert _tree(tmp_path) == before and torch.get_num_threads() == threads


def _bad_output(tmp_path, case: str) -> tuple[list[str], str]:
    """(--out/--mask-out arguments, the option the error must name) for one unwritable-output case."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    (tmp_path / "adir").mkdir()
    ok_out, ok_mask = str(tmp_path / "new" / "o"), str(tmp_path / "new" / "m" / "m.safetensors")
    if case.endswith("proc") and not Path("/proc").is_dir():
        pytest.skip("no /proc")
    if case == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no mkfifo")
        os.mkfifo(tmp_path / "fifo")
    return {
        "mask-in-proc": (["--out", ok_out, "--mask-out", "/proc/nope/m.safetensors"], "--mask-out"),
        "mask-is-folder": (["--out", ok_out, "--mask-out", str(tmp_path / "adir")], "--mask-out"),
        "mask-under-file": (["--out", ok_out, "--mask-out", str(afile / "m.safetensors")], "--mask-out"),
        "mask-is-base": (["--out", ok_out, "--mask-out", str(tmp_path / "b.safetensors")], "--mask-out"),
        "fifo": (["--out", ok_out, "--mask-out", str(tmp_path / "fifo")], "--mask-out"),
        "out-is-file": (["--out", str(afile), "--mask-out", ok_mask], "--out"),
        "out-in-proc": (["--out", "/proc/x", "--mask-out", ok_mask], "--out"),
        "out-under-file": (["--out", str(afile / "o"), "--mask-out", ok_mask], "--out"),
    }[case]


@pytest.mark.parametrize("case", [
    pytest.param("mask-in-proc", id="mask-out-under-proc"),
    pytest.param("mask-is-folder", id="mask-out-is-an-existing-folder"),
    pytest.param("mask-under-file", id="mask-out-under-a-regular-file"),
    pytest.param("mask-is-base", id="mask-out-is-the-base-checkpoint"),
    pytest.param("fifo", id="mask-out-is-not-a-regular-file"),
    pytest.param("out-is-file", id="out-is-an-existing-regular-file"),
    pytest.param("out-in-proc", id="out-under-proc"),
    pytest.param("out-under-file", id="out-under-a-regular-file"),
])
def test_cli_unwritable_outputs_exit_2_before_the_analysis_and_write_nothing(tmp_path, capsys, monkeypatch, case):
    fb, ft = _pair(tmp_path)
    outputs, option = _bad_output(tmp_path, case)
    _no_analysis(monkeypatch)
    before = _tree(tmp_path)
    base_bytes = fb.read_bytes()
    rc = cli_main(["analyze", str(fb), str(ft), "--quiet", "--no-plots", *outputs])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"fastopd analyze: error: {option}: ") and err.count("\n") == 1 and "Traceback" not in err
    assert _tree(tmp_path) == before  # the other output's folder, made for its check, is removed again
    assert fb.read_bytes() == base_bytes


def test_cli_removes_the_output_folders_it_made_when_the_analysis_fails(tmp_path, capsys):
    fb, ft = _pair(tmp_path)
    before = _tree(tmp_path)
    rc = cli_main(["analyze", str(fb), str(ft), "--out", str(tmp_path / "new" / "o"), "--quiet", "--no-plots",
                   "--mask-out", str(tmp_path / "new" / "m" / "m.safetensors"), "--include", "nomatch"])
    assert rc == 2 and "filtered by include/exclude" in capsys.readouterr().err
    assert _tree(tmp_path) == before


def test_cli_accepts_zero_tolerances_and_the_seed_limit(tmp_path):
    fb, ft = _pair(tmp_path)
    out, mask = tmp_path / "o", tmp_path / "o" / "m.safetensors"
    rc = cli_main(["analyze", str(fb), str(ft), "--out", str(out), "--quiet", "--no-plots", "--atol", "0",
                   "--mask-atol", "0", "--mask-out", str(mask), "--null-models", "all", "--seed", str(-(2 ** 43 - 1))])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["tensors"]["lm_head.weight"]["density_atol"] == {"0": 1.0}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".fastopd-write-probe-")]


def test_cli_report_write_failure_is_an_error_line(tmp_path, capsys, monkeypatch):
    fb, ft = _pair(tmp_path)

    def fail(self, out_dir, plots=True):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("fastopd.analysis.report.UpdateReport.write", fail)
    rc = cli_main(["analyze", str(fb), str(ft), "--out", str(tmp_path / "o"), "--quiet", "--no-plots"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("fastopd analyze: error: --out: ") and "No space left" in err


def test_invalid_regex_is_reported_before_any_checkpoint_is_read(tmp_path):
    with pytest.raises(AnalysisInputError, match="exclude"):
        analyze_update(tmp_path / "missing", tmp_path / "missing", exclude="*.bias", progress=False)


def test_dtype_mismatch_needs_dtype_option():
    base = {"w": torch.randn(8, 8)}
    tuned = {"w": (base["w"] + 1).bfloat16()}
    with pytest.raises(MismatchError, match="--dtype"):
        analyze_update(base, tuned, progress=False)
    r = analyze_update(base, tuned, dtype=torch.bfloat16, null_models="none", progress=False)
    assert r.tensors["w"]["storage_dtype"] == "bfloat16"


@pytest.mark.parametrize("cut", [pytest.param(100, id="cut-data"), pytest.param(None, id="cut-header")])
def test_truncated_safetensors_names_the_file(tmp_path, cut, capsys):
    sd = _llama(0, layers=1)
    good = tmp_path / "good.safetensors"
    save_file(sd, str(good))
    raw = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(raw[:-cut] if cut else raw[:20])
    with pytest.raises(CheckpointError, match=str(bad).replace(".", r"\.")) as e:
        analyze_update(good, bad, progress=False)
    assert "truncated" in str(e.value)
    assert cli_main(["analyze", str(good), str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert str(bad) in capsys.readouterr().err


def test_unreadable_files_name_the_file(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="junk.bin"):
        open_checkpoint(junk)
    pt = tmp_path / "sd.pt"
    torch.save({"w": torch.randn(64, 64)}, pt)
    (tmp_path / "cut.pt").write_bytes(pt.read_bytes()[:-500])
    with pytest.raises(CheckpointError, match="cut.pt"):
        open_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "missing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="empty_dir"):
        open_checkpoint(tmp_path / "empty_dir")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        open_checkpoint(folder)


# ------------------------------------------------------------------------------------------ CLI, report, mask
DESIGN_TENSOR_KEYS = {"module_kind", "layer", "numel", "density_exact", "density_atol", "energy_top", "numerical_rank",
                      "stable_rank", "effective_rank", "topk_energy", "enrichment_small"}


def test_cli_writes_report_plots_and_mask(tmp_path):
    base = _llama(0)
    tuned = _bump(base, lambda n: "mlp" in n or "q_proj" in n, scale=0.003)
    fb, ft = tmp_path / "base", tmp_path / "tuned.safetensors"
    fb.mkdir()
    save_file(base, str(fb / "model.safetensors"))
    save_file(tuned, str(ft))
    out, masks = tmp_path / "out", tmp_path / "m" / "masks.safetensors"
    rc = cli_main(["analyze", str(fb), str(ft), "--out", str(out), "--mask-out", str(masks), "--quiet",
                   "--atol", "1e-6", "1e-3", "--null-models", "sample"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["tensors"]) == set(base)
    for name, t in rep["tensors"].items():
        assert DESIGN_TENSOR_KEYS <= set(t), name
        assert set(t["density_atol"]) == {"1e-06", "0.001"}
    assert {"density_exact", "ffn_share_updated", "ffn_share_energy"} <= set(rep["summary"])
    assert rep["summary"]["null_tensors"] > 0 and rep["findings"]
    md = (out / "report.md").read_text()
    assert "## Findings and null models" in md and "## By module kind" in md
    for png in ("sparsity_by_layer", "density_by_kind", "singular_energy", "enrichment_by_magnitude"):
        data = (out / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with safe_open(str(out / "spectra.safetensors"), "pt") as f:
        assert "model.layers.1.mlp.up_proj.weight/delta" in f.keys()
    # mask: bool per parameter, the parameter's shape, True exactly where the stored value changed
    with safe_open(str(masks), "pt") as f:
        assert f.metadata()["format"] == "fastopd.masks.v1"
        assert set(f.keys()) == set(base)
        for name in base:
            m = f.get_tensor(name)
            assert m.dtype == torch.bool and m.shape == base[name].shape
            assert torch.equal(m, base[name].view(torch.int16) != tuned[name].view(torch.int16))
    assert not masks.with_name(masks.name + ".partial").exists()


def test_report_json_is_strict_json_with_null_for_nonfinite_numbers(tmp_path):
    import numpy as np

    base = {"w": torch.randn(8, 6)}
    r = analyze_update(base, {"w": base["w"] + 1e-3}, null_models="none", progress=False)
    r.tensors["w"]["stable_rank"] = float("nan")            # statistics that came out NaN/Inf
    r.tensors["w"]["topk_energy"]["1"] = np.float64("inf")
    r.summary["energy"] = float("-inf")
    r.write(tmp_path, plots=False)

    def reject(token):
        raise ValueError(f"not strict JSON: {token}")

    rep = json.loads((tmp_path / "report.json").read_text(), parse_constant=reject)
    assert rep["tensors"]["w"]["stable_rank"] is None and rep["tensors"]["w"]["topk_energy"]["1"] is None
    assert rep["summary"]["energy"] is None
    assert rep["tensors"]["w"]["energy"] == r.tensors["w"]["energy"]  # finite numbers unchanged


@pytest.mark.parametrize("fails", [pytest.param("markdown", id="report-md"), pytest.param("plots", id="png")])
def test_report_write_interrupted_leaves_the_earlier_files_whole(tmp_path, monkeypatch, fails):
    base = {"w": torch.randn(12, 10)}
    r = analyze_update(base, {"w": base["w"] + 1e-3}, null_models="none", progress=False)
    r.write(tmp_path, plots=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {"report.json", "report.md", "spectra.safetensors", "singular_energy.png"} <= set(before)

    def cut(*args, **kwargs):  # a full disk half-way through the file
        raise OSError(28, "No space left on device")
    if fails == "markdown":
        monkeypatch.setattr(type(r), "markdown", lambda self: "# partial" + "x" * 10_000)
        monkeypatch.setattr("pathlib.Path.write_text", lambda self, text: (self.open("w").write(text[:9]), cut()))
    else:
        import matplotlib.figure

        def half_png(self, fname, **kwargs):
            Path(fname).write_bytes(b"\x89PNG\r\n")
            cut()
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_png)
    with pytest.raises(OSError, match="No space"):
        r.write(tmp_path, plots=True)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no truncated file, no leftover temporary


@pytest.mark.parametrize("second", [pytest.param("no-plots", id="rerun-with-no-plots"),
                                    pytest.param("no-spectra", id="rerun-of-a-pair-without-2d-tensors")])
def test_report_write_into_an_earlier_runs_folder_leaves_none_of_its_files(tmp_path, second):
    """A second analysis written into the same --out (its default is one fixed folder) must not leave the first
    one's plots or spectra beside its report, where they would pass for the new pair's."""
    base = {"w": torch.randn(12, 10), "b": torch.randn(7)}
    first = analyze_update(base, {k: v + 1e-3 for k, v in base.items()}, null_models="none", progress=False)
    first.write(tmp_path, plots=True)
    assert {"spectra.safetensors", "singular_energy.png"} <= {p.name for p in tmp_path.iterdir()}
    (tmp_path / "notes.txt").write_text("mine")  # a file the report does not own stays
    if second == "no-plots":
        again = analyze_update(base, {k: v - 1e-3 for k, v in base.items()}, null_models="none", progress=False)
        written = again.write(tmp_path, plots=False)
    else:
        again = analyze_update({"b": base["b"]}, {"b": base["b"] + 1e-3}, null_models="none", progress=False)
        written = again.write(tmp_path, plots=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in written] + ["notes.txt"])


def test_mask_is_readable_by_optim_masks(tmp_path):
    optim_masks = pytest.importorskip("fastopd.optim.masks", reason="fastopd.optim (issue 5) not installed here")
    base = _llama(0, layers=1)
    tuned = _bump(base, lambda n: "up_proj" in n)
    path = tmp_path / "masks.safetensors"
    analyze_update(base, tuned, null_models="none", mask_out=path, progress=False)
    loaded = optim_masks.load(str(path))
    assert set(loaded) == set(base)
    up = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(loaded[up].reshape(base[up].shape), base[up] != tuned[up])
    kinds = optim_masks.load_metadata(str(path))["kinds"]  # the mask files' names, as masks.save writes them
    assert kinds == {n: optim_masks.module_kind(n) for n in base} and kinds["model.embed_tokens.weight"] == "embedding"


def test_mask_atol_and_streaming_with_small_chunks(tmp_path):
    base = {"a": torch.zeros(37, 11), "b": torch.zeros(5)}
    tuned = {"a": torch.linspace(-1e-3, 1e-3, 37 * 11).view(37, 11), "b": torch.tensor([0, 1e-5, 2e-3, 0, 0.0])}
    path = tmp_path / "m.safetensors"
    analyze_update(base, tuned, config=AnalysisConfig(chunk_elems=13, mask_atol=5e-4), null_models="none",
                   mask_out=path, progress=False)
    with safe_open(str(path), "pt") as f:
        for k in base:
            assert torch.equal(f.get_tensor(k), (tuned[k] - base[k]).abs() > 5e-4), k


def _tied_step_checkpoints():
    """fastopd step-checkpoint state dicts (tied lm_head.weight saved as a clone) of a tiny tied Transformer,
    before and after a sparse update, and the model."""
    models = pytest.importorskip("fastopd.models")
    from fastopd.models.config import TransformerConfig
    from fastopd.train.checkpoint import _plain_state_dict

    torch.manual_seed(0)
    model = models.Transformer(TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                                                 num_heads=4, tie_word_embeddings=True))
    base = {k: v.clone() for k, v in _plain_state_dict(model.state_dict()).items()}  # not views of the parameters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2 * (torch.rand_like(p) < 0.1))
    return base, {k: v.clone() for k, v in _plain_state_dict(model.state_dict()).items()}, model


def test_tied_lm_head_is_analysed_once_and_left_out_of_the_mask(tmp_path):
    from fastopd.optim import SparseMaskedAdamW
    from fastopd.optim import masks as optim_masks

    base, tuned, model = _tied_step_checkpoints()
    assert "lm_head.weight" in tuned and torch.equal(tuned["lm_head.weight"], tuned["embed_tokens.weight"])
    path = tmp_path / "m.safetensors"
    r = analyze_update(base, tuned, null_models="none", mask_out=path, progress=False)
    assert r.skipped["lm_head.weight"] == "tied to embed_tokens.weight"
    assert "lm_head.weight" not in r.tensors and "lm_head" not in r.by_kind
    assert r.summary["numel"] == sum(p.numel() for p in model.parameters())
    loaded = optim_masks.load(str(path))
    assert "lm_head.weight" not in loaded
    SparseMaskedAdamW(model.named_parameters(), masks=loaded)  # every mask names a parameter it optimizes


def test_tied_lm_head_read_from_hf_named_safetensors_folders_is_analysed_once(tmp_path):
    """Safetensors lists keys sorted, and "lm_head.weight" sorts before "model.embed_tokens.weight": the tie must not
    depend on which of the two is read first."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    emb, up = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    base = {"model.embed_tokens.weight": emb.clone(), "lm_head.weight": emb.clone(),
            "model.layers.0.mlp.up_proj.weight": up.clone()}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["model.embed_tokens.weight"][0, :4] += 0.1
    tuned["lm_head.weight"] = tuned["model.embed_tokens.weight"].clone()
    tuned["model.layers.0.mlp.up_proj.weight"][1, 1] += 0.1
    for name, sd in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
    r = analyze_update(str(tmp_path / "base"), str(tmp_path / "tuned"), null_models="none", progress=False)
    assert r.skipped.get("lm_head.weight") == "tied to model.embed_tokens.weight"
    assert "lm_head.weight" not in r.tensors and "model.embed_tokens.weight" in r.tensors


def test_tied_lm_head_is_analysed_when_include_leaves_its_embedding_out(tmp_path):
    """`--include lm_head` on a tied model: the head stands for the one parameter the filter left out, and its mask
    carries the embedding's name (the optimizer holds the tied parameter under it)."""
    from fastopd.optim import SparseMaskedAdamW
    from fastopd.optim import masks as optim_masks

    base, tuned, model = _tied_step_checkpoints()
    path = tmp_path / "m.safetensors"
    r = analyze_update(base, tuned, null_models="none", include="lm_head", mask_out=path, progress=False)
    assert list(r.tensors) == ["lm_head.weight"] and "lm_head.weight" not in r.skipped
    assert r.skipped["embed_tokens.weight"] == "filtered by include/exclude"
    loaded = optim_masks.load(str(path))
    assert list(loaded) == ["embed_tokens.weight"]
    assert torch.equal(loaded["embed_tokens.weight"], tuned["lm_head.weight"] != base["lm_head.weight"])
    SparseMaskedAdamW(model.named_parameters(), masks=loaded)
    r = analyze_update(base, tuned, null_models="none", exclude="embed", progress=False)  # the same by exclusion
    assert "lm_head.weight" in r.tensors


def test_base_without_the_tied_lm_head_matches_a_step_checkpoint(tmp_path):
    base, tuned, _ = _tied_step_checkpoints()
    del base["lm_head.weight"]  # save_pretrained leaves the tied copy out
    r = analyze_update(base, tuned, null_models="none", progress=False)
    assert r.skipped["lm_head.weight"].startswith("tied to embed_tokens.weight (only in TUNED")
    assert not r.mismatches
    r = analyze_update(tuned, base, null_models="none", progress=False)  # and the other way round
    assert r.skipped["lm_head.weight"].startswith("tied to embed_tokens.weight (only in BASE")


def test_lm_head_that_is_not_tied_is_analysed(tmp_path):
    base, tuned, _ = _tied_step_checkpoints()
    tuned["lm_head.weight"] = tuned["lm_head.weight"].clone()
    tuned["lm_head.weight"][0, 0] += 1.0  # equal to the embedding in BASE only: trained separately
    r = analyze_update(base, tuned, null_models="none", progress=False)
    assert "lm_head.weight" in r.tensors and "lm_head.weight" not in r.skipped
    only_tuned = {k: v for k, v in tuned.items() if k != "lm_head.weight"}
    base.pop("lm_head.weight")
    tuned["lm_head.weight"] = tuned["lm_head.weight"] * 2  # only in TUNED and not its embedding: a mismatch
    with pytest.raises(MismatchError, match="only in TUNED"):
        analyze_update(base, tuned, null_models="none", progress=False)
    assert analyze_update(base, only_tuned, null_models="none", progress=False).summary["tensors"] == len(base)


def test_config_saying_untied_keeps_equal_lm_head_and_embedding(tmp_path):
    base, tuned, _ = _tied_step_checkpoints()
    for name, sd in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
    (tmp_path / "tuned" / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    r = analyze_update(tmp_path / "base", tmp_path / "tuned", null_models="none", progress=False)
    assert "lm_head.weight" in r.tensors
    (tmp_path / "tuned" / "config.json").write_text(json.dumps({"text_config": {"tie_word_embeddings": True}}))
    r = analyze_update(tmp_path / "base", tmp_path / "tuned", null_models="none", progress=False)
    assert r.skipped["lm_head.weight"] == "tied to embed_tokens.weight"


def test_coordinate_sparse_verdict_follows_the_summary_not_the_null_sample(monkeypatch):
    """Sample mode leaves big tensors (embeddings) out of the null models; the verdict still covers them."""
    import fastopd.analysis.analyze as analyze_mod

    monkeypatch.setattr(analyze_mod, "SAMPLE_MAX_NUMEL", 4096)  # the embedding below is "big"
    g = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(400, 16, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(32, 16, generator=g)}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["model.embed_tokens.weight"] += 0.1  # dense
    tuned["model.layers.0.mlp.up_proj.weight"][0, 0] += 0.1
    tuned["model.layers.0.self_attn.q_proj.weight"][0, 0] += 0.1
    r = analyze_update(base, tuned, null_models="sample", progress=False)
    assert not r.tensors["model.embed_tokens.weight"].get("null")
    f = next(f for f in r.findings if f["id"] == "coordinate_sparse")
    assert r.summary["density_exact"] > 0.5 and f["observed"] == r.summary["density_exact"]
    assert f["observed_on_null_tensors"] < 0.01
    assert f["holds"] is False and f["verdict"] == "does not hold"


def test_config_without_the_finding_keys_records_them_as_not_computed():
    base = _llama(0, layers=1)
    tuned = _bump(base, lambda n: "proj" in n)
    cfg = AnalysisConfig(rank_tols=(1e-6,), topk_fracs=(0.05,), small_fracs=(0.25,))
    r = analyze_update(base, tuned, config=cfg, null_models="all", progress=False)
    verdicts = {f["id"]: f["verdict"] for f in r.findings}
    assert verdicts["full_rank"] == "not computed: AnalysisConfig.rank_tols has no 0.0001"
    assert verdicts["spectrally_concentrated"] == "not computed: AnalysisConfig.topk_fracs has no 0.01"
    assert verdicts["near_zero_heavy"] == "not computed: AnalysisConfig.small_fracs has no 0.1"
    assert verdicts["coordinate_sparse"] != "not computed" and "ffn_heavy" in verdicts
    assert "not computed" in r.markdown()


def test_moe_expert_stack_is_left_out_of_the_spectral_findings():
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.experts.down_proj": torch.randn(4, 24, 40, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(24, 24, generator=g)}
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    r = analyze_update(base, tuned, null_models="all", progress=False)
    stack = r.tensors["model.layers.0.mlp.experts.down_proj"]
    assert stack["spectral_min_dim"] == 4 * 24 and stack["numerical_rank"]["0.0001"] == 4 * 24
    full_rank = next(f for f in r.findings if f["id"] == "full_rank")  # from the 2-D tensor alone
    assert full_rank["observed"] == r.tensors["model.layers.0.self_attn.q_proj.weight"]["numerical_rank"][
        "0.0001"] / 24
    assert "4/96" not in r.markdown() and "96/96" in r.markdown()


def test_hf_named_mask_is_matched_onto_fastopd_transformer_names(tmp_path):
    from fastopd.analysis import match_param_names
    from fastopd.optim import SparseMaskedAdamW
    from fastopd.optim import masks as optim_masks

    base, tuned, model = _tied_step_checkpoints()
    hf = lambda sd: {("" if k == "lm_head.weight" else "model.") + k: v for k, v in sd.items()}  # noqa: E731
    path = tmp_path / "m.safetensors"
    analyze_update(hf(base), hf(tuned), null_models="none", mask_out=path, progress=False)
    loaded = optim_masks.load(str(path))
    assert "model.embed_tokens.weight" in loaded and "lm_head.weight" not in loaded  # tied: left out
    matched = match_param_names(loaded, model)
    assert set(matched) == {n for n, _ in model.named_parameters()} - {"lm_head.weight"}
    assert torch.equal(matched["layers.0.mlp.up_proj.weight"], loaded["model.layers.0.mlp.up_proj.weight"])
    SparseMaskedAdamW(model.named_parameters(), masks=matched)
    # an untied head keeps its name while the rest loses the prefix; and the reverse direction adds it
    untied = {**loaded, "lm_head.weight": loaded["model.embed_tokens.weight"]}
    untied_params = [n for n, _ in model.named_parameters()] + ["lm_head.weight"]
    assert set(match_param_names(untied, untied_params)) == set(untied_params)
    assert set(match_param_names(matched, list(loaded))) == set(loaded)


@pytest.mark.parametrize("mask_names,params,says", [
    pytest.param(["a.x.weight", "b.y.weight"], ["x.weight", "y.weight"], "no single prefix",
                 id="two-different-prefixes"),
    pytest.param(["a.b.x"], ["b.x", "x"], "2 prefixes would do, ambiguous", id="ambiguous-prefix"),
    pytest.param(["model.x", "x"], ["x"], "same parameters", id="renamed-onto-an-existing-mask"),
])
def test_mask_names_that_do_not_map_by_one_prefix_are_refused(mask_names, params, says):
    from fastopd.analysis import match_param_names

    with pytest.raises(ValueError, match=says):
        match_param_names({n: torch.ones(1, dtype=torch.bool) for n in mask_names}, params)
