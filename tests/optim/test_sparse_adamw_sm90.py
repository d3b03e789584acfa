"""The Triton sparse AdamW kernel lowered ahead of time to an sm_90 (H100) cubin, on any machine.

The interpreter that runs it on the CPU in CI accepts programs the real compiler rejects, so every variant used by
the optimizer is also compiled through Triton's NVIDIA backend (no GPU needed; skips when the backend is absent).
Uses the compile helper of tests/kernels/test_triton_sm90_compile.py.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

pytest.importorskip("triton")

_HELPER = os.path.join(os.path.dirname(__file__), "..", "kernels", "test_triton_sm90_compile.py")


def _helper():
    if not os.path.exists(_HELPER):
        pytest.skip("tests/kernels/test_triton_sm90_compile.py (the sm_90 compile helper) is not present")
    spec = importlib.util.spec_from_file_location("_fastopd_sm90_compile", _HELPER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sparse_adamw_kernel_compiles_for_sm90():
    helper = _helper()
    jobs = []
    for dtype in ("fp32", "bf16", "fp16"):
        for has_index, index in ((True, "i32"), (True, "i64"), (False, "i64")):
            low = dtype != "fp32"
            sig = {"table_ptr": "*i64", "coef_ptr": "*fp32", "block_tensor_ptr": "*i32", "block_start_ptr": "*i64",
                   "param_like_ptr": f"*{dtype}", "index_like_ptr": f"*{index}"}
            sig.update({k: "fp32" for k in ("decay", "w", "beta2", "one_minus_beta2", "eps")})
            jobs.append({"id": f"{dtype}-{index if has_index else 'full'}", "module": "fastopd.kernels.sparse_adamw",
                         "kernel": "_sparse_adamw_kernel", "signature": sig, "num_warps": 4,
                         "constexprs": {"HAS_INDEX": has_index, "HAS_MASTER": low, "COUNT": low, "DECAY": True,
                                        "W_SMALL": True, "IS_BF16": dtype == "bf16", "COLS": 8, "BLOCK": 1024}})
    results = helper.compile_for_sm90(jobs)
    for job in jobs:
        r = results[job["id"]]
        assert "error" not in r, f"{job['id']}: {r.get('error')}"
        assert r["sm90"] and r["cubin_bytes"] > 0, job["id"]
        assert not r["local"], f"{job['id']} spills: {r}"
