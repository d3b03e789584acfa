"""The `fastopd` command line: help, doctor, and a tiny bench run end to end."""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastopd
from fastopd import cli

ROOT = Path(__file__).resolve().parents[2]


def _run(argv, cwd, pythonpath):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_help_lists_subcommands(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    for name in ("bench", "doctor"):
        assert name in out


def test_doctor_reports_every_backend(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for row in ("torch", "torch reference", "C++ CPU kernel", "CPU decode kernel", "Triton", "Triton interpreter",
                "CUDA kernel", "auto backend on cpu", "vocab-parallel on cpu", "torch.distributed"):
        assert row in out
    assert "missing:" in out or "usable" in out


def test_doctor_names_fastopd_decode_isa_baseline_as_the_reason(tmp_path):
    """Under FASTOPD_DECODE_ISA=baseline, on an AVX-512 CPU, doctor said the CPU had neither AVX-512 nor AVX2
    (the kernel reads the variable once per process: a subprocess)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("fastopd._C")
    proc = subprocess.run([sys.executable, "-m", "fastopd", "doctor"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FASTOPD_DECODE_ISA": "baseline"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("CPU decode kernel"))
    assert "missing: FASTOPD_DECODE_ISA=baseline caps it to the portable tile" in line, line


def test_version_option(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"fastopd {fastopd.__version__}"


def test_python_dash_m_fastopd_is_the_command(tmp_path):
    """`python -m fastopd` (there was no fastopd/__main__.py: "'fastopd' is a package and cannot be directly
    executed") runs the same command line as the console script."""
    r = _run(["-m", "fastopd", "--version"], tmp_path, ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f"fastopd {fastopd.__version__}"
    r = _run(["-m", "fastopd"], tmp_path, ROOT)
    assert r.returncode == 2 and "usage: fastopd" in r.stdout and "doctor" in r.stdout


def _doctor_rows(capsys) -> dict[str, str]:
    assert cli.main(["doctor"]) == 0
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("built", [pytest.param(False, id="not-built"), pytest.param(True, id="built")])
def test_doctor_without_a_cuda_device_says_so_before_any_rebuild_hint(monkeypatch, capsys, built):
    """On a machine without a GPU the CUDA kernel is unusable whatever the build: doctor said only "rebuild with
    FASTOPD_BUILD_CUDA=1", which would not make it usable, and "torch reference: usable (CPU and CUDA)"."""
    from fastopd import _ops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_ops, "LOAD_ERROR", None)
    monkeypatch.setattr(_ops, "has_kernel", lambda op, key: built or key != "CUDA")
    rows = _doctor_rows(capsys)
    assert rows["torch reference"] == "usable (CPU; no CUDA device visible)"
    assert rows["Triton"] == "missing: no CUDA device visible"
    if built:
        assert rows["CUDA kernel"] == "missing: built, but no CUDA device is visible"
    else:
        assert rows["CUDA kernel"].startswith("missing: no CUDA device is visible, and fastopd._C was built without")
    assert "auto backend on cuda" not in rows


def test_doctor_reports_the_installed_version_of_each_optional_package(capsys):
    """From the package metadata: Liger-Kernel has no __version__, and doctor printed "installed"."""
    pytest.importorskip("liger_kernel")
    rows = _doctor_rows(capsys)
    assert rows["liger_kernel"] == importlib.metadata.version("liger-kernel")
    assert rows["torch"] == torch.__version__


@pytest.mark.parametrize("root_on_path", [pytest.param(True, id="checkout-root-on-sys-path"),
                                          pytest.param(False, id="installed-kernels-first")])
def test_doctor_names_a_checkout_that_shadows_hugging_faces_kernels(monkeypatch, capsys, tmp_path, root_on_path):
    """transformers >= 5.25 imports Hugging Face's `kernels`; from the checkout's root (`python -m ...`), `import
    kernels` finds fastopd's kernels/ source folder and transformers fails with "cannot import name
    'CUDAProperties' from 'kernels'". doctor says which folder shadows it."""
    import importlib.util

    installed = tmp_path / "site" / "kernels" / "__init__.py"  # where the `kernels` distribution put its package
    installed.parent.mkdir(parents=True)
    installed.write_text("")

    class Dist:
        version = "0.19.1"

        @staticmethod
        def locate_file(name):
            return tmp_path / "site" / name

    real = importlib.metadata.distribution
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist if name == "kernels" else real(name))
    ours = Path(importlib.util.find_spec("fastopd.kernels").origin).parent
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    first = ours.parent if root_on_path else tmp_path / "site"
    monkeypatch.setattr(sys, "path", [str(first), *sys.path])
    rows = _doctor_rows(capsys)
    if root_on_path:
        assert rows["kernels (Hugging Face)"].startswith(f"0.19.1 installed, but shadowed by {ours} "), rows
    else:
        assert "kernels (Hugging Face)" not in rows


def test_doctor_on_an_install_without_the_cpp_library_says_it_was_never_built(tmp_path):
    """A real install without fastopd._C (what a plain `pip install .` makes): a copy of the package without the
    library, run in a fresh interpreter. Doctor said "built against another torch or toolkit"."""
    pkg = tmp_path / "site" / "fastopd"
    shutil.copytree(ROOT / "fastopd", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(ROOT / "kernels", pkg / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    # An editable install's finder (setuptools' __editable__ module on sys.meta_path) would find the checkout's
    # fastopd._C for the copy: the child drops it, as an install without one has none.
    r = _run(["-c", "import sys; sys.meta_path[:] = [f for f in sys.meta_path "
              "if not getattr(f, '__module__', '').startswith('__editable__')]; "
              "import fastopd; print(fastopd.__file__); sys.argv[1:] = ['doctor']; "
              "from fastopd.cli import main; main()"], tmp_path, tmp_path / "site")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0] == str(pkg / "__init__.py")  # the copy, not an installed fastopd
    row = next(line for line in r.stdout.splitlines() if line.startswith("C++ CPU kernel"))
    assert "missing: fastopd._C is not built" in row
    assert "it was never built" in row and "another torch" not in row


@pytest.mark.parametrize("load_error,expect", [
    pytest.param("ModuleNotFoundError: No module named 'fastopd._C'", "it was never built", id="never-built"),
    pytest.param("ImportError: _C.so: undefined symbol: _ZN3c10", "built against another torch", id="other-torch"),
])
def test_doctor_says_why_the_cpp_library_is_missing_and_how_to_rebuild(monkeypatch, load_error, expect):
    from fastopd import _dispatch, _ops

    monkeypatch.setattr(_ops, "LOAD_ERROR", load_error)
    why = _dispatch.available("divergence_chunk", "cpu", "cpu")
    assert load_error in why and expect in why and "pip install --no-build-isolation ." in why


def test_doctor_says_how_to_build_the_cuda_kernel(monkeypatch):
    from fastopd import _dispatch, _ops

    monkeypatch.setattr(_ops, "LOAD_ERROR", None)
    monkeypatch.setattr(_ops, "has_kernel", lambda op, key: key != "CUDA")
    why = _dispatch.REGISTRY["divergence_chunk"][1].check()
    assert "built without a CUDA kernel" in why and "FASTOPD_BUILD_CUDA=1" in why and "CUDA_HOME" in why


@pytest.mark.parametrize("text", ["-1", "-1.5", "-.5", "-1e-3", "-1E+4", "-2.e5", "-inf", "-Infinity", "-nan"])
def test_negative_numbers_are_values_not_options(text):
    float(text)  # each is a number Python reads
    assert cli._NEGATIVE_NUMBER.match(text)


@pytest.mark.parametrize("text", ["-x", "--tau", "-1e", "-e3", "-infx", "-1-", "-"])
def test_options_are_not_taken_for_negative_numbers(text):
    assert not cli._NEGATIVE_NUMBER.match(text)


def test_bench_tiny_run_writes_results(tmp_path, capsys):
    rc = cli.main(["bench", "--tokens", "48", "--hidden", "16", "--vocab", "300", "--providers",
                   "fastopd,naive,gemm_floor", "--divergences", "jsd", "--repeats", "1", "--device", "cpu",
                   "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "loss_cpu_custom_n48_d16_v300_float32.json").read_text())
    rows = {r["provider"]: r for r in result["results"]}
    assert set(rows) == {"fastopd", "naive", "gemm_floor"}
    assert rows["gemm_floor"]["ratio_to_gemm_floor"] == pytest.approx(1.0)
    # every provider computes the same loss
    assert rows["fastopd"]["loss_rel_diff_vs_naive"] < 1e-5
    assert "| jsd | fastopd |" in (tmp_path / "loss_cpu_custom_n48_d16_v300_float32.md").read_text()
    assert "custom shapes" in capsys.readouterr().out


def test_bench_rejects_unknown_provider(capsys):
    assert cli.main(["bench", "--providers", "fastest", "--out", "/nonexistent"]) == 2
    assert "fastopd bench: error: --providers: unknown provider" in capsys.readouterr().err
    assert cli.main(["bench", "--repeats", "0", "--out", "/nonexistent"]) == 2  # was silently the default 5
    assert "fastopd bench: error: --repeats must be >= 1" in capsys.readouterr().err


def test_bench_trl_loss_is_trls_own(monkeypatch):
    """The loss check of the trl provider calls TRL's generalized_jsd_loss (it used fastopd's naive loss)."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    from fastopd import bench

    calls = []
    real = gkd.GKDTrainer.generalized_jsd_loss
    monkeypatch.setattr(gkd.GKDTrainer, "generalized_jsd_loss",
                        staticmethod(lambda *a, **k: (calls.append(k["beta"]), real(*a, **k))[1]))
    g = torch.Generator().manual_seed(0)
    inputs = {"hs": torch.randn(9, 8, generator=g), "ws": torch.randn(40, 8, generator=g),
              "ht": torch.randn(9, 6, generator=g), "wt": torch.randn(40, 6, generator=g),
              "labels": torch.randint(0, 40, (9,), generator=g)}
    got = bench.provider_loss("trl", "jsd", inputs)
    assert calls and got == pytest.approx(bench.provider_loss("naive", "jsd", inputs), rel=1e-5)


EXIT_PROBE = """
import atexit, sys
atexit.register(lambda: print("finalized", flush=True))
import fastopd.train.cli as train_cli
train_cli.distributed_run_closed = {closed}
sys.argv[1:] = []  # `fastopd` alone: the help on stdout (still in the buffer when main returns), exit code 2
from fastopd.cli import entry
entry()
"""


@pytest.mark.parametrize("closed", [pytest.param(False, id="plain-command"),
                                    pytest.param(True, id="after-a-distributed-run")])
def test_entry_skips_finalization_only_after_a_distributed_run(tmp_path, closed):
    """`fastopd` (the console script and python -m): after a multi-rank `distill` destroyed its process group the
    process leaves by os._exit, past the interpreter's finalization (where torch's surviving gloo threads aborted
    ranks), yet with its exit code and all of stdout; otherwise it exits normally, atexit handlers and all."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe's stdout: block-buffered
    r = subprocess.run([sys.executable, "-c", EXIT_PROBE.format(closed=closed)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "usage: fastopd" in r.stdout and "distill" in r.stdout  # flushed by entry() before os._exit
    assert ("finalized" in r.stdout) is (not closed)


class _FakeDist:
    """torch.distributed's process-group calls as `_close_process_group` makes them, recorded."""

    def __init__(self, world):
        self.world, self.calls = world, []

    def is_available(self):
        return True

    def is_initialized(self):
        return "destroy" not in self.calls

    def get_world_size(self):
        return self.world

    def barrier(self):
        self.calls.append("barrier")

    def destroy_process_group(self):
        self.calls.append("destroy")


@pytest.mark.parametrize("world,finished,calls,closed", [
    pytest.param(2, True, ["barrier", "destroy"], True, id="finished-2-ranks"),
    pytest.param(2, False, ["destroy"], True, id="failed-2-ranks-no-barrier"),
    pytest.param(1, True, ["destroy"], False, id="one-rank"),
])
def test_close_process_group_meets_at_a_barrier_only_after_a_finished_run(monkeypatch, world, finished, calls,
                                                                          closed):
    import torch.distributed

    import fastopd.train.cli as train_cli

    fake = _FakeDist(world)
    for name in ("is_available", "is_initialized", "get_world_size", "barrier", "destroy_process_group"):
        monkeypatch.setattr(torch.distributed, name, getattr(fake, name))
    monkeypatch.setattr(train_cli, "distributed_run_closed", False)
    train_cli._close_process_group(finished=finished)
    assert fake.calls == calls and train_cli.distributed_run_closed is closed
    train_cli._close_process_group(finished=finished)  # nothing left to close: a no-op
    assert fake.calls == calls
