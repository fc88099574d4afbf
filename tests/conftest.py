import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")

import medt_keras  # noqa: E402,F401  (JAX backend before keras loads)
from medt_keras._backend import highest_matmul_precision  # noqa: E402

# The tiny MedT-family model the library tests build (tests/training keeps
# its own): a 32nd of the official widths, 2 heads, one block per stage, on
# 32x32 images; each model takes seconds to build and run on a 2-core CPU.
TINY_MODEL = dict(width_scale=0.03125, groups=2, blocks=(1, 1, 1, 1))
TINY_IMG_SIZE = 32

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
OFFICIAL_TINY = os.path.join(FIXTURES, "official")
OFFICIAL_FULL = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "official", "full")
)


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
    # References are computed at full precision: no TF32 on GPU, no bfloat16
    # passes on TPU (nothing changes on CPU). The parity command does the
    # same (weights_converter.parity.measure_case).
    with highest_matmul_precision():
        yield
