"""Builds fastopd._C, the optional C++/CUDA operator library, with ninja through torch.utils.cpp_extension.

- C++ CPU kernels (OpenMP) are always built when torch is importable at build time
  (use `pip install --no-build-isolation .` so the extension is compiled against the torch that runs it).
- CUDA kernels (csrc/cuda/*.cu) are added when FASTOPD_BUILD_CUDA=1, or when a GPU is visible and
  FASTOPD_BUILD_CUDA is not 0. torch must be a CUDA build and CUDA_HOME the toolkit root holding
  lib64/libcudart.so; otherwise the build says why and makes the CPU kernels only.
- FASTOPD_BUILD_CPP=0 skips the extension; FASTOPD_CPU_ARCH adds -march=<value>;
  FASTOPD_CUDA_ARCHS (default "9.0") picks the GPU archs;
  MAX_JOBS bounds ninja's parallel compiles (read by torch.utils.cpp_extension).
Without a compiler or torch the package still installs and runs on its pure-PyTorch path.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _note(msg: str) -> None:
    print(f"fastopd setup: {msg}", file=sys.stderr)


def _extensions():
    if os.environ.get("FASTOPD_BUILD_CPP", "1") == "0":
        _note("FASTOPD_BUILD_CPP=0: skipping the C++ extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _note("torch is not importable at build time: installing without fastopd._C "
              "(reinstall with `pip install --no-build-isolation .` to build it)")
        return [], {}

    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731  (setuptools wants paths relative to setup.py)
    sources = [rel(p) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    sources += [rel(p) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    cuda_sources = [rel(p) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]

    want_cuda = os.environ.get("FASTOPD_BUILD_CUDA")
    build_cuda = want_cuda == "1" or (want_cuda != "0" and torch.cuda.is_available())
    if build_cuda and torch.version.cuda is None:
        _note(f"CUDA requested but torch {torch.__version__} is a CPU build (torch.version.cuda is None; it ships no "
              "CUDA headers): building CPU kernels only; install a CUDA build of torch to build csrc/cuda")
        build_cuda = False
    if build_cuda and (CUDA_HOME is None or not glob.glob(os.path.join(CUDA_HOME, "lib64", "libcudart.so*"))):
        _note(f"CUDA requested but CUDA_HOME={CUDA_HOME!r} holds no lib64/libcudart.so: building CPU kernels only")
        build_cuda = False
    if build_cuda and not cuda_sources:
        build_cuda = False

    # The C++ standard is the one torch.utils.cpp_extension picks for this torch. No -march: hot kernels carry
    # their own ISA clones (AVX-512, AVX2, baseline) picked at load time, so a wheel runs on any x86-64.
    # -fno-trapping-math lets gcc vectorize the branch-free math (we never rely on FP exceptions);
    # unlike -ffast-math it keeps inf and NaN semantics, which masked (-inf) logits need.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    if os.environ.get("FASTOPD_CPU_ARCH"):
        cxx += ["-march=" + os.environ["FASTOPD_CPU_ARCH"]]
    extra = {"cxx": cxx}
    if build_cuda:
        archs = os.environ.get("FASTOPD_CUDA_ARCHS", "9.0").replace(";", " ").split()
        nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
        for a in archs:
            num = a.replace(".", "")
            nvcc += [f"-gencode=arch=compute_{num},code=sm_{num}"]
        extra["nvcc"] = nvcc
        ext = CUDAExtension("fastopd._C", sources + cuda_sources, extra_compile_args=extra,
                            extra_link_args=["-fopenmp"])
        _note(f"building fastopd._C with CUDA kernels for archs {archs} (CUDA_HOME={CUDA_HOME})")
    else:
        ext = CppExtension("fastopd._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])
        _note("building fastopd._C with C++ CPU kernels")
    class OptionalBuildExtension(BuildExtension):
        """A failed compile (no compiler, no toolkit) leaves the package on its pure-PyTorch path."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001 - any build failure degrades to the torch path
                _note(f"could not build fastopd._C ({type(exc).__name__}: {exc}); installing without it, "
                      "the pure-PyTorch path still works (`fastopd doctor` shows what is usable)")
                self.extensions = []

        def get_outputs(self):
            return [p for p in super().get_outputs() if os.path.exists(p)]

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


# `kernels/` (Triton only) installs as the subpackage fastopd.kernels: nothing installs a top-level `kernels`.
PACKAGES = find_packages(include=["fastopd", "fastopd.*"]) + ["fastopd.kernels"]
PACKAGE_DIR = {"fastopd": "fastopd", "fastopd.kernels": "kernels"}

# The built-in distillation task ships its small teacher and student checkpoints. PACKAGE_DATA alone says what
# data the wheel holds: with include_package_data (on by default) setuptools also takes MANIFEST.in's files under
# the package and warns, at length, that the asset folders are packages missing from `packages`.
PACKAGE_DATA = {"fastopd.train": ["assets/addition3/*/*"]}

ext_modules, cmdclass = _extensions()
# Hugging Face's `kernels` package (a dependency of transformers >= 5.25) registers a setuptools egg_info writer,
# `kernels._internals.locking`, which egg_info imports. Where this folder is on sys.path (`python setup.py ...`, or
# setuptools' build_meta called from a `python -c` run here) `kernels` is the repository's Triton folder and that
# import fails (No module named 'kernels._internals'), so setup() runs with the folder off the path; nothing here is
# imported from it.
_SYS_PATH = sys.path[:]
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != os.path.realpath(ROOT)]
try:
    setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA, include_package_data=False,
          ext_modules=ext_modules, cmdclass=cmdclass)
finally:
    sys.path[:] = _SYS_PATH
