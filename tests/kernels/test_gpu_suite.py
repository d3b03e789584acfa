"""The GPU suite's CPU-checkable parts: bench/gpu_suite.sh parses (bash -n), answers --help, picks the CUDA
toolkit from fake layouts and packs its outputs; the benchmark harness runs end to end on the CPU (--dry-run)
writing JSON and Markdown with every field the GPU run reports, orders its shapes, bounds its repetitions, and
judges the targets from a synthetic result; the rollout benchmark writes its results as it goes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fastopd import _dispatch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_suite_script_parses_and_documents_itself():
    script = ROOT / "bench" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--dry-run" in out.stdout and "--print-cuda-home" in out.stdout
    bad = subprocess.run(["bash", str(script), "--no-such-option"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2


def test_benchmark_harness_dry_run(tmp_path):
    env = dict(os.environ, FASTOPD_COMMIT="0123abcd")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--dry-run", "--divergences", "fkl",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_bench_dry_run.json").read_text())
    assert result["dry_run"] is True and "date_utc" in result["machine"]
    assert result["machine"]["commit"] == "0123abcd"
    by = {r["provider"]: r for r in result["results"]}
    assert by["gemm_floor"]["status"] == "ok" and by["chunked-cpu"]["status"] == "ok"
    # The references run first within a shape (a shape cut short keeps them), tiled (the slowest) last.
    order = [r["provider"] for r in result["results"]]
    assert order[:2] == ["gemm_floor", "liger"] and order[-1] == ("tiled" if "tiled" in order else "naive")
    if _dispatch.available("divergence_chunk", "triton", "cpu") is None:  # TRITON_INTERPRET=1, a working interpreter
        assert by["tiled"]["status"] == "ok", by["tiled"]
    for rec in result["results"]:
        if rec["status"] != "ok":
            continue
        for phase in ("fwd", "bwd", "full"):
            assert {"median_ms", "p20_ms", "p80_ms", "reps"} <= set(rec[phase])
            assert rec[phase]["reps"] >= result["config"]["min_reps"] and not rec[phase].get("capped")
            assert rec["tflops"][phase] > 0
        assert rec["ratio_to_gemm_floor"] > 0 and "capped" not in rec
        assert {"peak_bytes_above_inputs", "peak_fwd_bytes_above_inputs", "first_calls_s"} <= set(rec)
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


def test_shape_order_interleaves_the_vocabularies_at_the_extremes_of_n():
    bench = _load_bench()
    args = bench.parse_args(["--tokens", "1024", "2048", "4096", "8192", "--vocab", "128256", "151936",
                             "--divergences", "fkl", "jsd"])
    order = bench.shape_order(args)
    assert order[:2] == [("fkl", 128256, 8192), ("fkl", 151936, 8192)]
    assert order[:8] == [(d, v, n) for n in (8192, 1024) for d in ("fkl", "jsd") for v in (128256, 151936)]
    assert [n for _, _, n in order[8:]] == [4096] * 4 + [2048] * 4
    assert sorted(order) == sorted((d, v, n) for d in ("fkl", "jsd") for v in (128256, 151936)
                                   for n in (1024, 2048, 4096, 8192))
    assert bench.PROVIDERS[:2] == ("gemm_floor", "liger")
    one = bench.parse_args(["--tokens", "8192", "--vocab", "151936", "--divergences", "jsd"])
    assert bench.shape_order(one) == [("jsd", 151936, 8192)]


def test_timer_takes_at_least_min_reps_unless_the_cap_says_otherwise():
    bench = _load_bench()
    timer = bench.Timer("cpu", min_reps=10, max_reps=100, target_s=0.3)
    assert timer.reps_for(0.033, 60.0) == 10  # N = 8192: a 33 ms floor still gets 10 timed calls
    assert timer.reps_for(0.001, 60.0) == 100  # fast calls: as many as fill target_s, at most max_reps
    assert timer.reps_for(0.010, 60.0) == 30
    assert timer.reps_for(1.0, 4.5) == 4  # a slow provider within its cap: fewer, recorded as capped
    out = timer(lambda: None, budget_s=-1.0)
    assert out["reps"] == 0 and out["capped"] and "median_ms" not in out
    out = timer(lambda: sum(range(1000)), budget_s=10.0)
    assert 10 <= out["reps"] <= 100 and out["p20_ms"] <= out["median_ms"] <= out["p80_ms"] and "capped" not in out


def _row(provider, full_ms, peak_mib, n=8192, v=151936, **extra):
    phase = {"median_ms": full_ms, "p20_ms": full_ms * 0.99, "p80_ms": full_ms * 1.01, "reps": 10}
    rec = {"divergence": "jsd", "V": v, "N": n, "Ds": 2048, "Dt": 4096, "dtype": "bfloat16", "provider": provider,
           "status": "ok", "fwd": dict(phase), "bwd": dict(phase), "full": dict(phase),
           "tflops": {"full": 100.0}, "peak_bytes_above_inputs": int(peak_mib * 2**20)}
    rec.update(extra)
    return rec


def test_table_ratios_and_targets_from_a_synthetic_result():
    bench = _load_bench()
    rows = [_row("gemm_floor", 10.0, 100), _row("liger", 30.0, 1000), _row("chunked-triton", 12.0, 500),
            _row("chunked-cuda", 14.0, 1200), _row("tiled", 50.0, 50), _row("naive", 40.0, 10000),
            # another shape: Liger unavailable, the floor row missing its fwd+bwd time, tiled capped
            _row("gemm_floor", 5.0, 50, n=1024), dict(_row("liger", 0, 0, n=1024), status="unavailable: no liger"),
            _row("chunked-triton", 6.0, 200, n=1024), _row("naive", 8.0, 1000, n=1024),
            _row("tiled", 20.0, 5, n=1024, capped=["full", "fwd"])]
    rows[-1]["full"].update(reps=3, capped=True)
    rows[-1]["fwd"] = {"reps": 0, "warmup_ms": 20.0, "capped": True}
    rows[6]["full"] = {"reps": 0, "capped": True}
    bench.annotate(rows)
    by = {(r["provider"], r["N"]): r for r in rows}
    ct, cc, tl = by["chunked-triton", 8192], by["chunked-cuda", 8192], by["tiled", 8192]
    assert abs(ct["ratio_to_gemm_floor"] - 1.2) < 1e-9 and abs(ct["speedup_vs_liger"] - 2.5) < 1e-9
    assert abs(ct["memory_vs_liger"] - 0.5) < 1e-9 and abs(ct["memory_vs_naive"] - 0.05) < 1e-9
    assert ct["targets"] == {"floor_1.3x": True, "liger_1.5x_faster": True, "mem_le_liger": True}
    assert cc["targets"] == {"floor_1.3x": False, "liger_1.5x_faster": True, "mem_le_liger": False}
    assert tl["targets"] == {"tiled_mem_1pct_naive": True, "mem_le_liger": True}
    assert "targets" not in by["naive", 8192] and "targets" not in by["gemm_floor", 8192]
    # Nothing is judged against a reference that was not measured.
    small = by["chunked-triton", 1024]
    assert "ratio_to_gemm_floor" not in small and "speedup_vs_liger" not in small and "targets" not in small
    assert by["tiled", 1024]["targets"] == {"tiled_mem_1pct_naive": True}

    machine = {"date_utc": "2026-12-01T00:00:00+00:00", "commit": "0123abcd", "torch": "2.11.0", "cuda": "13.0",
               "triton": "3.6.0", "liger_kernel": "0.8.5", "fastopd": "0.1.0", "device": "cuda", "gpu": "NVIDIA H200"}
    md = bench.markdown({"machine": machine, "dry_run": False, "config": {"min_reps": 10}, "results": rows})
    assert "NVIDIA H200" in md and "commit 0123abcd" in md and "DRY RUN" not in md
    line = next(x for x in md.splitlines() if x.startswith("| jsd | 151936 | 8192 | chunked-cuda |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[9:13] == ["1.40x", "2.14x", "0.12", "1.20"]
    assert "floor_1.3x: NOT met" in cells[13] and "liger_1.5x_faster: met" in cells[13]
    assert "mem_le_liger: NOT met" in cells[13]
    tiled_small = next(x for x in md.splitlines() if x.startswith("| jsd | 151936 | 1024 | tiled |"))
    assert "capped (0 reps)" in tiled_small and "(capped, 3 reps)" in tiled_small
    assert "| chunked fwd+bwd <= 1.3x the GEMM floor | chunked-cuda | 0 of 1 shapes | 1 |" in md
    assert "| tiled peak memory < 1% of naive's | tiled | 2 of 2 shapes | 0 |" in md
    assert "unavailable: no liger" in md


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
    env["FASTOPD_COMMIT"] = "feedc0de"  # what a caller passes where .git does not travel
    env["TMPDIR"] = str(tmp_path)  # the suite's mktemp scratch folders land here, not in /tmp after every run
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--budget", "600"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["gpu_suite.log", "gpu_suite_results.tar.gz", "status.txt"]
    assert "no CUDA device" in (tmp_path / "out" / "status.txt").read_text()
    with tarfile.open(tmp_path / "out" / "gpu_suite_results.tar.gz") as tar:
        assert {"./environment.txt", "./gpu_suite.log", "./status.txt"} <= set(tar.getnames())

    status = (tmp_path / "out" / "status.txt").read_text()
    assert "commit: feedc0de (from FASTOPD_COMMIT)" in status and "capped: none" in status

    dry = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", "--budget", "0"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert dry.returncode == 0 and dry.stdout.count("skipped (") == 3, dry.stdout
    assert len(list(tmp_path.glob("fastopd_gpu_suite.*"))) == len(list(tmp_path.glob("fastopd_gpu_suite_dry.*"))) == 1
    bad = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--budget", "soon"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "whole seconds" in bad.stderr


def _fake_toolkit(root: Path, name: str, layout: str = "lib64", dryrun_top: bool = True) -> Path:
    """A fake CUDA toolkit: bin/nvcc (printing nvcc's `#$ TOP=` line on -dryrun, when asked) and libcudart.so in
    lib64/ or targets/x86_64-linux/lib/."""
    home = root / name
    (home / "bin").mkdir(parents=True)
    lib = home / ("lib64" if layout == "lib64" else "targets/x86_64-linux/lib")
    lib.mkdir(parents=True)
    (lib / "libcudart.so.13").write_text("")
    top = f'case " $* " in *" -dryrun "*) echo "#$ TOP={home}/bin/.." >&2 ;; esac\n' if dryrun_top else ""
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n" + top + "exit 0\n")
    nvcc.chmod(0o755)
    return home


def _nvcc_on_path(root: Path, target: Path, wrapper: bool) -> Path:
    """root/bin/nvcc: a wrapper script exec-ing `target` (as /usr/local/bin/nvcc is on some images) or a link."""
    (root / "bin").mkdir(parents=True, exist_ok=True)
    nvcc = root / "bin" / "nvcc"
    if wrapper:
        nvcc.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        nvcc.chmod(0o755)
    else:
        nvcc.symlink_to(target)
    return root / "bin"


def _pick(tmp_path: Path, path_dirs: list[Path], cuda_home: Path | None = None) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_HOME"}
    env["PATH"] = os.pathsep.join([str(d) for d in path_dirs] + ["/usr/bin", "/bin"])
    env["FASTOPD_CUDA_DEFAULT"] = str(tmp_path / "default-cuda")  # where /usr/local/cuda would be
    if cuda_home is not None:
        env["CUDA_HOME"] = str(cuda_home)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--print-cuda-home"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    home = next(x for x in proc.stdout.splitlines() if x.startswith("CUDA_HOME="))[len("CUDA_HOME="):]
    return home, next(x for x in proc.stdout.splitlines() if x.startswith("why: "))


needs_bash = pytest.mark.skipif(shutil.which("bash") is None or not Path("/usr/bin/readlink").exists(),
                                reason="needs bash and coreutils in /usr/bin")


@needs_bash
def test_cuda_home_from_a_wrapper_nvcc_is_the_toolkit_it_runs(tmp_path):
    """/usr/local/bin/nvcc as a script running /usr/local/cuda-13.0/bin/nvcc: two levels above the script is
    /usr/local, which holds no libcudart.so; nvcc's own TOP= line names the toolkit."""
    home = _fake_toolkit(tmp_path, "cuda-13.0")
    chosen, why = _pick(tmp_path, [_nvcc_on_path(tmp_path / "local", home / "bin" / "nvcc", wrapper=True)])
    assert chosen == str(home.resolve()) and "TOP=" in why
    assert str(tmp_path / "local") in why  # the rejected candidate is named


@needs_bash
def test_cuda_home_from_a_linked_nvcc(tmp_path):
    home = _fake_toolkit(tmp_path, "cuda-12.8", dryrun_top=False)
    chosen, why = _pick(tmp_path, [_nvcc_on_path(tmp_path / "local", home / "bin" / "nvcc", wrapper=False)])
    assert chosen == str(home.resolve()) and "two levels above nvcc" in why


@needs_bash
def test_cuda_home_set_and_valid_wins_set_and_invalid_is_passed_over(tmp_path):
    on_path = _fake_toolkit(tmp_path, "cuda-13.0")
    mine = _fake_toolkit(tmp_path, "my-cuda")
    path = [_nvcc_on_path(tmp_path / "local", on_path / "bin" / "nvcc", wrapper=True)]
    assert _pick(tmp_path, path, cuda_home=mine) == (str(mine), "why: CUDA_HOME as set, holds lib64 libcudart.so")
    default = _fake_toolkit(tmp_path, "default-cuda")  # the FASTOPD_CUDA_DEFAULT _pick sets
    chosen, why = _pick(tmp_path, path, cuda_home=tmp_path / "empty")
    assert chosen == str(default) and "the default toolkit" in why and str(tmp_path / "empty") in why


@needs_bash
def test_cuda_home_prefers_lib64_then_takes_targets_with_a_warning(tmp_path):
    home = _fake_toolkit(tmp_path, "cuda-t", layout="targets")
    chosen, why = _pick(tmp_path, [_nvcc_on_path(tmp_path / "local", home / "bin" / "nvcc", wrapper=True)])
    assert chosen == str(home.resolve()) and "expect no CUDA kernel" in why
    chosen, why = _pick(tmp_path, [])
    assert chosen == "" and "no CUDA toolkit" in why


def _load_rollout_bench():
    spec = importlib.util.spec_from_file_location("_fastopd_rollout_bench", ROOT / "bench" / "test_rollout_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rollout_results_are_written_after_every_measured_configuration(tmp_path):
    """The CUDA rollout benchmark records after every round (and every HF static run): a deadline kill keeps
    what was measured. Here, its recording function on synthetic times."""
    rb = _load_rollout_bench()
    info = dict(model="Qwen2 0.5B-scale", batch=8, prompt=128, new_tokens=256, kv_cache_bytes=1 << 20,
                cold_s={"fastopd-cudagraph": 3.0, "hf-dynamic": 6.0}, order="interleaved, then hf-static alone",
                greedy_token_match_vs_hf_dynamic={"fastopd-cudagraph": 1.0})
    hf = ("hf-dynamic", "hf-static")
    times = {"fastopd-cudagraph": [0.5], "hf-dynamic": [2.0], "fastopd": []}
    rb._record_throughput("cuda", times, 2048, hf, info, out_dir=str(tmp_path))
    first = json.loads((tmp_path / "rollout_cuda.json").read_text())["throughput"]["providers"]
    assert set(first) == {"fastopd-cudagraph", "hf-dynamic"} and first["fastopd-cudagraph"]["x_best_hf"] == 4.0
    times["fastopd"].append(1.0)
    times["hf-static"] = [0.25]
    rb._record_throughput("cuda", times, 2048, hf, info, out_dir=str(tmp_path))
    data = json.loads((tmp_path / "rollout_cuda.json").read_text())
    tp = data["throughput"]["providers"]
    assert set(tp) == {"fastopd-cudagraph", "hf-dynamic", "fastopd", "hf-static"}
    assert tp["fastopd-cudagraph"]["x_best_hf"] == 0.5 and tp["hf-static"]["tokens_per_s"] == 8192
    assert "commit" in data["machine"]
    md = (tmp_path / "rollout_cuda.md").read_text()
    assert "| hf-static | 8192 |" in md and "First call in s" in md
    assert not list(tmp_path.glob(".*.tmp"))


def _suite_lines(prefix: str) -> list[str]:
    return [x for x in (ROOT / "bench" / "gpu_suite.sh").read_text().splitlines() if x.startswith(prefix)]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_a_step_that_runs_past_its_cap_leaves_the_next_steps_share():
    """cap_after (what a step may take so that the later steps keep their shares) must leave room for a step that
    overruns its cap: `timeout -k` waits its grace before the KILL (a step stuck in a CUDA call ignores SIGTERM),
    and the suite packs its folder between steps. The rollout step once got exactly the time left minus the
    real-shape tests' 30 s, which is also that step's minimum: one second of overrun and the tests were skipped."""
    script = ROOT / "bench" / "gpu_suite.sh"
    text = script.read_text()
    defs = "\n".join(_suite_lines("KILL_GRACE=") + _suite_lines("STEP_SLACK=") + _suite_lines("SHAPES_SHARE="))
    func = text[text.index("cap_after() {"):]
    func = func[:func.index("\n}\n") + 3]
    grace = re.search(r"^KILL_GRACE=(\d+)", text, re.M) or re.search(r"timeout -k (\d+) ", text)
    grace = int(grace.group(1))
    need = int(subprocess.run(["bash", "-c", f"{defs}\necho $SHAPES_SHARE"], capture_output=True, text=True,
                              timeout=60).stdout)
    assert 'step "GPU tests at real shapes" "$SHAPES_SHARE" ' in text  # the share is also the step's minimum
    for left in (400, 250, 120):
        out = subprocess.run(["bash", "-c", f"{defs}\nleft() {{ echo {left}; }}\n{func}\ncap_after $SHAPES_SHARE"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        cap = int(out.stdout)
        pack = 2  # the tarball written after the step
        assert left - cap - grace - pack >= need, f"left {left}: cap {cap} leaves {left - cap - grace - pack} s"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="no bash or timeout")
def test_a_pytest_step_stopped_at_its_cap_still_reports_its_failures(tmp_path):
    """The suite's pytest command stopped by `timeout` (SIGTERM) still prints the failures so far and writes its
    JUnit XML: a plain `python -m pytest` dies on SIGTERM with one character per test in the log and no XML, so
    a real-shape test that failed before the cap would leave no reason in what comes back."""
    (tmp_path / "test_capped.py").write_text(
        "import time\n\ndef test_fails():\n    assert 1 == 2, 'the reason of a real failure'\n\n"
        "def test_passes():\n    pass\n\ndef test_runs_past_the_cap():\n    time.sleep(120)\n")
    lines = _suite_lines("PYTEST=")
    assert len(lines) == 1, lines
    xml = tmp_path / "out.xml"
    cmd = (f'PY={sys.executable}; {lines[0]}; cd {tmp_path}; '
           f'timeout -k 20 15 "${{PYTEST[@]}}" test_capped.py --junitxml={xml}')
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"})
    assert proc.returncode == 124, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "the reason of a real failure" in proc.stdout, proc.stdout[-2000:]
    assert xml.exists(), proc.stdout[-2000:]
    report = xml.read_text()
    assert 'failures="1"' in report and "the reason of a real failure" in report
