"""The GPU suite's CPU-checkable parts: bench/gpu_suite.sh parses (bash -n) and answers --help, and the benchmark
harness runs end to end on the CPU (--dry-run) writing JSON and Markdown with every field the GPU run reports."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_suite_script_parses_and_documents_itself():
    script = ROOT / "bench" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--dry-run" in out.stdout
    bad = subprocess.run(["bash", str(script), "--no-such-option"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2


def test_benchmark_harness_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--dry-run", "--divergences", "fkl",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_bench_dry_run.json").read_text())
    assert result["dry_run"] is True and "date_utc" in result["machine"]
    by = {r["provider"]: r for r in result["results"]}
    assert by["gemm_floor"]["status"] == "ok" and by["chunked-cpu"]["status"] == "ok"
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert by["tiled"]["status"] == "ok", by["tiled"]
    for rec in result["results"]:
        if rec["status"] != "ok":
            continue
        for phase in ("fwd", "bwd", "full"):
            assert {"median_ms", "p20_ms", "p80_ms"} <= set(rec[phase])
            assert rec["tflops"][phase] > 0
        assert rec["ratio_to_gemm_floor"] > 0
    # Every provider computing a loss agrees on its value (same inputs, same divergence).
    losses = [r["loss"] for r in result["results"] if r["status"] == "ok" and "loss" in r]
    assert len(losses) >= 2 and max(losses) - min(losses) <= 1e-4 * max(abs(x) for x in losses)
    md = (tmp_path / "gpu_bench_dry_run.md").read_text()
    assert "DRY RUN" in md and "| fkl |" in md


def _load_bench():
    spec = importlib.util.spec_from_file_location("_fastopd_gpu_bench", ROOT / "bench" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shape_order_puts_the_extremes_of_the_first_vocab_first():
    bench = _load_bench()
    args = bench.parse_args(["--tokens", "1024", "2048", "4096", "8192", "--vocab", "128256", "151936",
                             "--divergences", "fkl", "jsd"])
    order = bench.shape_order(args)
    assert order[:4] == [("fkl", 128256, 1024), ("fkl", 128256, 8192), ("jsd", 128256, 1024), ("jsd", 128256, 8192)]
    assert sorted(order) == sorted((d, v, n) for d in ("fkl", "jsd") for v in (128256, 151936)
                                   for n in (1024, 2048, 4096, 8192))


def test_time_budget_skips_shapes_and_every_row_is_written(tmp_path):
    """A budget of 0 s starts no shape; the files are still written (the harness writes after every row, so a
    run killed at the device's time limit keeps what it measured)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--dry-run", "--time-budget", "0",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_bench_dry_run.json").read_text())
    assert result["results"] and all(r["status"] == "skipped: time budget" for r in result["results"])
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="no bash or tar")
def test_suite_packs_its_outputs_for_the_device_tool(tmp_path):
    """With $OUT set (the device tool brings back at most 8 files) the suite packs its folder into one tarball
    beside the log and status.txt, also when it stops early; --budget skips steps that have too little time."""
    env = dict(os.environ)
    env["OUT"] = str(tmp_path / "out")
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU even where one exists: the suite must refuse and still pack
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--budget", "600"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["gpu_suite.log", "gpu_suite_results.tar.gz", "status.txt"]
    assert "no CUDA device" in (tmp_path / "out" / "status.txt").read_text()
    with tarfile.open(tmp_path / "out" / "gpu_suite_results.tar.gz") as tar:
        assert {"./environment.txt", "./gpu_suite.log", "./status.txt"} <= set(tar.getnames())

    dry = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", "--budget", "0"],
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and dry.stdout.count("skipped (") == 3, dry.stdout
    bad = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--budget", "soon"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "whole seconds" in bad.stderr
