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
    CASES += [pytest.param(p, id=os.path.basename(p)[:-4], marks=[pytest.mark.full, pytest.mark.slow]) for p in FULL]
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


def test_worst_key_and_relative_error_see_nan_and_inf():
    import math

    import numpy as np

    from weights_converter.parity import _relative_max, worst_key

    # max(errors, key=errors.get) returns "a" here: the NaN loses every comparison.
    errors = {"a": 1e-12, "b": float("nan"), "c": 1e-9}
    assert worst_key(errors) == "b"
    assert worst_key({"a": 1e-12, "c": 1e-9}) == "c"
    assert math.isnan(_relative_max(np.array([1.0, np.nan]), np.array([1.0, 2.0])))
    assert math.isnan(_relative_max(np.array([1.0, np.inf]), np.array([1.0, np.inf])))
    assert math.isnan(_relative_max(np.array([1.0, 2.0]), np.array([np.inf, 2.0])))


@pytest.mark.slow
def test_nan_in_one_gradient_and_inf_in_one_statistic_fail_the_check(tmp_path):
    # A NaN gradient or non-finite BatchNorm statistic of any parameter, not
    # only the first, must fail the parity check and be named as the worst.
    import numpy as np

    case = next(p for p in TINY if os.path.basename(p).startswith("gated"))
    reference = dict(np.load(case[:-4] + ".npz"))
    grads = sorted(k for k in reference if k.startswith("grad/"))
    stats = sorted(k for k in reference if k.startswith("after/") and k.endswith("running_var"))
    grad_key, stat_key = grads[len(grads) // 2], stats[len(stats) // 2]
    reference[grad_key] = reference[grad_key].copy()
    reference[grad_key].flat[0] = np.nan
    reference[stat_key] = reference[stat_key].copy()
    reference[stat_key].flat[-1] = np.inf
    npz = tmp_path / "injected.npz"
    np.savez(npz, **reference)
    result = measure_case(case, os.fspath(npz))
    assert "grad64" in result.failures() and "stats64" in result.failures()
    assert result.grad64_worst_key == grad_key[len("grad/"):]
    assert result.stats64_worst_key == stat_key[len("after/"):]
    assert result.eval32 <= TOLERANCES["eval32"] and result.loss64 <= TOLERANCES["loss64"]
