"""The GPU suite's CPU-checkable parts: bench/gpu_suite.sh parses (bash -n) and answers --help, and the benchmark
harness runs end to end on the CPU (--dry-run) writing JSON and Markdown with every field the GPU run reports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
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
