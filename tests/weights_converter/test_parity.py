"""Parity with the official PyTorch code, case by case (see weights_converter.parity).

The tiny cases ship with the repo; the full-size ones are read from
../shared/fixtures/official/full when present (``-m full`` runs only them).
Each case is converted and measured once; the tests assert each tolerance.
"""

import glob
import os

import pytest

from tests.conftest import OFFICIAL_FULL, OFFICIAL_TINY
from weights_converter.parity import TOLERANCES, measure_case

TINY = sorted(glob.glob(os.path.join(OFFICIAL_TINY, "*.pth")))
FULL = sorted(glob.glob(os.path.join(OFFICIAL_FULL, "*.pth")))

CASES = [pytest.param(p, id=os.path.basename(p)[:-4]) for p in TINY]
if FULL:
    CASES += [pytest.param(p, id=os.path.basename(p)[:-4], marks=pytest.mark.full) for p in FULL]
else:
    CASES.append(
        pytest.param(
            None,
            id="full",
            marks=[
                pytest.mark.full,
                pytest.mark.skip(reason=f"no full-size fixtures at {OFFICIAL_FULL}"),
            ],
        )
    )

_results = {}


@pytest.fixture
def result(case):
    if case not in _results:
        _results[case] = measure_case(case)
    return _results[case]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("metric", list(TOLERANCES))
def test_parity(case, metric, result):
    value = getattr(result, metric)
    detail = ""
    if metric == "grad64":
        detail = f" (worst: {result.grad64_worst_key})"
    if metric == "stats64":
        detail = f" (worst: {result.stats64_worst_key})"
    assert value <= TOLERANCES[metric], f"{metric} = {value:.2e} > {TOLERANCES[metric]:.0e}{detail}"


@pytest.mark.parametrize("case", CASES)
def test_batchnorm_counters_and_coverage(case, result):
    # Local-branch BatchNorms count one update per patch, as the official loop.
    assert result.counters_equal
    assert result.grads_compared > 0 and result.stats_compared > 0
