"""The `fastopd` command line: help, doctor, and a tiny bench run end to end."""

import json

import pytest

from fastopd import cli


def test_help_lists_subcommands(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    for name in ("bench", "doctor"):
        assert name in out


def test_doctor_reports_every_backend(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for row in ("torch", "torch reference", "C++ CPU kernel", "Triton", "Triton interpreter", "CUDA kernel",
                "auto backend on cpu", "vocab-parallel on cpu", "torch.distributed"):
        assert row in out
    assert "missing:" in out or "usable" in out


def test_bench_tiny_run_writes_results(tmp_path, capsys):
    rc = cli.main(["bench", "--tokens", "48", "--hidden", "16", "--vocab", "300", "--providers",
                   "fastopd,naive,gemm_floor", "--divergences", "jsd", "--repeats", "1", "--device", "cpu",
                   "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "loss_cpu_custom_float32.json").read_text())
    rows = {r["provider"]: r for r in result["results"]}
    assert set(rows) == {"fastopd", "naive", "gemm_floor"}
    assert rows["gemm_floor"]["ratio_to_gemm_floor"] == pytest.approx(1.0)
    # every provider computes the same loss
    assert rows["fastopd"]["loss_rel_diff_vs_naive"] < 1e-5
    assert "| jsd | fastopd |" in (tmp_path / "loss_cpu_custom_float32.md").read_text()
    assert "custom shapes" in capsys.readouterr().out


def test_bench_rejects_unknown_provider():
    with pytest.raises(SystemExit, match="unknown provider"):
        cli.main(["bench", "--providers", "fastest", "--out", "/nonexistent"])
