"""The `fastopd` command line: one subcommand per module, each with add_arguments(parser) and run(args)."""

from __future__ import annotations

import argparse
import importlib
import re
import sys

# What argparse takes for a negative number rather than an option: its own pattern misses exponents and inf/nan
# ("--tau -1e-3" was "expected one argument", not the tolerance's own range error). Python 3.13's is close to this.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

# name -> (module, one-line help). Modules are imported only when their subcommand runs or --help is built.
SUBCOMMANDS = {
    "distill": ("fastopd.train.cli", "on-policy distillation: the built-in addition task on the CPU in minutes"),
    "bench": ("fastopd.bench", "benchmark the fused loss against naive PyTorch, Liger-Kernel, TRL and the GEMM floor"),
    "analyze": ("fastopd.analysis.cli", "measure how a run changed the weights: sparsity, spectra, null models"),
    "doctor": ("fastopd.doctor", "print versions and which backends (torch, C++ CPU, Triton, CUDA) are usable here"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; subcommand modules are imported only for `only` (all of them when None)."""
    from fastopd import __version__

    parser = argparse.ArgumentParser(prog="fastopd", description="fastopd: fast on-policy distillation.")
    parser.add_argument("--version", action="version", version=f"fastopd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p._negative_number_matcher = _NEGATIVE_NUMBER  # argparse's hook (a private attribute since Python 2.7)
        if only is None or name == only:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=chosen if chosen in SUBCOMMANDS else "")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
