"""``python -m training.bench``: the ``medt-bench`` command."""

import sys

from training.bench.cli import main

sys.exit(main())
