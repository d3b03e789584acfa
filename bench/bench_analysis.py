"""Benchmark `fastopd analyze` on a synthesized pair of Llama-3.2-1B-shaped bf16 checkpoints.

Writes BASE and TUNED as Hugging Face folders (sharded safetensors + index) under --workdir, runs
`python -m fastopd.cli analyze` in a child process, and records its wall time and peak RSS (the child's
ru_maxrss: resident memory high-water mark, memory-mapped checkpoint pages included). The synthesized
checkpoints are deleted afterwards unless --keep.

    flock /tmp/fastopd_bench.lock python bench/bench_analysis.py --scale 1b      # the target (about 5 GB disk)
    python bench/bench_analysis.py --scale tiny                                  # quick iteration

TUNED = bf16(base + update), update = a rank-8 dense part plus a 1%-dense sparse part, so the report has
something to find; timing does not depend on the values.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SCALES = {
    # hidden, intermediate, layers, vocab, heads, kv heads (Llama-3.2-1B: 2048, 8192, 16, 128256, 32, 8)
    "1b": (2048, 8192, 16, 128256, 32, 8),
    "small": (512, 2048, 4, 32000, 8, 2),
    "tiny": (128, 352, 2, 1000, 4, 2),
}


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int, heads: int, kv_heads: int):
    kv = hidden // heads * kv_heads
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "self_attn.q_proj.weight", (hidden, hidden)
        yield p + "self_attn.k_proj.weight", (kv, hidden)
        yield p + "self_attn.v_proj.weight", (kv, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, hidden)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)


_CHILD = ("import sys\nfrom fastopd.cli import main\nrc = main(sys.argv[1:])\n"
          "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1]\n"
          "print('VMHWM_KIB', hwm, file=sys.stderr)\nsys.exit(rc)")


def synthesize(workdir: Path, scale: str, shard_bytes: int = 1 << 30, seed: int = 0) -> int:
    """Write base/ and tuned/ HF folders; returns the parameter count."""
    g = torch.Generator().manual_seed(seed)
    (workdir / "base").mkdir(parents=True, exist_ok=True)
    (workdir / "tuned").mkdir(parents=True, exist_ok=True)
    shards: list[tuple[dict, dict]] = [({}, {})]
    size = total = 0
    for name, shape in llama_shapes(*SCALES[scale]):
        if size > shard_bytes:
            shards.append(({}, {}))
            size = 0
        if len(shape) == 1:
            base = torch.ones(shape) + 0.05 * torch.randn(shape, generator=g)
            upd = 1e-3 * torch.randn(shape, generator=g)
        else:
            base = 0.02 * torch.randn(shape, generator=g)
            m, n = shape
            upd = (torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)) * (2e-5 / 8 ** 0.5)
            sparse = torch.rand(shape, generator=g) < 0.01
            upd += sparse * 2e-3 * torch.randn(shape, generator=g)
        b16 = base.bfloat16()
        shards[-1][0][name] = b16
        shards[-1][1][name] = (b16.float() + upd).bfloat16()
        del base, upd
        size += b16.numel() * 2
        total += b16.numel()
    n = len(shards)
    for which, i in (("base", 0), ("tuned", 1)):
        weight_map = {}
        for k, pair in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            save_file(pair[i], str(workdir / which / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in pair[i]})
        (workdir / which / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total * 2}, "weight_map": weight_map}))
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    ap.add_argument("--workdir", default="/tmp/fastopd_bench_analysis")
    ap.add_argument("--results", default=None, help="results JSON (default: bench/results/analysis_<scale>.json)")
    ap.add_argument("--null-models", default="sample")
    ap.add_argument("--keep", action="store_true", help="keep the synthesized checkpoints")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    try:
        t0 = time.perf_counter()
        params = synthesize(work, args.scale)
        synth_s = time.perf_counter() - t0
        gc.collect()
        # The child reports its own VmHWM (peak resident set of its address space, reset at exec): ru_maxrss
        # of children also carries the parent's high-water mark across fork+exec, so it would count synthesis.
        cmd = [sys.executable, "-c", _CHILD, "analyze", str(work / "base"), str(work / "tuned"),
               "--out", str(work / "report"), "--null-models", args.null_models, "--mask-out",
               str(work / "masks.safetensors"), "--quiet"]
        t0 = time.perf_counter()
        # cwd: not the caller's folder, which may be the checkout's root (its fastopd/ shadows the install).
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak_kib = int(proc.stderr.rsplit("VMHWM_KIB", 1)[1].split()[0]) if "VMHWM_KIB" in proc.stderr else None
        load = os.getloadavg()
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return proc.returncode
        report = json.loads((work / "report" / "report.json").read_text())
        result = {
            "benchmark": "fastopd analyze on synthesized Llama-shaped bf16 checkpoint pair",
            "scale": args.scale, "shapes": dict(zip(("hidden", "intermediate", "layers", "vocab", "heads",
                                                     "kv_heads"), SCALES[args.scale])),
            "parameters": params, "checkpoint_bytes_each": params * 2, "null_models": args.null_models,
            "null_tensors": report["summary"]["null_tensors"], "tensors": report["summary"]["tensors"],
            "wall_s": round(wall, 1), "analysis_s_reported": round(report["meta"]["seconds"], 1),
            "peak_rss_gib": round(peak_kib / 2**20, 3) if peak_kib else None,
            "peak_rss_source": "VmHWM of the analysis process (/proc/self/status at exit)",
            "synthesize_s": round(synth_s, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "load_average_1_5_15_at_end": [round(x, 2) for x in load],
            "targets": {"wall_s": 600, "peak_rss_gib": 4.0},
            "command": "fastopd " + " ".join(cmd[3:]).replace(str(work), "$WORK"),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": os.cpu_count(), "torch_threads": report["meta"]["torch_threads"]},
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "stdout_tail": proc.stdout.strip().splitlines()[-8:],
        }
        out = Path(args.results or Path(__file__).parent / "results" / f"analysis_{args.scale}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        md = out.with_suffix(".md")
        md.write_text(
            f"| scale | parameters | null-model tensors | wall (s) | CPU user+sys (s) | peak RSS (GiB) | load avg |\n"
            f"|---|---|---|---|---|---|---|\n| {args.scale} | {params:,} | {result['null_tensors']} "
            f"| {result['wall_s']} | {result['cpu_s']} | {result['peak_rss_gib']} "
            f"| {result['load_average_1_5_15_at_end']} |\n\n"
            f"`python bench/bench_analysis.py --scale {args.scale}` on {result['machine']['cpus']} CPUs"
            f", torch {torch.__version__}, {result['date']}. Targets for 1b: < 600 s wall, < 4 GiB peak RSS.\n")
        print(json.dumps({k: result[k] for k in ("scale", "parameters", "wall_s", "cpu_s", "peak_rss_gib",
                                                 "null_tensors")}))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
