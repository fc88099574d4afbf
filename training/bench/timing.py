"""Clocks and gauges every measurement shares: step timing, resident memory, the matmul peak, the machine's load.

Nothing here imports JAX or PyTorch at module level: the processes that time
the official PyTorch code must not carry JAX in their memory.
"""

import os
import statistics
import subprocess
import time


def median_seconds(fn, repeats):
    """The median wall time of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_steps(step, repeats, warmup, give_up_after=None):
    """``{"seconds": [...], "cpu_seconds": [...]}`` of ``repeats`` steps after ``warmup`` untimed ones.

    CPU seconds are this process's (every thread's) user and system time:
    on a shared machine the wall time also counts the time other work took
    the cores. With ``give_up_after`` (seconds, warm-up included), no step
    starts after that long; the result then says ``"gave_up": True`` and
    holds the steps timed so far (at least one).
    """
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    seconds, cpu = [], []
    for _ in range(repeats):
        wall, processor = time.perf_counter(), time.process_time()
        step()
        cpu.append(time.process_time() - processor)
        seconds.append(time.perf_counter() - wall)
        if give_up_after is not None and len(seconds) < repeats and time.perf_counter() - start > give_up_after:
            return {"seconds": seconds, "cpu_seconds": cpu, "gave_up": True}
    return {"seconds": seconds, "cpu_seconds": cpu}


def peak_rss_gib():
    """This process's peak resident memory over its whole life (``ru_maxrss``), in GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class RssSampler:
    """Peak resident memory of this process while the ``with`` body runs.

    ``ru_maxrss`` covers the whole process life, compilation included; this
    samples ``/proc/self/statm`` every few milliseconds, so it measures what
    the timed steps themselves hold (what a long training run keeps).
    """

    def __init__(self, interval=0.002):
        self.interval = interval
        self.peak_gib = float("nan")

    @staticmethod
    def rss_gib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

    def _run(self):
        while not self._stop.is_set():
            self.peak_gib = max(self.peak_gib, self.rss_gib())
            time.sleep(self.interval)

    def __enter__(self):
        import ctypes
        import ctypes.util
        import threading

        if not os.path.exists("/proc/self/statm"):
            return self
        # Hand memory that earlier work (compilation, model building) freed
        # back to the system first, so the measure is what the steps hold.
        libc = ctypes.util.find_library("c")
        if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
            ctypes.CDLL(libc).malloc_trim(0)
        self.peak_gib = self.rss_gib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
        return False


def time_then_sample(step, repeats, sampled_steps=2):
    """``(median seconds of step, RssSampler of further steps)``.

    The sampler wakes every 2 ms, and timed beside it the steps of both
    implementations ran 10-15% slower on a 2-core machine (MedT: ours 1.27
    -> 1.46 s, the official code 4.12 -> 4.58 s): time first, unobserved,
    then sample the memory of a few more steps.
    """
    seconds = median_seconds(step, repeats)
    with RssSampler() as memory:
        for _ in range(sampled_steps):
            step()
    return seconds, memory


def matmul_gflops(dtype="float32", precision=None, n=2048, repeats=5):
    """GFLOP/s of an ``(n, n) @ (n, n)`` product of ``dtype`` under ``jax.default_matmul_precision(precision)``.

    The device's measured peak that FLOP rates are a fraction of; returns
    ``{"dtype", "precision", "n", "gflops"}``.
    """
    import contextlib

    import jax
    import jax.numpy as jnp

    scope = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
    with scope:
        a = jnp.ones((n, n), dtype)
        matmul = jax.jit(lambda a: a @ a)
        matmul(a).block_until_ready()
        seconds = median_seconds(lambda: matmul(a).block_until_ready(), repeats)
    return {"dtype": dtype, "precision": precision or "default", "n": n, "gflops": 2 * n**3 / seconds / 1e9}


def peak_gflops():
    """GFLOP/s of a float32 2048^3 matrix product at default precision (``medt-bench``'s peak)."""
    return matmul_gflops()["gflops"]


def steal_seconds():
    """The machine's total steal time so far (``/proc/stat``; None where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_load():
    """Load averages (1, 5, 15 minutes) and the steal time so far."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"load_average": load, "steal_seconds": steal_seconds()}


def uptime():
    """``uptime``'s line, or None where there is no such command."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
