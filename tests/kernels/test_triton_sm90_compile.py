"""Compile the Triton kernels ahead of time for sm_90 (H100) on any machine, GPU or not.

The interpreter that runs the kernels on the CPU accepts programs the real compiler rejects (types that change
across a loop, unsupported ops, layouts), so CI also lowers every kernel variant through Triton's NVIDIA backend
to a cubin with its bundled ptxas; no GPU is needed. The compile runs in a subprocess because the kernels must be
imported with TRITON_INTERPRET unset to be compilable. Skips with a reason when that backend or ptxas is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton")

# Runs in a fresh interpreter: compiles the (module, kernel, signature, constexprs, num_warps) jobs from stdin.
_COMPILER = r"""
import importlib, json, sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print(json.dumps({"skip": f"this Triton has no ahead-of-time compile API: {exc}"})); sys.exit(0)
import glob, os, re, subprocess
tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
cuobjdump = os.path.join(tools, "cuobjdump")
def stack_bytes(cubin):
    # ptxas spills go to the stack frame: STACK in cuobjdump's resource report (None when it cannot run).
    if not os.path.exists(cuobjdump):
        return None
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin); f.flush()
        rep = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"STACK:(\d+)", rep)
    return int(m.group(1)) if m else None
ptxas = os.path.join(tools, "ptxas")
def spill_stores(ptx):
    # ptxas -v reports "N bytes spill stores" per function: the register spills themselves (None when it cannot run)
    if not os.path.exists(ptxas):
        return None
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        open(src, "w").write(ptx)
        target = re.search(r"\.target (sm_\w+)", ptx)  # sm_90a: what Triton targets on Hopper
        arch = target.group(1) if target else "sm_90"
        rep = subprocess.run([ptxas, f"-arch={arch}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True).stderr
    found = [int(x) for x in re.findall(r"(\d+) bytes spill stores", rep)]
    return max(found) if found else None
out = []
for job in json.load(sys.stdin):
    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    sig = dict(job["signature"]); sig.update({k: "constexpr" for k in job["constexprs"]})
    try:
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=job["constexprs"]),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": job["num_warps"], "num_stages": job.get("num_stages", 3)})
    except Exception as exc:
        msg = str(exc)
        if "ptxas" in msg.lower() and ("not found" in msg.lower() or "no such file" in msg.lower()):
            print(json.dumps({"skip": f"Triton's NVIDIA backend lacks ptxas here: {msg[:200]}"})); sys.exit(0)
        out.append({"id": job["id"], "error": f"{type(exc).__name__}: {msg}"}); continue
    out.append({"id": job["id"], "cubin_bytes": len(c.asm["cubin"]), "sm90": ".target sm_90" in c.asm["ptx"],
                "local": ".local" in c.asm["ptx"], "stack": stack_bytes(c.asm["cubin"]),
                "spill_stores": spill_stores(c.asm["ptx"]), "tf32": ".tf32" in c.asm["ptx"],
                "shared": c.metadata.shared})
print(json.dumps({"results": out}))
"""


def compile_for_sm90(jobs: list[dict]) -> dict[str, dict]:
    """{job id: result} for each job; skips the test when this machine cannot compile for sm_90 at all."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # From an empty folder: `python -c` puts its working directory first on sys.path, and from the checkout's root
    # the source fastopd/ (no kernels/ under it, no _C) would shadow a non-editable install.
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run([sys.executable, "-c", _COMPILER], input=json.dumps(jobs), capture_output=True,
                              text=True, env=env, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in answer:
        pytest.skip(answer["skip"])
    return {r["id"]: r for r in answer["results"]}


# Bytes of stack frame tolerated: device_assert's call frame needs a few. Register spills are counted apart, from
# ptxas -v's "bytes spill stores", and must be 0 except where KNOWN_SPILLS records a measured one.
MAX_STACK = 16
# Spills measured and accepted, by Triton release (id -> bytes): a speed cost in variants that 3.8 and 3.9 compile
# without (docs/gpu.md). Triton 3.6 is what torch 2.11 pins (the lent H200's stack), 3.7 what torch 2.12 pins.
_TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2])
_SPILLS_BY_TRITON: dict[tuple[int, int], dict[str, int]] = {
    (3, 6): {"rkl-all-options": 16, "_tiled_lse_kernel-bf16-student-fp32-teacher": 16},
    (3, 7): {"_tiled_grad_kernel-{'DIV': 1, 'HARD_T': False}-fp32": 16,
             "_tiled_grad_kernel-{'DIV': 1, 'HARD_T': True}-fp32": 8,
             "_tiled_lse_kernel-bf16-student-fp32-teacher": 8},
}
KNOWN_SPILLS = _SPILLS_BY_TRITON.get(_TRITON, {})


def assert_no_spills(job_id: str, r: dict) -> None:
    assert "error" not in r, f"{job_id}: {r.get('error')}"
    assert r["sm90"] and r["cubin_bytes"] > 0, job_id
    assert not r["local"] and (r["stack"] is None or r["stack"] <= MAX_STACK), f"{job_id} stack frame: {r}"
    allowed = KNOWN_SPILLS.get(job_id, 0)
    assert r["spill_stores"] is None or r["spill_stores"] <= allowed, f"{job_id} spills: {r}"

