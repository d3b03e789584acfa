"""`python -m fastopd ...`: the `fastopd` command (also where no console script is on PATH, and under torchrun)."""

from fastopd.cli import entry

if __name__ == "__main__":
    entry()
