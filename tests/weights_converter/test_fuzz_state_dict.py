"""A quick seeded run of the state_dict fuzzer (the full figure: see docs/reliability.md)."""

from tests.weights_converter.fuzz_state_dict import ESCAPE, MISMATCH, OVER_MEMORY, OVER_TIME, REFUSED, format_summary, run


def test_quick_fuzz_run_has_no_escapes():
    summary = run(cases=250, seed=20261130, memory_bound_mb=64, time_bound_s=2.0)
    report = format_summary(summary)
    assert summary["escapes"] == [], report
    for kind in (ESCAPE, MISMATCH, OVER_MEMORY, OVER_TIME):
        assert summary["outcomes"].get(kind, 0) == 0, report
    # The mutations reach both outcomes: most files are refused, some still load.
    assert summary["outcomes"][REFUSED] > 100, report
    assert summary["cases"] - summary["outcomes"][REFUSED] > 10, report
