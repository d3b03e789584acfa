"""Repository-wide pytest setup, loaded for tests/ and bench/ alike (pytest reads the rootdir's conftest first).

The repository's kernels/ (installed as fastopd.kernels) is a package named `kernels` at the repository root, which
`python -m pytest` and `python -c "...pytest.main()"` put on sys.path: there it shadows Hugging Face's `kernels`
package, which transformers >= 5.25 imports when it builds a model (ImportError: cannot import name
'CUDAProperties' from 'kernels'). fastopd itself is imported through its installation, so the root is not needed
on the path."""

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]
