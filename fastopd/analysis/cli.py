"""`fastopd analyze BASE TUNED`: measure how a run changed the weights; report.json, report.md, plots, mask."""

from __future__ import annotations

import argparse
import sys

import torch

from fastopd.analysis.analyze import NULL_MODES, AnalysisInputError, MismatchError, analyze_update
from fastopd.analysis.io import CheckpointError
from fastopd.analysis.report import nonfinite_line
from fastopd.analysis.stats import AnalysisConfig

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = AnalysisConfig()
    parser.add_argument("base", help="base checkpoint: HF model folder, .safetensors file, or torch state dict")
    parser.add_argument("tuned", help="tuned checkpoint (same forms)")
    parser.add_argument("--out", default="fastopd-analysis", help="output folder (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="storage dtype to form Delta in; auto: the checkpoints' own (default: %(default)s)")
    parser.add_argument("--atol", type=float, nargs="+", default=list(d.atols),
                        help="absolute tolerances for density |Delta| > atol (default: %(default)s)")
    parser.add_argument("--tau", type=float, nargs="+", default=list(d.taus),
                        help="relative tolerances: fraction with |Delta| < tau * RMS(base) (default: %(default)s)")
    parser.add_argument("--null-models", choices=NULL_MODES, default="sample",
                        help="null models on a sample of tensors (first/middle/last layer per module kind, tensors "
                        "up to 2^26 elements), all, or none (default: %(default)s)")
    parser.add_argument("--mask-out", metavar="MASKS.safetensors",
                        help="write the changed-coordinate mask (fastopd.masks.v1) for fastopd.optim.masks")
    parser.add_argument("--mask-atol", type=float, default=None,
                        help="mask = |Delta| > this instead of bitwise changed")
    parser.add_argument("--allow-partial", action="store_true",
                        help="analyse the common tensors when names or shapes differ (listed in the report)")
    parser.add_argument("--include", metavar="REGEX", help="analyse only tensors whose name matches")
    parser.add_argument("--exclude", metavar="REGEX", help="skip tensors whose name matches")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--seed", type=int, default=0, help="seed of the null models (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = AnalysisConfig(atols=tuple(args.atol), taus=tuple(args.tau), seed=args.seed, mask_atol=args.mask_atol)
    try:
        report = analyze_update(args.base, args.tuned, dtype=DTYPES[args.dtype], config=cfg,
                                null_models=args.null_models, allow_partial=args.allow_partial,
                                include=args.include, exclude=args.exclude, mask_out=args.mask_out,
                                progress=not args.quiet)
    except (AnalysisInputError, CheckpointError, MismatchError) as exc:
        print(f"fastopd analyze: error: {exc}", file=sys.stderr)
        return 2
    written = report.write(args.out, plots=not args.no_plots)
    s = report.summary
    print(f"analysed {s['tensors']} tensors ({s['numel']:,} parameters) in {report.meta['seconds']:.1f} s: "
          f"{s['density_exact']:.4g} of coordinates changed; FFN share: {s['ffn_share_params']:.3g} of parameters, "
          f"{s['ffn_share_updated'] or 0:.3g} of changed coordinates, {s['ffn_share_energy'] or 0:.3g} of energy")
    if s["nonfinite_tensors"]:
        print(f"  ! non-finite values, taken as 0 in energies and spectra: {nonfinite_line(s)}")
    for f in report.findings:
        print(f"  - {f['claim']}: {f['verdict']}")
    if report.mismatches:
        print("  (partial: " + ", ".join(f"{k} {len(v)}" for k, v in report.mismatches.items()) + ")")
    print("wrote " + ", ".join(str(p) for p in written + ([args.mask_out] if args.mask_out else [])))
    return 0
