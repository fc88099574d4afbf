import numpy as np
import pytest

from training.benchmark import _RssSampler


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_step_memory_sampler_sees_memory_held_inside_the_block():
    with _RssSampler() as idle:
        pass
    with _RssSampler() as busy:
        block = np.ones(64 * 2**20 // 8 * 4)  # 256 MiB, touched
        block.sum()
        __import__("time").sleep(0.05)
    del block
    assert busy.peak_gib - idle.peak_gib > 0.2


def test_steps_are_timed_without_the_memory_sampler_running():
    import threading

    from training.benchmark import _time_then_sample

    base = threading.active_count()
    seen = []
    seconds, memory = _time_then_sample(lambda: seen.append(threading.active_count()), repeats=3)
    # Three timed steps alone, then two with the sampler's thread beside them.
    assert seen == [base] * 3 + [base + 1] * 2
    assert seconds >= 0 and memory.peak_gib > 0
