import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")

import medt_keras  # noqa: E402,F401  (JAX backend before keras loads)
from medt_keras._backend import highest_matmul_precision  # noqa: E402

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