ROW_SIGNATURE = {
    "xs_ptr": "*fp32", "xt_ptr": "*fp32", "labels_ptr": "*i64", "loss_ptr": "*fp32", "stats_ptr": "*fp32",
    "V": "i32", "stride_s": "i32", "stride_t": "i32", "beta": "fp32", "inv_temp": "fp32", "temperature": "fp32",
    "softcap": "fp32", "inv_softcap": "fp32", "soft_weight": "fp32", "hard_weight": "fp32", "ignore_index": "i32",
    "hard_ratio": "fp32",
}


def test_divergence_row_kernel_compiles_for_sm90():
    """Every divergence, with all options off and all on, lowers to an sm_90 cubin without register spills."""
    jobs = []
    for div, name in enumerate(["fkl", "rkl", "jsd"]):
        for everything in (False, True):
            jobs.append({"id": f"{name}-{'all-options' if everything else 'plain'}",
                         "module": "fastopd.kernels.divergence", "kernel": "_divergence_row_kernel",
                         "signature": ROW_SIGNATURE, "num_warps": 8,
                         "constexprs": {"DIV": div, "HAS_LABELS": everything, "HARD": everything,
                                        "HARD_T": everything, "SOFTCAP": everything, "COMPUTE_GRAD": True,
                                        "BLOCK_V": 2048}})
    results = compile_for_sm90(jobs)
    for job in jobs:
        assert_no_spills(job["id"], results[job["id"]])


VP_SIGNATURE = {
    "xs_ptr": "*fp32", "xt_ptr": "*fp32", "y_ptr": "*i64", "info_ptr": "*fp32", "out_ptr": "*fp64",
    "V": "i32", "stride_s": "i32", "stride_t": "i32", "beta": "fp32", "inv_temp": "fp32", "temperature": "fp32",
    "softcap": "fp32", "inv_softcap": "fp32", "soft_weight": "fp32", "hw": "fp32", "hard_ratio": "fp32",
}


def test_vocab_parallel_phases_compile_for_sm90():
    """The vocab-parallel phases (phase 1 writes fp64, phase 2 fp32 sums, phase 3 only the gradient) of every
    divergence with all options on lower to sm_90 cubins without register spills."""
    jobs = []
    for phase in (1, 2, 3):
        for div, name in enumerate(["fkl", "rkl", "jsd"]):
            if phase == 3 and div == 0:
                continue  # fkl writes its gradient in phase 2
            sig = dict(VP_SIGNATURE, out_ptr="*fp64" if phase == 1 else "*fp32")
            jobs.append({"id": f"phase{phase}-{name}", "module": "fastopd.kernels.vocab_parallel",
                         "kernel": "_vocab_parallel_kernel", "signature": sig, "num_warps": 8,
                         "constexprs": {"PHASE": phase, "DIV": div, "HARD": True, "HARD_T": True, "SOFTCAP": True,
                                        "COMPUTE_GRAD": True, "BLOCK_V": 2048}})
    results = compile_for_sm90(jobs)
    for job in jobs:
        assert_no_spills(job["id"], results[job["id"]])


def _tiled_signature(dtype: str, kernel: str) -> dict[str, str]:
    ptr = f"*{dtype}"
    sig = {"hs_ptr": ptr, "ws_ptr": ptr, "bs_ptr": ptr, "ht_ptr": ptr, "wt_ptr": ptr, "bt_ptr": ptr}
    if kernel == "_tiled_lse_kernel":
        sig.update({"labels_ptr": "*i64", "part_ptr": "*fp32", "sums_ptr": "*fp64"})
    elif kernel == "_tiled_sums_kernel":
        sig.update({"row_ptr": "*fp32", "part_ptr": "*fp32"})
    else:
        sig.update({"labels_ptr": "*i64", "row_ptr": "*fp32", "gh_ptr": "*fp32", "gw_ptr": "*fp32", "gb_ptr": "*fp32",
                    "skip_ptr": "*i32"})
    sig.update({k: "i32" for k in ("N", "V", "Ds", "Dt", "stride_hs", "stride_ws", "stride_ht", "stride_wt",
                                   "blocks_per_split")})
    floats = {"_tiled_lse_kernel": ["inv_temp", "softcap", "inv_softcap"],
              "_tiled_sums_kernel": ["beta", "omb", "inv_temp", "softcap", "inv_softcap"],
              "_tiled_grad_kernel": ["beta", "omb", "inv_temp", "temperature", "softcap", "inv_softcap",
                                     "soft_weight", "hard_weight"]}[kernel]
    sig.update({k: "fp32" for k in floats})
    if kernel != "_tiled_sums_kernel":
        sig["ignore_index"] = "i32"
    if kernel == "_tiled_grad_kernel":
        sig["skip_threshold"] = "fp32"
    if kernel != "_tiled_sums_kernel":
        sig["hard_ratio"] = "fp32"
    return sig


