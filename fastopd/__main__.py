"""`python -m fastopd ...`: the `fastopd` command (also where no console script is on PATH, and under torchrun)."""

import sys

from fastopd.cli import main

if __name__ == "__main__":
    sys.exit(main())
