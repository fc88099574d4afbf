"""The old home of ``medt-bench``, kept so ``python -m training.benchmark ...`` still works: see ``training.bench``."""

import sys

from training.bench.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
