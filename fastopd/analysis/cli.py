"""`fastopd analyze BASE TUNED`: measure how a run changed the weights; report.json, report.md, plots, mask."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from fastopd._io import folder_write_problem
from fastopd.analysis.analyze import NULL_MODES, AnalysisInputError, MismatchError, analyze_update
from fastopd.analysis.io import CheckpointError
from fastopd.analysis.report import NO_UPDATE, no_null_line, nonfinite_line
from fastopd.analysis.stats import AnalysisConfig

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
SEED_LIMIT = 1 << 43  # |seed| below this: stats._gen's seed * 1_000_003 + crc32 stays in torch.Generator's range


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = AnalysisConfig()
    parser.add_argument("base", help="base checkpoint: HF model folder, .safetensors file, or torch state dict")
    parser.add_argument("tuned", help="tuned checkpoint (same forms)")
    parser.add_argument("--out", default="fastopd-analysis",
                        help="output folder, created if missing; checked to be writable before the analysis "
                        "(default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="storage dtype to form Delta in; auto: the checkpoints' own (default: %(default)s)")
    parser.add_argument("--atol", type=float, nargs="+", default=list(d.atols),
                        help="absolute tolerances, each finite and >= 0, for density |Delta| > atol "
                        "(0: any nonzero Delta) (default: %(default)s)")
    parser.add_argument("--tau", type=float, nargs="+", default=list(d.taus),
                        help="relative tolerances, each finite and > 0: fraction with |Delta| < tau * RMS(base) "
                        "(default: %(default)s)")
    parser.add_argument("--null-models", choices=NULL_MODES, default="sample",
                        help="null models on a sample of tensors (first/middle/last layer per module kind, among the "
                        "changed tensors of up to 2^26 elements), all, or none (no findings) (default: %(default)s)")
    parser.add_argument("--mask-out", metavar="MASKS.safetensors",
                        help="write the changed-coordinate mask (fastopd.masks.v1) for fastopd.optim.masks; its "
                        "folder is created if missing and checked to be writable before the analysis")
    parser.add_argument("--mask-atol", type=float, default=None,
                        help="mask = |Delta| > this (finite, >= 0) instead of bitwise changed")
    parser.add_argument("--allow-partial", action="store_true",
                        help="analyse the common tensors when names or shapes differ (listed in the report)")
    parser.add_argument("--include", metavar="REGEX", help="analyse only tensors whose name matches")
    parser.add_argument("--exclude", metavar="REGEX", help="skip tensors whose name matches")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the null models, |seed| < 2^43 (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads, a positive integer (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _option_error(args: argparse.Namespace) -> str | None:
    """The first option whose value is outside its meaning (see the help texts), or None."""
    for a in args.atol:
        if not (math.isfinite(a) and a >= 0):
            return f"--atol {a:g}: absolute tolerances must be finite and >= 0"
    for t in args.tau:
        if not (math.isfinite(t) and t > 0):
            return (f"--tau {t:g}: relative tolerances must be finite and > 0 "
                    f"(|Delta| < tau * RMS(base) holds nowhere for tau <= 0)")
    if args.mask_atol is not None and not (math.isfinite(args.mask_atol) and args.mask_atol >= 0):
        return f"--mask-atol {args.mask_atol:g}: the mask tolerance must be finite and >= 0"
    if args.threads is not None and args.threads < 1:
        return f"--threads {args.threads}: the number of torch threads must be a positive integer"
    if not -SEED_LIMIT < args.seed < SEED_LIMIT:
        return f"--seed {args.seed}: the seed must satisfy |seed| < 2^43"
    return None


def _writable_folder(folder: Path, option: str, created: list[Path]) -> str | None:
    """Create `folder` (appending the folders made to `created`, deepest first) and probe-write a temporary file in
    it, removed again; the error text (naming `option`) when that fails, else None."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    why = folder_write_problem(folder)
    created += [p for p in missing if p.is_dir()]
    return None if why is None else f"{option}: {str(folder)!r}: {why}"


def _output_error(args: argparse.Namespace, created: list[Path]) -> str | None:
    """Check that --out and --mask-out can be written, creating their folders (listed in `created`)."""
    if args.mask_out is not None:
        mask = Path(args.mask_out)
        if mask.is_dir():
            return f"--mask-out: {args.mask_out!r} is a folder, not a file name"
        if mask.exists():
            if not mask.is_file():
                return f"--mask-out: {args.mask_out!r} exists and is not a regular file"
            for side, ckpt in (("BASE", args.base), ("TUNED", args.tuned)):
                if os.path.exists(ckpt) and os.path.samefile(mask, ckpt):
                    return f"--mask-out: {args.mask_out!r} is the {side} checkpoint"
        error = _writable_folder(mask.parent, "--mask-out", created)
        if error:
            return error
    return _writable_folder(Path(args.out), "--out", created)


def _remove_created(created: list[Path]) -> None:
    """Remove the folders the output checks made, where they are still empty (deepest first)."""
    for folder in sorted(set(created), key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:
            pass


def _fail(message: str) -> int:
    print(f"fastopd analyze: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    error = _option_error(args)
    if error:
        return _fail(error)
    created: list[Path] = []
    ok = False
    try:
        error = _output_error(args, created)
        if error:
            return _fail(error)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        cfg = AnalysisConfig(atols=tuple(args.atol), taus=tuple(args.tau), seed=args.seed, mask_atol=args.mask_atol)
        try:
            report = analyze_update(args.base, args.tuned, dtype=DTYPES[args.dtype], config=cfg,
                                    null_models=args.null_models, allow_partial=args.allow_partial,
                                    include=args.include, exclude=args.exclude, mask_out=args.mask_out,
                                    progress=not args.quiet)
        except (AnalysisInputError, CheckpointError, MismatchError) as exc:
            return _fail(str(exc))
        ok = True
    finally:
        if not ok:
            _remove_created(created)
    try:
        written = report.write(args.out, plots=not args.no_plots)
    except OSError as exc:
        return _fail(f"--out: writing the report into {args.out!r} failed: {exc}"
                     + (f" (the mask {args.mask_out!r} was written)" if args.mask_out else ""))
    s = report.summary
    print(f"analysed {s['tensors']} tensors ({s['numel']:,} parameters) in {report.meta['seconds']:.1f} s: "
          f"{s['density_exact']:.4g} of coordinates changed; FFN share: {s['ffn_share_params']:.3g} of parameters, "
          f"{s['ffn_share_updated'] or 0:.3g} of changed coordinates, {s['ffn_share_energy'] or 0:.3g} of energy")
    if s["nonfinite_tensors"]:
        print(f"  ! non-finite values, taken as 0 in energies and spectra: {nonfinite_line(s)}")
    if s["changed"] == 0:
        print(f"  ! {NO_UPDATE}")
    elif (why := no_null_line(report)) is not None:
        print(f"  ! {why}")
    for side, why in (report.meta.get("renamed") or {}).items():
        print(f"  (names of {side.upper()}: {'; '.join(why)})")
    for f in report.findings:
        print(f"  - {f['claim']}: {f['verdict']}")
    if report.mismatches:
        print("  (partial: " + ", ".join(f"{k} {len(v)}" for k, v in report.mismatches.items()) + ")")
    print("wrote " + ", ".join(str(p) for p in written + ([args.mask_out] if args.mask_out else [])))
    return 0
