"""The `fastopd` command line: one subcommand per module, each with add_arguments(parser) and run(args)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
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


def entry() -> None:
    """The `fastopd` console script and `python -m fastopd` / `python -m fastopd.cli`: `main()`, then the exit.

    A process whose `fastopd distill` ran distributed (torchrun, more than one rank) leaves through `os._exit` once
    the process group is destroyed and stdout, stderr and logging are flushed, skipping the interpreter's
    finalization: the run's files are complete by then, and after an FSDP2 run torch's gloo worker threads outlive
    `destroy_process_group()` (once DTensors have used it, torch keeps the group referenced from C++), so that a
    worker thread taking the GIL while the interpreter was torn down aborted the rank now and then, a finished
    run reported as failed ("terminate called without an active exception", SIGABRT; cf. pytorch/pytorch#190489).
    Every other command exits normally."""
    code = main()
    train_cli = sys.modules.get("fastopd.train.cli")
    if train_cli is not None and train_cli.distributed_run_closed:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said there
                pass
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
