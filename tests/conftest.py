import os
import shutil
import tempfile

import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
# The suite runs on the CPU. The test install brings libtpu (the "aot" extra, for the TPU
# compile tests), with which JAX would otherwise try to start a TPU in every process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The processes the tests launch (medt-train runs killed and resumed, the
# multi-device and multi-process workers) compile the same programs again
# and again: they share one JAX compilation cache for the session, made by
# the first pytest process and inherited by the xdist workers and every
# process they start. A launch of the tiny training run drops from about
# 28 s to 12 s once its programs are cached. Only launched processes use it:
# JAX reads JAX_COMPILATION_CACHE_DIR when it is imported, and it is set
# here after that, so the pytest processes themselves compile afresh (some
# tests count their compilations).
_SESSION_CACHE = "MEDT_TESTS_COMPILATION_CACHE"
_made_cache = not os.environ.get(_SESSION_CACHE)
if _made_cache:
    os.environ[_SESSION_CACHE] = tempfile.mkdtemp(prefix="medt-keras-tests-jax-cache-")
if os.environ.get("JAX_COMPILATION_CACHE_DIR") == os.environ[_SESSION_CACHE]:
    del os.environ["JAX_COMPILATION_CACHE_DIR"]  # inherited from the first pytest process: not for this one

import medt_keras  # noqa: E402,F401  (JAX backend before keras loads)
from medt_keras._backend import highest_matmul_precision  # noqa: E402

os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_SESSION_CACHE]


def fast_first(values, count=1):
    """``values`` for ``parametrize``, all but the first ``count`` marked ``slow``.

    The fast tier (``-m "not slow"``) samples a parametrized test; the full
    suite runs every value. ``pytest.param`` values keep their ids and marks.
    """
    params = []
    for index, value in enumerate(values):
        if index < count:
            params.append(value)
        elif isinstance(value, type(pytest.param(None))):
            params.append(pytest.param(*value.values, id=value.id, marks=[*value.marks, pytest.mark.slow]))
        else:
            params.append(pytest.param(value, marks=pytest.mark.slow))
    return params
# Every program, however fast to compile: the tiny models' many small ones add up.
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_collection_modifyitems(config, items):
    if "full" not in (config.getoption("markexpr") or ""):
        skip = pytest.mark.skip(reason="full-size parity case of -m full only (tests/weights_converter/test_parity.py)")
        for item in items:
            if item.get_closest_marker("full_only"):
                item.add_marker(skip)
    # Longest files first, with the count of slow tests standing in for
    # length: the two workers take whole files (--dist loadfile) in this
    # order (pyproject.toml turns xdist's own reordering off). By xdist's
    # order, most tests first, the four tests of test_distribution.py (a
    # fifth of the suite's time) came near the end of the queue, where the
    # other worker could run out of files.
    slow_in = {}
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("skip"):
            slow_in[item.fspath] = slow_in.get(item.fspath, 0) + 1
    # A stable sort: files with as many slow tests keep their order, each file's tests stay together.
    items.sort(key=lambda item: -slow_in.get(item.fspath, 0))


def pytest_unconfigure(config):
    if _made_cache:
        shutil.rmtree(os.environ[_SESSION_CACHE], ignore_errors=True)

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
