"""Packaging: what setup.py, pyproject.toml and MANIFEST.in declare, checked against the tree.

The fast tests read the declarations (no build). `FASTOPD_TEST_PACKAGING=1` also runs the slow one, which builds
an sdist from a copy of the checkout and a wheel from that sdist (`pip wheel --no-build-isolation`, compiling
fastopd._C: about a minute on 2 cores) and checks what both hold.
"""

from __future__ import annotations

import ast
import fnmatch
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from fastopd import _dispatch

ROOT = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ImportError:  # Python 3.10: tomli is a dependency there
    import tomli as tomllib

pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").exists() or not (ROOT / "pyproject.toml").exists(),
                                reason="not run from a source tree (no setup.py / pyproject.toml)")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _setup_constant(name: str):
    """A literal module-level constant of setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py has no literal {name} = ...")


def _req_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def _build_sources() -> list[Path]:
    """What setup.py compiles: csrc/*.cpp, csrc/cpu/*.cpp and (CUDA builds) csrc/cuda/*.cu."""
    return [Path(p) for pat in ("csrc/*.cpp", "csrc/cpu/*.cpp", "csrc/cuda/*.cu")
            for p in sorted(glob.glob(str(ROOT / pat)))]


def _local_includes(src: Path, seen: set[Path] | None = None) -> set[Path]:
    """The project headers a source pulls in with #include "..." (transitively), resolved next to the includer."""
    seen = set() if seen is None else seen
    for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', src.read_text(errors="replace"), flags=re.M):
        hdr = (src.parent / name).resolve()
        if hdr.exists() and hdr not in seen:
            seen.add(hdr)
            _local_includes(hdr, seen)
    return seen


def _manifest_files(monkeypatch) -> set[str]:
    """The files MANIFEST.in's template selects in this tree (setuptools' own template engine)."""
    from setuptools.command.egg_info import FileList

    manifest = ROOT / "MANIFEST.in"
    assert manifest.exists(), "no MANIFEST.in: the sdist would lack csrc/, and a wheel built from it fastopd._C"
    monkeypatch.chdir(ROOT)
    fl = FileList()
    for line in manifest.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            fl.process_template_line(line)
    return {os.path.normpath(f) for f in fl.files}


def test_manifest_ships_every_build_input(monkeypatch):
    """An sdist holds every source setup.py compiles (also when torch is absent where the sdist is made: setup.py
    then declares no extension, so only MANIFEST.in brings csrc/ in), every header they include, the Triton
    kernels, the model assets and the README that pyproject.toml names as the long description."""
    files = _manifest_files(monkeypatch)
    sources = _build_sources()
    assert any(p.suffix == ".cu" for p in sources) and any(p.suffix == ".cpp" for p in sources)
    needed = set(sources)
    for src in sources:
        needed |= _local_includes(src)
    needed |= set((ROOT / "kernels").glob("*.py"))
    needed |= {p for p in (ROOT / "fastopd" / "train" / "assets").rglob("*") if p.is_file()}
    needed.add(ROOT / _pyproject()["project"]["readme"])
    missing = sorted(str(p.resolve().relative_to(ROOT)) for p in needed
                     if str(p.resolve().relative_to(ROOT)) not in files)
    assert not missing, f"MANIFEST.in leaves these out of the sdist: {missing}"
    assert any(f.endswith("vec_math.h") for f in files)


def test_manifest_ships_what_the_shipped_tests_run(monkeypatch):
    """The sdist holds tests/ (graft tests), and tests/cli/test_bench_cli.py and tests/kernels/test_gpu_suite.py run
    bench/'s scripts: without them the sdist's tests fail (bash: bench/gpu_suite.sh: No such file or directory)."""
    files = _manifest_files(monkeypatch)
    used = {m for f in (ROOT / "tests").rglob("*.py")
            for m in re.findall(r'"(bench/[\w./-]+|[\w-]+\.(?:py|sh))"', f.read_text())}
    scripts = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "bench").glob("*") if p.suffix in (".py", ".sh"))
    assert {"bench/gpu_suite.sh", "bench/gpu_bench.py", "bench/test_rollout_bench.py"} <= set(scripts)
    assert {"gpu_suite.sh", "gpu_bench.py", "test_rollout_bench.py"} <= used
    missing = [s for s in scripts if s not in files]
    assert not missing, f"MANIFEST.in leaves out of the sdist the bench scripts its tests run: {missing}"
    assert not [f for f in files if f.startswith("bench/results/")]


@pytest.mark.parametrize("collected", ["tests/test_docs_examples.py", "bench/test_optim_bench.py"],
                         ids=["tests-folder", "bench-folder"])
def test_pytest_from_the_root_keeps_the_kernels_folder_off_sys_path(monkeypatch, tmp_path, collected):
    """`python -c "...pytest.main()"` from the root (how bench/gpu_suite.sh runs pytest) puts the root on sys.path,
    where the Triton source folder kernels/ shadows Hugging Face's `kernels`, which transformers >= 5.25 imports
    to build a model. The rootdir conftest.py drops the root for tests/ and bench/ alike, and the sdist ships it."""
    probe = tmp_path / "kernels_probe.py"
    probe.write_text("import importlib.util, os\n"
                     "def pytest_collection_finish(session):\n"
                     "    spec = importlib.util.find_spec('kernels')\n"
                     "    open(os.environ['KERNELS_PROBE_OUT'], 'w').write(str(spec and spec.origin))\n")
    out = tmp_path / "origin.txt"
    env = dict(os.environ, KERNELS_PROBE_OUT=str(out),
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))", "-q",
                           "-p", "no:cacheprovider", "-p", "kernels_probe", "--collect-only", collected],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    origin = out.read_text()
    assert origin == "None" or Path(origin).resolve() != (ROOT / "kernels" / "__init__.py").resolve(), origin
    assert "conftest.py" in _manifest_files(monkeypatch)


def test_manifest_keeps_build_outputs_out(monkeypatch, tmp_path):
    """An in-place build's fastopd/_C*.so or an object file under csrc/ never lands in the sdist."""
    files = _manifest_files(monkeypatch)
    assert not [f for f in files if f.endswith((".so", ".o", ".pyc"))]
    text = (ROOT / "MANIFEST.in").read_text()
    assert re.search(r"^global-exclude .*\*\.so", text, flags=re.M)
    assert re.search(r"^global-exclude .*\*\.o\b", text, flags=re.M)


def test_package_data_covers_every_asset():
    """The wheel installs every file under fastopd/train/assets (fastopd distill loads them from the package)."""
    patterns = _setup_constant("PACKAGE_DATA")["fastopd.train"]
    base = ROOT / "fastopd" / "train"
    assets = [p.relative_to(base).as_posix() for p in (base / "assets").rglob("*") if p.is_file()]
    assert assets, "no model assets under fastopd/train/assets"
    unmatched = [a for a in assets if not any(fnmatch.fnmatch(a, pat) for pat in patterns)]
    assert not unmatched, f"setup.py's PACKAGE_DATA misses {unmatched}"


def test_kernels_install_as_a_subpackage():
    package_dir = _setup_constant("PACKAGE_DIR")
    assert package_dir["fastopd.kernels"] == "kernels"
    assert (ROOT / "kernels" / "__init__.py").exists()
    assert '["fastopd.kernels"]' in (ROOT / "setup.py").read_text()


def test_build_requirements():
    """torch stays out (an isolated build would compile against a torch other than the one that runs it);
    setuptools >= 64 for PEP 660 editable installs; no `wheel`, which setuptools < 70.1 requests by itself and
    whose listing makes `python -m build --no-isolation` refuse where it is not installed."""
    build = _pyproject()["build-system"]
    names = {_req_name(r): r for r in build["requires"]}
    assert "torch" not in names
    assert "wheel" not in names
    assert "ninja" in names
    assert re.fullmatch(r"setuptools>=(\d+)", names["setuptools"].replace(" ", ""))
    assert int(names["setuptools"].split(">=")[1]) >= 64
    assert build["build-backend"] == "setuptools.build_meta"


def test_license_field_is_readable_by_old_setuptools():
    """`license = "Apache-2.0"` (SPDX string) is a configuration error on setuptools < 77, which
    build-system.requires allows and a --no-build-isolation build may meet; the table form works on 64 to 84
    (deprecated from 77, with a warning)."""
    lic = _pyproject()["project"]["license"]
    assert lic == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()  # the text itself ships too (setuptools' default license-files)
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"] and "END OF TERMS AND CONDITIONS" in text


def test_runtime_dependencies_cover_module_level_imports():
    """Every third-party module fastopd imports at module level is a declared dependency; everything it imports
    anywhere is a dependency or in an extra (or triton, which CUDA builds of torch bring on Linux)."""
    project = _pyproject()["project"]
    import_name = {"liger-kernel": "liger_kernel", "pytest-benchmark": "pytest_benchmark"}
    deps = {import_name.get(n, n.replace("-", "_")) for n in map(_req_name, project["dependencies"])}
    extras = {import_name.get(n, n.replace("-", "_"))
              for reqs in project["optional-dependencies"].values() for n in map(_req_name, reqs)}
    # Standard library on a newer Python than this one, with its backport declared for the older ones (the code
    # imports the backport where the module is missing): tomllib came with 3.11, tomli stands in on 3.10.
    backported = {"tomllib": "tomli"}
    stdlib = set(sys.stdlib_module_names) | {n for n, backport in backported.items() if backport in deps}
    top_level, anywhere = {}, {}
    for f in sorted((ROOT / "fastopd").rglob("*.py")):
        tree = ast.parse(f.read_text())
        module_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            else:
                continue
            for n in names:
                if n in stdlib or n == "fastopd":
                    continue
                anywhere.setdefault(n, str(f.relative_to(ROOT)))
                if id(node) in module_level:
                    top_level.setdefault(n, str(f.relative_to(ROOT)))
    assert "torch" in deps
    undeclared = {n: f for n, f in top_level.items() if n not in deps}
    assert not undeclared, f"imported at module level but not in [project].dependencies: {undeclared}"
    unknown = {n: f for n, f in anywhere.items() if n not in deps | extras | {"triton"}}
    assert not unknown, f"imported but in no dependency or extra: {unknown}"


def _floor(reqs: list[str], name: str) -> tuple[int, ...]:
    req = next(r for r in reqs if _req_name(r) == name)
    return _dispatch.release(re.search(r">=\s*(\S+)", req).group(1))


def test_test_extra_brings_the_trl_and_transformers_its_tests_need():
    """The tests (and `fastopd bench`'s TRL provider) import trl.experimental.gkd, which TRL has from 0.26.0 on
    (0.19 to 0.25 keep GKD at trl.GKDTrainer only): `.[test]` allowed 0.19, with which they fail to import. They
    compare FusedGKDTrainer with GKD's normalization under gradient accumulation, the sum over
    `num_items_in_batch`, which TRL has from 1.7.0 on (measured: 4 failures with 0.26.0, 0.29.1, 1.0.0, 1.2.0,
    1.4.0 and 1.6.0; none with 1.7.0). The Hugging Face tests (tests/rollout/test_hf_*.py, test_qwen3.py,
    tests/train/test_trainer_hf_models.py, ...) fail on transformers 4.x (measured: 27 failures on 4.46.3, 17 on
    4.51.3, 11 on 4.56.2 and 4.57.6; none on 5.0.0), and `.[test]` allowed 4.46, so an environment that already
    had a 4.x kept it."""
    test = _pyproject()["project"]["optional-dependencies"]["test"]
    assert _floor(test, "trl") >= (1, 7)
    assert _floor(test, "transformers") >= (5, 0)
    uses = [f for f in (ROOT / "tests").rglob("*.py") if "trl.experimental.gkd" in f.read_text()]
    assert uses, "no test imports trl.experimental.gkd any more: the floor may go back down"


def test_test_extra_brings_a_safetensors_that_writes_the_dtypes_the_tests_use():
    """tests/analysis/test_checkpoint_inputs.py writes U16, U32, U64 and F8_E8M0 tensors with safetensors'
    save_file, which 0.4.0 to 0.5.3 cannot (measured: 4 failures with 0.4.0, 0.4.5 and 0.5.3, none with 0.6.1);
    fastopd itself reads such files from 0.4.0 on, so the dependency's floor stays there."""
    extras = _pyproject()["project"]["optional-dependencies"]
    assert _floor(extras["test"], "safetensors") >= (0, 6, 1)
    assert _floor(_pyproject()["project"]["dependencies"], "safetensors") <= (0, 4)


def test_test_extra_brings_a_liger_that_computes_the_same_loss():
    """Liger-Kernel before 0.6.5 averages its soft loss over ignore_index tokens too (measured: 0.5.10, 0.6.0 to
    0.6.4), so tests/integrations/test_liger.py and the bench's gradient checks fail on it and `fastopd bench`
    skips it; `.[test]` allowed 0.5.10."""
    from fastopd.bench import LIGER_MIN

    assert _floor(_pyproject()["project"]["optional-dependencies"]["test"], "liger-kernel") >= LIGER_MIN


def test_readme_install_commands_match_the_torch_range():
    torch_req = next(r for r in _pyproject()["project"]["dependencies"] if _req_name(r) == "torch")
    spec = torch_req[len("torch"):].replace(" ", "")
    readme = (ROOT / "README.md").read_text()
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        block = readme.split(marker, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
        assert f'"torch{spec}"' in block.replace(" ", ""), f"{marker}: torch range differs from pyproject's {spec}"


def test_console_script_resolves():
    target = _pyproject()["project"]["scripts"]["fastopd"]
    module, func = target.split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))


def _checkout_copy(dst: Path) -> None:
    """The checkout's tracked and untracked-but-not-ignored files (no build outputs, no egg-info)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy")
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


SETUP_PROBE = """
import runpy, sys, torch
torch.version.cuda = None  # what a CPU build of torch reports
sys.argv = ["setup.py", "--version"]
runpy.run_path("setup.py", run_name="__main__")
"""


def test_cuda_build_request_on_a_cpu_torch_names_the_cause():
    """FASTOPD_BUILD_CUDA=1 against a CPU build of torch (no CUDA headers) builds the CPU kernels and says why,
    rather than blaming CUDA_HOME (which torch reports as None for its CPU builds). `--version` builds nothing."""
    env = {**os.environ, "FASTOPD_BUILD_CUDA": "1"}
    r = subprocess.run([sys.executable, "-c", SETUP_PROBE], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "is a CPU build (torch.version.cuda is None" in r.stderr
    assert "building fastopd._C with C++ CPU kernels" in r.stderr and "CUDA_HOME=" not in r.stderr


def _hf_kernels_egg_info_writer() -> bool:
    from importlib.metadata import entry_points
    return any(ep.value.startswith("kernels.") for ep in entry_points(group="egg_info.writers"))


@pytest.mark.skipif(not _hf_kernels_egg_info_writer(),
                    reason="needs Hugging Face's kernels package (>= 0.19), whose egg_info writer the folder shadowed")
def test_setup_from_the_checkout_root_with_hf_kernels_installed(tmp_path):
    """HF's `kernels` (a transformers >= 5.25 dependency) registers a setuptools egg_info writer in
    `kernels._internals`: with the checkout's root on sys.path (`python setup.py ...`, build_meta from `python -c`)
    its `kernels/` folder shadowed that package and egg_info, hence sdists, failed."""
    src = tmp_path / "src"
    _checkout_copy(src)
    env = dict(os.environ, FASTOPD_BUILD_CPP="0")
    code = f"from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel({str(tmp_path)!r}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / r.stdout.strip().splitlines()[-1] / "METADATA").is_file()
    r = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=src, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTOPD_TEST_PACKAGING") != "1", reason="set FASTOPD_TEST_PACKAGING=1 (builds)")
def test_sdist_and_wheel_built_from_it(tmp_path):
    """sdist made where torch is not used (FASTOPD_BUILD_CPP=0, as in an isolated build), then a wheel from it
    with --no-build-isolation: it holds fastopd._C (where a C++ compiler exists), fastopd.kernels, the assets
    and the console script."""
    src = tmp_path / "src"
    _checkout_copy(src)
    dist = tmp_path / "dist"
    env = dict(os.environ, FASTOPD_BUILD_CPP="0")
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"],
                   cwd=src, env=env, check=True, capture_output=True)
    (sdist,) = dist.glob("fastopd-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for rel in ["setup.py", "pyproject.toml", "README.md", "kernels/__init__.py", "csrc/ops.cpp",
                "csrc/cpu/vec_math.h", "csrc/cuda/divergence.cu", "bench/gpu_suite.sh", "bench/gpu_bench.py",
                "fastopd/__main__.py", "fastopd/train/assets/addition3/teacher/model.safetensors"]:
        assert rel in names, f"sdist lacks {rel}"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]

    wheels = tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTOPD_")}
    env["FASTOPD_BUILD_CUDA"] = "0"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-cache-dir", "--no-build-isolation",
                        "--no-deps", "-w", str(wheels), str(sdist)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    (whl,) = wheels.glob("fastopd-*.whl")
    with zipfile.ZipFile(whl) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "fastopd/kernels/__init__.py" in names and "fastopd/__main__.py" in names
    assert "fastopd/train/assets/addition3/student/model.safetensors" in names
    # include_package_data=False: setuptools took MANIFEST.in's asset files as well and warned, 40 lines per
    # folder, that fastopd.train.assets.addition3.* are packages missing from `packages`.
    assert "Package would be ignored" not in r.stdout + r.stderr
    assert "fastopd = fastopd.cli:entry" in entry_points
    if shutil.which(os.environ.get("CXX", "c++")):
        so = [n for n in names if re.fullmatch(r"fastopd/_C\..*\.so", n)]
        assert so, "the wheel built from the sdist has no fastopd._C:\n" + (r.stdout + r.stderr)[-4000:]
