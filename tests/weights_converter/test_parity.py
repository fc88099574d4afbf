"""Parity with the official PyTorch code, case by case (see weights_converter.parity).

The tiny cases ship with the repo (the fast tier runs one of them); the
full-size ones are read from the shared fixtures folder when present. ``-m full`` runs all of
these and nothing else. Every run checks two of them, MedT and the axial
U-Net: between them they hold every attention form and block at the
official widths (gated, without positions, with positions ungated); the
gated U-Net at 128x128 and at 64x64 with one channel and LoGo put the
same layers together as the tiny cases of those models do, and each
costs one to two minutes on the 2-core CI machine (almost all of it XLA
compiling the float64 training step), so they are ``full_only``.
Each case is converted and run once; the tests assert each tolerance.
"""

import glob
import os

import pytest

from tests.conftest import OFFICIAL_FULL, OFFICIAL_TINY
from weights_converter.parity import TOLERANCES, compare_case, compute_case, reference_path

TINY = sorted(glob.glob(os.path.join(OFFICIAL_TINY, "*.pth")))
FULL = sorted(glob.glob(os.path.join(OFFICIAL_FULL, "*.pth")))
# The full-size cases of every run; the others are full_only (module docstring).
FULL_IN_EVERY_RUN = ("medt_img128_c3_k2_b2_s0", "axialunet_img128_c3_k2_b2_s0")


def _full_marks(path):
    marks = [pytest.mark.full, pytest.mark.slow]
    if os.path.basename(path)[:-4] not in FULL_IN_EVERY_RUN:
        marks.append(pytest.mark.full_only)
    return marks


# The fast tier checks the gated U-Net's tiny case (gated attention, positions, the LoGo-free
# decoder); the other tiny cases cost 25-40 s each and run in the full suite.
FAST_TINY = "gated_img32"
CASES = [pytest.param(p, id=os.path.basename(p)[:-4],
                      marks=[] if os.path.basename(p).startswith(FAST_TINY) else [pytest.mark.slow]) for p in TINY]
if FULL:
    CASES += [pytest.param(p, id=os.path.basename(p)[:-4], marks=_full_marks(p)) for p in FULL]
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

_outputs = {}


def outputs_of(case):
    """The converted model's outputs for ``case``, computed once per test process."""
    if case not in _outputs:
        _outputs[case] = compute_case(case)
    return _outputs[case]


@pytest.fixture
def result(case):
    return compare_case(outputs_of(case), reference_path(case))


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

    from weights_converter.parity import relative_max, worst_key

    # max(errors, key=errors.get) returns "a" here: the NaN loses every comparison.
    errors = {"a": 1e-12, "b": float("nan"), "c": 1e-9}
    assert worst_key(errors) == "b"
    assert worst_key({"a": 1e-12, "c": 1e-9}) == "c"
    assert math.isnan(relative_max(np.array([1.0, np.nan]), np.array([1.0, 2.0])))
    assert math.isnan(relative_max(np.array([1.0, np.inf]), np.array([1.0, np.inf])))
    assert math.isnan(relative_max(np.array([1.0, 2.0]), np.array([np.inf, 2.0])))


def test_nan_in_one_gradient_and_inf_in_one_statistic_fail_the_check(tmp_path):
    # A NaN gradient or non-finite BatchNorm statistic of any parameter, not
    # only the first, must fail the parity check and be named as the worst.
    # The model's outputs are those test_parity computed for the same case.
    import numpy as np

    case = next(p for p in TINY if os.path.basename(p).startswith("gated"))
    reference = dict(np.load(reference_path(case)))
    grads = sorted(k for k in reference if k.startswith("grad/"))
    stats = sorted(k for k in reference if k.startswith("after/") and k.endswith("running_var"))
    grad_key, stat_key = grads[len(grads) // 2], stats[len(stats) // 2]
    reference[grad_key] = reference[grad_key].copy()
    reference[grad_key].flat[0] = np.nan
    reference[stat_key] = reference[stat_key].copy()
    reference[stat_key].flat[-1] = np.inf
    npz = tmp_path / "injected.npz"
    np.savez(npz, **reference)
    result = compare_case(outputs_of(case), os.fspath(npz))
    assert "grad64" in result.failures() and "stats64" in result.failures()
    assert result.grad64_worst_key == grad_key[len("grad/"):]
    assert result.stats64_worst_key == stat_key[len("after/"):]
    assert result.eval32 <= TOLERANCES["eval32"] and result.loss64 <= TOLERANCES["loss64"]
