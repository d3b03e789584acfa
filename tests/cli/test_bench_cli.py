"""`fastopd bench` measures what it says: providers timed round-robin, peak memory only where the high-water mark
was really reset, the backend and environment fastopd ran under recorded, and untrustworthy numbers flagged."""

import importlib.util
import json
import platform
import shlex
import sys
from pathlib import Path

import pytest
import torch

from fastopd import _dispatch, bench, cli

TINY = ["bench", "--tokens", "32", "--hidden", "8", "--vocab", "200", "--providers", "fastopd,naive,gemm_floor",
        "--divergences", "fkl", "--repeats", "2", "--device", "cpu"]
linux_only = pytest.mark.skipif(platform.system() != "Linux", reason="the CPU peak is read from /proc")
# Tiny shapes on a shared machine are noisy by nature; the flags themselves are tested on synthetic timings.
pytestmark = pytest.mark.filterwarnings("ignore::fastopd.bench.BenchWarning")


def _run_tiny(tmp_path, *extra):
    assert cli.main([*TINY, *extra, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "loss_cpu_custom_n32_d8_v200_float32.json").read_text())
    return result, (tmp_path / "loss_cpu_custom_n32_d8_v200_float32.md").read_text()


def test_providers_are_timed_round_robin(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "provider_step", lambda name, div, inputs: lambda: calls.append(name))
    monkeypatch.setattr(bench, "provider_loss", lambda name, div, inputs: 1.0)
    result = bench.run_benchmark(bench.Shape(8, 4, 4, 16), ["fkl"], ["fastopd", "naive", "gemm_floor"], "cpu",
                                 repeats=3, warmup=2, log=lambda line: None)
    f, n, g = "fastopd", "naive", "gemm_floor"
    timed = [f, n, g, n, g, f, g, f, n]  # one call of each per repeat, the first provider rotated
    assert calls == [f, n, g] + [f, n, g] + timed  # memory runs, one warm-up round, then the timed repeats
    assert result["order"]["fkl"] == timed
    assert all(len(r["times_s"]) == 3 for r in result["results"])


def test_round_robin_times_each_call_on_its_own():
    ticks = iter(range(100))
    steps = {"a": lambda: None, "b": lambda: None}
    times, order = bench.time_round_robin(steps, "cpu", repeats=2, clock=lambda: next(ticks))
    assert order == ["a", "b", "b", "a"]
    assert times == {"a": [1, 1], "b": [1, 1]}


def test_a_real_run_records_its_interleaved_order(tmp_path):
    result, _ = _run_tiny(tmp_path)
    assert result["order"]["fkl"] == ["fastopd", "naive", "gemm_floor", "naive", "gemm_floor", "fastopd"]
    assert "round-robin" in result["timing"]
    assert result["command"].startswith("fastopd bench --tokens 32 --hidden 8 --vocab 200")