def test_tiled_kernels_compile_for_sm90():
    """The tiled kernels at the shipped GPU tile sizes (kernels.tiled.default_config), all options on: every
    kernel in bf16 (the benchmark dtype), the lse and heaviest grad variant also in fp32, each with and without a
    hard-label temperature of its own where that changes the kernel. No register spills."""
    from fastopd.kernels.tiled import GPU_CONFIG_16BIT, GPU_CONFIG_FP32, TiledConfig

    jobs = []
    for kernel, dtype, extra in [
        ("_tiled_lse_kernel", "bf16", {"HAS_LABELS": True, "HARD_T": False}),
        ("_tiled_lse_kernel", "bf16", {"HAS_LABELS": True, "HARD_T": True}),
        ("_tiled_lse_kernel", "fp32", {"HAS_LABELS": True, "HARD_T": True}),
        ("_tiled_sums_kernel", "bf16", {"DIV": 1}),
        ("_tiled_sums_kernel", "bf16", {"DIV": 2}),
        ("_tiled_grad_kernel", "bf16", {"DIV": 0, "HARD_T": False}),
        ("_tiled_grad_kernel", "bf16", {"DIV": 2, "HARD_T": False}),
        ("_tiled_grad_kernel", "bf16", {"DIV": 2, "HARD_T": True}),
        ("_tiled_grad_kernel", "fp32", {"DIV": 1, "HARD_T": False}),
        ("_tiled_grad_kernel", "fp32", {"DIV": 1, "HARD_T": True}),
    ]:
        gpu = TiledConfig(*(GPU_CONFIG_FP32 if dtype == "fp32" else GPU_CONFIG_16BIT), 1)
        constexprs = {"HAS_BIAS_S": True, "HAS_BIAS_T": True, "SOFTCAP": True, "BLOCK_N": gpu.block_n,
                      "BLOCK_V": gpu.block_v, "BLOCK_D": gpu.block_d, "PRECISION": "ieee" if dtype == "fp32" else None}
        if kernel == "_tiled_grad_kernel":
            constexprs.update({"HAS_LABELS": True, "HARD": True, "GRAD_H": True, "GRAD_W": True, "GRAD_B": True})
        constexprs.update(extra)
        jobs.append({"id": f"{kernel}-{extra}-{dtype}", "module": "fastopd.kernels.tiled", "kernel": kernel,
                     "signature": _tiled_signature(dtype, kernel), "num_warps": gpu.num_warps,
                     "num_stages": gpu.num_stages, "constexprs": constexprs})
    results = compile_for_sm90(jobs)
    for job in jobs:
        assert_no_spills(job["id"], results[job["id"]])


def test_tiled_bf16_student_with_fp32_teacher_multiplies_in_ieee_fp32():
    """A bf16 student beside an fp32 teacher: the tiles follow the fp32 configuration and the teacher's products
    are IEEE fp32 (Triton's default on NVIDIA, TF32, would round the teacher's logits to a 10-bit mantissa)."""
    import torch
    from fastopd.kernels.tiled import GPU_CONFIG_FP32, TiledConfig, _precision, tile_dtype

    hs, ht = torch.zeros(1, 2, dtype=torch.bfloat16), torch.zeros(1, 2)
    assert tile_dtype(hs, ht) == torch.float32 and _precision(hs, ht) == "ieee"
    gpu = TiledConfig(*GPU_CONFIG_FP32, 1)
    jobs = []
    for kernel in ("_tiled_lse_kernel", "_tiled_sums_kernel", "_tiled_grad_kernel"):
        sig = _tiled_signature("bf16", kernel)
        sig.update({"ht_ptr": "*fp32", "wt_ptr": "*fp32", "bt_ptr": "*fp32"})
        constexprs = {"HAS_BIAS_S": True, "HAS_BIAS_T": True, "SOFTCAP": True, "BLOCK_N": gpu.block_n,
                      "BLOCK_V": gpu.block_v, "BLOCK_D": gpu.block_d, "PRECISION": _precision(hs, ht)}
        constexprs.update({"_tiled_lse_kernel": {"HAS_LABELS": True, "HARD_T": False},
                           "_tiled_sums_kernel": {"DIV": 2},
                           "_tiled_grad_kernel": {"DIV": 2, "HARD_T": False, "HAS_LABELS": True, "HARD": True,
                                                  "GRAD_H": True, "GRAD_W": True, "GRAD_B": True}}[kernel])
        jobs.append({"id": f"{kernel}-bf16-student-fp32-teacher", "module": "fastopd.kernels.tiled", "kernel": kernel,
                     "signature": sig, "num_warps": gpu.num_warps, "num_stages": gpu.num_stages,
                     "constexprs": constexprs})
    results = compile_for_sm90(jobs)
    for job in jobs:
        r = results[job["id"]]
        assert_no_spills(job["id"], r)
        assert not r["tf32"], f"{job['id']}: TF32 products in the PTX"