@linux_only
@pytest.mark.parametrize("how", ["write-fails", "write-has-no-effect"])
def test_peak_is_unavailable_when_the_high_water_mark_is_not_reset(tmp_path, monkeypatch, how):
    if how == "write-fails":
        monkeypatch.setattr(bench, "CLEAR_REFS", str(tmp_path / "missing" / "clear_refs"))
    else:  # a plain file takes the write and resets nothing
        monkeypatch.setattr(bench, "CLEAR_REFS", str(tmp_path / "clear_refs"))
    bench.PeakMemory("cpu")  # lowers glibc's mmap threshold, so the block below goes back to the OS when freed
    big = torch.ones(64 * 2**20 // 4)  # raise the high-water mark well above what stays resident
    del big
    with pytest.warns(bench.BenchWarning, match="peak memory is unavailable") as record:
        result, md = _run_tiny(tmp_path / "out")
    assert sum("peak memory" in str(w.message) for w in record) == 1  # warned once, not per provider
    rows = [r for r in result["results"] if "median_s" in r]
    assert rows and all(r["peak_bytes_above_inputs"] is None and r["memory_vs_naive"] is None for r in rows)
    assert "| fkl | fastopd |" in md and md.count("| n/a |") == len(rows)


@linux_only
def test_peak_is_measured_when_the_reset_takes_effect():
    mem = bench.PeakMemory("cpu")
    if mem._reset_hwm() is not None:
        pytest.skip("this kernel does not let the process reset its VmHWM")
    mem.start()
    x = torch.ones(16 * 2**20 // 4)
    peak = mem.peak()
    del x
    assert mem.reset_ok and 15 * 2**20 <= peak < 64 * 2**20


def test_backend_and_environment_are_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTOPD_IMPL", "torch")
    monkeypatch.setenv("FASTOPD_CHUNK_BYTES", str(2**20))
    result, md = _run_tiny(tmp_path)
    m = result["machine"]
    assert m["fastopd_backend"] == "torch"
    assert m["env"]["FASTOPD_IMPL"] == "torch" and m["env"]["FASTOPD_CHUNK_BYTES"] == str(2**20)
    assert m["fastopd_chunk_rows"] == 640  # 1 MiB over two fp32 rows of V=200, rounded down to 16
    assert next(r for r in result["results"] if r["provider"] == "fastopd")["backend"] == "torch"
    assert "fastopd backend: torch (chunked, 640 rows per chunk); FASTOPD_IMPL=torch, FASTOPD_CHUNK_BYTES=1048576" in md


def test_default_backend_is_the_resolved_one(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTOPD_IMPL", raising=False)
    monkeypatch.delenv("FASTOPD_CHUNK_BYTES", raising=False)
    result, md = _run_tiny(tmp_path)
    want = _dispatch.resolve("divergence_chunk", "auto", "cpu")
    assert result["machine"]["fastopd_backend"] == want
    assert result["machine"]["env"]["FASTOPD_IMPL"] is None
    assert f"fastopd backend: {want} " in md and "FASTOPD_IMPL unset, FASTOPD_CHUNK_BYTES unset" in md
    assert "loss rel diff vs naive" in md


def _row(provider, times, loss_diff=0.0, peak=2**20):
    return dict(divergence="jsd", provider=provider, times_s=times, loss=1.0, loss_rel_diff_vs_naive=loss_diff,
                peak_bytes_above_inputs=peak)


def _result(rows, msgs, dtype="float32"):
    machine = dict(cpu="test cpu", cores=2, torch_threads=2, torch="x", fastopd_backend="cpu", env={})
    return dict(shape=dict(n=1, ds=1, dt=1, v=1, dtype=dtype), machine=machine, date="today", repeats=5,
                results=rows, warnings=msgs)


def test_a_ratio_below_the_floor_is_flagged():
    rows = [_row("fastopd", [0.9, 0.9, 0.9, 0.9, 0.9]), _row("naive", [2.0] * 5, peak=4 * 2**20),
            _row("gemm_floor", [1.0] * 5, loss_diff=None)]
    msgs = bench.summarize(rows, "float32")
    fast, naive, floor = rows
    assert fast["ratio_to_gemm_floor"] == pytest.approx(0.9) and fast["flags"] == ["below floor"]
    assert naive["flags"] == [] and floor["flags"] == [] and floor["ratio_to_gemm_floor"] == 1.0
    assert fast["memory_vs_naive"] == pytest.approx(0.25)
    assert len(msgs) == 1 and "jsd fastopd: 0.90x the GEMM floor" in msgs[0]
    md = bench.markdown_table(_result(rows, msgs), "synthetic")
    assert "| jsd | fastopd | 0.900 | 0.900 | 0.900 | 0.90 (!) |" in md
    assert "below floor |" in md and "Warnings:" in md


def test_wide_spread_and_loss_difference_are_flagged():
    rows = [_row("fastopd", [1.0, 1.0, 1.1, 1.5, 1.5]), _row("liger", [2.0] * 5, loss_diff=1.2e-2),
            _row("trl", [2.0] * 5, loss_diff=5e-3), _row("gemm_floor", [1.0] * 5, loss_diff=None)]
    msgs = bench.summarize(rows, "bfloat16")
    fast, liger, trl, _ = rows
    assert fast["flags"] == ["spread 45%"]  # p20 1.0, p80 1.5, median 1.1
    assert liger["flags"] == ["loss differs 1.2e-02"]
    assert trl["flags"] == []  # within the bf16 tolerance
    assert bench.summarize([_row("trl", [2.0] * 5, loss_diff=5e-3)], "float32")  # not within fp32's
    assert len(msgs) == 2


def test_no_flags_on_a_clean_run():
    rows = [_row("fastopd", [1.2] * 5), _row("gemm_floor", [1.0] * 5, loss_diff=None)]
    assert bench.summarize(rows, "float32") == [] and all(r["flags"] == [] for r in rows)
    assert "Warnings:" not in bench.markdown_table(_result(rows, []), "synthetic")


# ---------------------------------------------------------------------------------------------------------
# Bad input: one `fastopd bench: error:` line naming the flag, exit code 2, before any timing and any writing
# ---------------------------------------------------------------------------------------------------------

OK = ["bench", "--tokens", "8", "--hidden", "4", "--vocab", "16", "--divergences", "fkl", "--providers", "naive",
      "--repeats", "1", "--device", "cpu"]
BAD_INPUT = [
    pytest.param(["--tokens", "0"], "--tokens must be >= 2, got 0", id="tokens-zero-is-not-the-default"),
    pytest.param(["--tokens", "-4"], "--tokens must be >= 2, got -4", id="tokens-negative"),
    pytest.param(["--tokens", "1"], "--tokens must be >= 2", id="tokens-one-row-is-all-masked"),
    pytest.param(["--hidden", "0"], "--hidden must be >= 1, got 0", id="hidden-zero-is-not-the-default"),
    pytest.param(["--hidden", "-1"], "--hidden must be >= 1", id="hidden-negative"),
    pytest.param(["--vocab", "0"], "--vocab must be >= 2, got 0", id="vocab-zero-is-not-the-default"),
    pytest.param(["--vocab", "-3"], "--vocab must be >= 2, got -3", id="vocab-negative"),
    pytest.param(["--vocab", "1"], "--vocab must be >= 2", id="vocab-one-token-has-no-divergence"),
    pytest.param(["--repeats", "0"], "--repeats must be >= 1, got 0", id="repeats-zero"),
    pytest.param(["--repeats", "-2"], "--repeats must be >= 1", id="repeats-negative"),
    pytest.param(["--warmup", "-1"], "--warmup must be >= 1, got -1", id="warmup-negative"),
    pytest.param(["--warmup", "0"], "--warmup must be >= 1", id="warmup-zero-would-still-run-the-memory-call"),
    pytest.param(["--divergences", ""], "--divergences: no divergence given (choose from fkl, rkl, jsd)",
                 id="divergences-empty"),
    pytest.param(["--divergences", " , "], "--divergences: no divergence given", id="divergences-only-commas"),
    pytest.param(["--divergences", "fkl,kl"], "--divergences: unknown divergence 'kl' (choose from fkl, rkl, jsd)",
                 id="divergences-unknown"),
    pytest.param(["--divergences", "fkl,fkl"], "--divergences: 'fkl' given more than once",
                 id="divergences-duplicate"),
    pytest.param(["--providers", ""], "--providers: no provider given (choose from fastopd, naive, liger, trl, "
                 "gemm_floor)", id="providers-empty"),
    pytest.param(["--providers", "fastest"], "--providers: unknown provider 'fastest' (choose from fastopd",
                 id="providers-unknown"),
    pytest.param(["--providers", "naive,naive"], "--providers: 'naive' given more than once",
                 id="providers-duplicate"),
]


@pytest.fixture
def no_timing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("bad input reached the timing")

    monkeypatch.setattr(bench, "run_benchmark", fail)


def _rejected(capsys, argv, message):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed before the check: no run started
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastopd bench: error: ")
    assert message in lines[0]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUT)
def test_bad_flag_is_an_error_before_anything_runs(tmp_path, capsys, no_timing, extra, message):
    out = tmp_path / "out"
    _rejected(capsys, [*OK, *extra, "--out", str(out)], message)
    assert not out.exists()  # not even the folder


def test_cuda_without_a_visible_device_is_an_error(tmp_path, capsys, no_timing, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    _rejected(capsys, [*OK, "--device", "cuda", "--out", str(out)], "--device cuda: no CUDA device is visible")
    assert not out.exists()


@pytest.mark.parametrize("env", [pytest.param({"FASTOPD_IMPL": "bogus"}, id="FASTOPD_IMPL-unknown"),
                                 pytest.param({"FASTOPD_CHUNK_BYTES": "0"}, id="FASTOPD_CHUNK_BYTES-zero")])
def test_bad_fastopd_environment_is_an_error_before_anything_runs(tmp_path, capsys, no_timing, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    _rejected(capsys, [*OK, "--providers", "fastopd,naive", "--out", str(out)], f"provider fastopd: {k}")
    assert not out.exists()


@pytest.mark.parametrize(("providers", "message"), [
    pytest.param("fastopd,naive", "--providers naive: at N=1000000 V=1000000 it needs about", id="naive-too-big"),
    pytest.param("fastopd,trl", "(17 fp32 [N, V] tensors), more than the", id="trl-jsd-too-big"),
])
def test_a_provider_that_cannot_fit_in_memory_is_an_error(tmp_path, capsys, no_timing, providers, message):
    out = tmp_path / "out"
    _rejected(capsys, ["bench", "--tokens", "1000000", "--vocab", "1000000", "--hidden", "4", "--divergences",
                       "fkl,jsd", "--providers", providers, "--device", "cpu", "--out", str(out)], message)
    assert not out.exists()


def test_the_full_run_fits_in_8_gib_but_trl_jsd_does_not(monkeypatch):
    monkeypatch.setattr(bench, "_memory_available", lambda device: (8 * 2**30, "MemAvailable"))
    shape = bench.Shape(n=4096, ds=512, dt=512, v=32768)  # one fp32 [N, V] tensor is 0.5 GiB
    bench._check_fits(shape, ["fkl", "jsd"], ["fastopd", "naive", "liger", "gemm_floor"], "cpu")  # 6.3 GiB at most
    bench._check_fits(shape, ["fkl"], ["trl"], "cpu")  # 4.8 GiB
    with pytest.raises(bench.BenchInputError, match=r"--providers trl: .* about 8\.8 GiB"):
        bench._check_fits(shape, ["jsd"], ["trl"], "cpu")


def test_out_that_is_a_file_is_an_error(tmp_path, capsys, no_timing):
    out = tmp_path / "results"
    out.write_text("keep me")
    _rejected(capsys, [*OK, "--out", str(out)], f"--out {out}: exists and is not a folder")
    assert out.read_text() == "keep me"


def test_out_under_a_file_is_an_error(tmp_path, capsys, no_timing):
    (tmp_path / "results").write_text("keep me")
    out = tmp_path / "results" / "sub"
    _rejected(capsys, [*OK, "--out", str(out)], f"--out {out}: cannot create the folder")
    assert (tmp_path / "results").read_text() == "keep me"


@linux_only
def test_out_under_proc_is_an_error(capsys, no_timing):
    _rejected(capsys, [*OK, "--out", "/proc/fastopd-bench-results"], "--out /proc/fastopd-bench-results: cannot")


def test_out_whose_result_file_is_a_folder_is_an_error(tmp_path, capsys, no_timing):
    (tmp_path / "loss_cpu_custom_n8_d4_v16_float32.json").mkdir()
    _rejected(capsys, [*OK, "--out", str(tmp_path)], "loss_cpu_custom_n8_d4_v16_float32.json there is a folder")
    assert [p.name for p in tmp_path.iterdir()] == ["loss_cpu_custom_n8_d4_v16_float32.json"]


def test_out_folder_is_made_before_the_timing(tmp_path, monkeypatch):
    out = tmp_path / "a" / "b"
    seen = []

    def fake(*args, **kwargs):
        seen.append(out.is_dir())
        return _result([_row("naive", [1.0])], [])

    monkeypatch.setattr(bench, "run_benchmark", fake)
    assert cli.main([*OK, "--out", str(out)]) == 0
    assert seen == [True] and (out / "loss_cpu_custom_n8_d4_v16_float32.json").exists()


# ---------------------------------------------------------------------------------------------------------
# bench/gpu_bench.py (the GPU suite's loss benchmark): what it measures, checked on the CPU
# ---------------------------------------------------------------------------------------------------------

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_fastopd_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gb():
    return _load("gpu_bench")


def _tiny_inputs(gb, dtype=torch.float32, n=37, v=301):
    return gb.make_inputs(n, v, 16, 24, "cpu", dtype)


def test_gemm_floor_does_the_chunked_loss_gemms_with_fp32_output(gb, monkeypatch):
    """The floor does the chunked loss's four GEMMs through its own call, fp32 output (the logits an exact loss
    needs), never input-dtype products that round the logits and write half the bytes."""
    from fastopd.losses import function

    seen = []
    real = function._matmul_f32

    def spy(a, b, out=None):
        res = real(a, b, out=out)
        seen.append((tuple(a.shape), tuple(b.shape), a.dtype, res.dtype))
        return res

    monkeypatch.setattr(function, "_matmul_f32", spy)
    inp = _tiny_inputs(gb, torch.bfloat16)
    rec = gb.bench_provider("gemm_floor", "fkl", inp, gb.Timer("cpu", 1, 1, 0.0), "cpu", 30.0)
    assert "median_ms" in rec["full"]
    n, v, ds, dt = 37, 301, 16, 24
    bf = torch.bfloat16
    want = {((n, dt), (dt, v), bf, torch.float32), ((n, ds), (ds, v), bf, torch.float32),
            ((n, v), (v, ds), bf, torch.float32), ((v, n), (n, ds), bf, torch.float32)}
    assert set(seen) == want
    assert "fp32 output" in gb.GEMM_FLOOR


def test_reference_loss_is_naives_loss_chunk_by_chunk(gb):
    inp = _tiny_inputs(gb)
    for div in ("fkl", "rkl", "jsd"):
        want = float(gb._naive(*(inp[k].detach() for k in ("hs", "ws", "ht", "wt", "labels")), gb.BETA[div]))
        assert gb.reference_loss(div, inp, rows=8) == pytest.approx(want, rel=1e-5)


def test_a_loss_that_differs_from_the_reference_is_flagged(gb):
    def row(provider, loss, dtype="bfloat16"):
        phase = {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "reps": 10}
        return dict(divergence="fkl", V=128256, N=1024, dtype=dtype, provider=provider, status="ok", loss=loss,
                    reference_loss=2.0, fwd=dict(phase), bwd=dict(phase), full=dict(phase), tflops={},
                    peak_bytes_above_inputs=2**20)

    rows = [row("liger", 2.01), row("chunked-triton", 2.000001), row("tiled", 2.1), row("naive", float("nan"))]
    gb.annotate(rows)
    assert [r["loss_ok"] for r in rows] == [True, True, False, False]
    assert rows[0]["loss_rel_diff"] == pytest.approx(5e-3)
    machine = dict(date_utc="d", torch="t", cuda="c", triton="t", liger_kernel="l", fastopd="f", device="cuda")
    md = gb.markdown(dict(machine=machine, dry_run=False, config={}, results=rows))
    assert "| 5.0e-02 (!) |" in md and "| 5.0e-03 |" in md
    assert "Loss check: 2 of 4 rows" in md and "NOT these: fkl V=128256 N=1024 tiled" in md


def _dry_args(gb, tmp_path, *extra):
    args = gb.parse_args(["--dry-run", "--divergences", "fkl", "--out", str(tmp_path), *extra])
    args.providers = ["gemm_floor", "liger", "chunked-cpu", "naive"]  # not tiled: minutes under the interpreter
    return args


def test_dry_run_checks_every_loss_against_the_reference(gb, tmp_path):
    result = gb.run(_dry_args(gb, tmp_path))
    rows = [r for r in result["results"] if r["status"] == "ok"]
    assert {r["provider"] for r in rows} >= {"gemm_floor", "liger", "chunked-cpu", "naive"}
    for r in rows:
        assert r["reference_loss"] is not None
        if r["provider"] != "gemm_floor":
            assert r["loss_ok"] and r["loss_rel_diff"] < 1e-5, r
    assert result["config"]["gemm_floor"] == gb.GEMM_FLOOR


def test_results_written_before_the_grid_ends_say_they_are_partial(gb, tmp_path):
    written = []
    result = gb.run(_dry_args(gb, tmp_path, "--tokens", "8"),
                    on_row=lambda r: written.append((r["complete"], gb.markdown(r))))
    assert result["complete"] is True and result["planned_rows"] == len(result["results"]) == 4
    assert all(complete is False for complete, _ in written)
    assert "**PARTIAL**: the run stopped before its last shape; 1 of 4 planned rows" in written[0][1]
    assert "PARTIAL" not in gb.markdown(result)


def test_percentiles_are_interpolated(gb):
    q = gb._quantiles([float(x) for x in range(10, 0, -1)])
    assert q == {"median_ms": 5.5, "p20_ms": pytest.approx(2.8), "p80_ms": pytest.approx(8.2)}
    rb = _load("test_rollout_bench")
    st = rb._stats([float(x) for x in range(1, 11)])
    assert (st["p20_s"], st["p80_s"]) == (pytest.approx(2.8), pytest.approx(8.2))


def test_cuda_timer_syncs_before_its_warm_up_and_times_each_call_between_events(gb, monkeypatch):
    """The CUDA path, emulated: queued work is waited for before the warm-up call is clocked (the bwd phase's
    forward is launched just before it), the L2 flush and gradient clearing stay outside the events, and the
    events are read only after a synchronize."""
    log = []

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            log.append("record")
            self.t = len(log)

        def elapsed_time(self, end):
            assert log[-1] == "sync", "an event was read before the GPU finished"
            return float(end.t - self.t)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append("sync"))
    timer = gb.Timer("cpu", min_reps=3, max_reps=3, target_s=0.0)
    timer.device = "cuda"
    timer._flush = torch.empty(16, dtype=torch.int8)
    real_zero = timer._flush.zero_

    class Flush:
        def zero_(self):
            log.append("flush")
            return real_zero()

    timer._flush = Flush()
    out = timer(lambda: log.append("fn"), budget_s=60.0)
    assert log[:3] == ["sync", "fn", "sync"]  # the warm-up call, clocked from an idle GPU
    assert log[3:] == ["flush", "record", "fn", "record"] * 3 + ["sync"]
    assert out["reps"] == 3 and out["median_ms"] == 2.0


def test_optim_results_are_written_atomically_before_their_baseline_exists(tmp_path, monkeypatch):
    ob = _load("test_optim_bench")
    monkeypatch.setenv("OUT", str(tmp_path))
    r = dict(median_s=0.01, p20_s=0.01, p80_s=0.02, rounds=3, state_bytes_per_param=0.1, density=0.01,
             optimizer="SparseMaskedAdamW(impl=cpu)")
    ob._write("cpu", {"sparse-cpu-d0.01": r})  # its baseline (torch-foreach) not measured yet
    assert json.loads((tmp_path / "optim_cpu.json").read_text())["results"]["sparse-cpu-d0.01"][
        "time_vs_torch_foreach"] is None
    assert "| - |" in (tmp_path / "optim_cpu.md").read_text()
    assert not list(tmp_path.glob(".*"))  # written through a temporary file, none left behind


def test_the_reference_loss_needs_no_n_by_v_tensor_when_naive_is_left_out(monkeypatch):
    """_check_fits tells the user to leave naive out where its [N, V] tensors do not fit: the loss the others are
    compared with must then not build them either (it is naive's, a chunk of rows at a time)."""
    rows_seen = []
    real = torch.log_softmax

    def spy(x, dim):
        rows_seen.append(x.shape[0])
        return real(x, dim)

    monkeypatch.setattr(bench, "REFERENCE_CHUNK_BYTES", 16 * 200 * 4, raising=False)  # 16 rows at V=200
    monkeypatch.setattr(torch, "log_softmax", spy)
    result = bench.run_benchmark(bench.Shape(64, 8, 8, 200), ["fkl", "jsd"], ["fastopd", "gemm_floor"], "cpu",
                                 repeats=1, warmup=1, log=lambda line: None)
    assert rows_seen and max(rows_seen) == 16
    monkeypatch.setattr(torch, "log_softmax", real)
    inputs = bench.make_inputs(bench.Shape(64, 8, 8, 200), "cpu")
    for div in ("fkl", "jsd"):
        naive = bench.provider_loss("naive", div, inputs)
        assert bench.reference_loss(div, inputs) == pytest.approx(naive, rel=1e-6)
        fast = next(r for r in result["results"] if r["provider"] == "fastopd" and r["divergence"] == div)
        assert fast["loss_rel_diff_vs_naive"] < 1e-5


# ---------------------------------------------------------------------------------------------------------
# What a user relies on: broken losses and gradients flagged, TRL found where it is, the command reproducible
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [pytest.param(float("nan"), id="loss-nan"), pytest.param(float("inf"), id="loss-inf")])
def test_a_non_finite_loss_difference_is_flagged(bad):
    rows = [_row("fastopd", [1.0] * 5, loss_diff=bad), _row("gemm_floor", [1.0] * 5, loss_diff=None)]
    msgs = bench.summarize(rows, "float32")
    assert rows[0]["flags"] == [f"loss differs {bad:.1e}"] and len(msgs) == 1


def _wrong_grad_step(real_step):
    """provider_step, with naive's backward run on twice its loss: the loss agrees, the gradients do not."""
    def step(name, div, inputs):
        if name != "naive":
            return real_step(name, div, inputs)
        hs, ws, ht, wt, labels = (inputs[k] for k in ("hs", "ws", "ht", "wt", "labels"))

        def doubled():
            (2 * bench._naive_loss(hs @ ws.T, ht @ wt.T, labels, bench._beta(div))).backward()
            hs.grad = ws.grad = None
        return doubled
    return step


def test_a_provider_with_wrong_gradients_is_flagged(monkeypatch):
    monkeypatch.setattr(bench, "provider_step", _wrong_grad_step(bench.provider_step))
    result = bench.run_benchmark(bench.Shape(37, 8, 8, 301), ["jsd"], ["fastopd", "naive", "gemm_floor"], "cpu",
                                 repeats=1, warmup=1, log=lambda line: None)
    by = {r["provider"]: r for r in result["results"]}
    assert by["naive"]["loss_rel_diff_vs_naive"] < 1e-5  # the loss alone does not show it
    assert by["naive"]["grad_rel_diff"] == pytest.approx(1.0, rel=1e-3)
    assert "grads differ 1.0e+00" in by["naive"]["flags"]
    assert any("jsd naive: gradients differ" in w for w in result["warnings"])
    assert by["fastopd"]["grad_rel_diff"] < 1e-5 and not by["fastopd"]["flags"][1:]
    assert by["gemm_floor"]["grad_rel_diff"] is None  # it computes no gradient


PEERS = [p for p in ("fastopd", "naive", "liger", "trl")
         if p in ("fastopd", "naive") or importlib.util.find_spec({"liger": "liger_kernel", "trl": "trl"}[p])]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
def test_every_provider_s_gradients_match_the_fp32_reference(div, dtype):
    result = bench.run_benchmark(bench.Shape(37, 13, 13, 301, dtype), [div], PEERS, "cpu", repeats=1, warmup=1,
                                 log=lambda line: None)
    for r in result["results"]:
        assert "skipped" not in r, f"{r['provider']} is installed but was skipped: {r['skipped']}"
        assert r["grad_rel_diff"] <= bench.GRAD_RTOL[dtype], r
        assert not any(f.startswith("grads differ") for f in r["flags"]), r


def test_trl_before_0_26_is_found_at_trl_gkdtrainer(monkeypatch):
    """TRL 0.19-0.25 (which fastopd's trl extra allows) keep GKDTrainer at trl.GKDTrainer only."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    import types

    old_trl = types.ModuleType("trl")
    old_trl.GKDTrainer = gkd.GKDTrainer
    monkeypatch.setitem(sys.modules, "trl", old_trl)
    monkeypatch.setitem(sys.modules, "trl.experimental", None)
    monkeypatch.setitem(sys.modules, "trl.experimental.gkd", None)
    inputs = bench.make_inputs(bench.Shape(16, 4, 4, 50), "cpu")
    bench.provider_step("trl", "fkl", inputs)()
    assert bench.provider_loss("trl", "fkl", inputs) == pytest.approx(bench.reference_loss("fkl", inputs), rel=1e-5)


def test_a_trl_whose_gkd_module_fails_to_import_says_why(monkeypatch):
    """Where trl.experimental.gkd fails to import (a broken dependency of TRL's) and trl has no GKDTrainer either,
    the skipped row gives both reasons, not only the second (which named no cause)."""
    import types

    monkeypatch.setitem(sys.modules, "trl", types.ModuleType("trl"))
    monkeypatch.setitem(sys.modules, "trl.experimental", None)
    monkeypatch.setitem(sys.modules, "trl.experimental.gkd", None)
    with pytest.raises(ImportError, match=r"not importable: trl\.experimental\.gkd \(import of trl\.experimental"
                                          r"(\.gkd)? halted.*\); trl\.GKDTrainer \(cannot import name 'GKDTrainer'"):
        bench._gkd_trainer()


def test_a_missing_provider_is_a_skipped_row(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss", None)
    result = bench.run_benchmark(bench.Shape(16, 4, 4, 50), ["fkl"], ["fastopd", "liger"], "cpu", repeats=1,
                                 warmup=1, log=lambda line: None)
    liger = next(r for r in result["results"] if r["provider"] == "liger")
    assert "median_s" not in liger and liger["skipped"]
    assert "| fkl | liger | skipped: " in bench.markdown_table(result, "t")


@pytest.mark.parametrize("installed, skipped", [
    pytest.param("0.6.4", True, id="liger-0.6.4-skipped"), pytest.param("0.5.10", True, id="liger-0.5.10-skipped"),
    pytest.param("0.6.5", False, id="liger-0.6.5-runs"), pytest.param("0.8.5.dev20261027", False, id="liger-dev-runs"),
])
def test_a_liger_before_0_6_5_is_a_skipped_row_that_says_why(monkeypatch, installed, skipped):
    """Liger-Kernel before 0.6.5 averaged its soft loss over ignore_index tokens too (measured with 0.5.10 and
    0.6.0-0.6.4), a different loss from every other provider's: the bench skips it and says why."""
    pytest.importorskip("liger_kernel.chunked_loss")
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: installed if dist == "liger-kernel" else real(dist))
    result = bench.run_benchmark(bench.Shape(16, 4, 4, 50), ["fkl"], ["fastopd", "liger"], "cpu", repeats=1,
                                 warmup=1, log=lambda line: None)
    liger = next(r for r in result["results"] if r["provider"] == "liger")
    assert ("median_s" not in liger) is skipped
    if skipped:
        assert liger["skipped"] == (f"liger-kernel {installed} averages its soft loss over ignore_index tokens too "
                                    "(fixed in 0.6.5), so it computes another loss: pip install 'liger-kernel>=0.6.5'")


def test_small_times_keep_their_digits_in_the_table():
    rows = [_row("fastopd", [2.5e-4] * 5), _row("gemm_floor", [5.0e-5] * 5, loss_diff=None)]
    msgs = bench.summarize(rows, "float32")
    md = bench.markdown_table(_result(rows, msgs), "tiny")
    assert "| jsd | fastopd | 0.000250 | 0.000250 | 0.000250 | 5.00 |" in md
    assert "| jsd | gemm_floor | 5.00e-05 |" in md


def test_the_recorded_command_reproduces_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: _result([_row("naive", [1.0])], []))
    assert cli.main([*OK, "--providers", "fastopd, naive", "--out", str(tmp_path)]) == 0
    command = json.loads((tmp_path / "loss_cpu_custom_n8_d4_v16_float32.json").read_text())["command"]
    argv = shlex.split(command)
    assert argv[:2] == ["fastopd", "bench"]
    args = cli.build_parser().parse_args(argv[1:])
    assert (args.providers, args.tokens, args.vocab, args.device) == ("fastopd, naive", 8, 16, "cpu")


def test_help_names_the_files_it_writes_and_replaces(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "loss_<device>_<kind>_<dtype>.json" in help_text and "replacing" in help_text


def test_a_nan_in_the_results_is_written_as_json_null(tmp_path, monkeypatch):
    """json.dumps wrote a NaN loss difference as bare `NaN`, which strict JSON readers (jq, JavaScript) refuse."""
    monkeypatch.setattr(bench, "run_benchmark",
                        lambda *a, **k: _result([_row("naive", [1.0], loss_diff=float("nan"))], []))
    assert cli.main([*OK, "--out", str(tmp_path)]) == 0
    text = (tmp_path / "loss_cpu_custom_n8_d4_v16_float32.json").read_text()
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert result["results"][0]["loss_rel_diff_vs_naive"] is None and "NaN" not in text
