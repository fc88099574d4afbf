"""``medt-train`` with a stop point, for the random-kill test (run as ``python -m tests.training.kill_points``).

``MEDT_STOP_AT`` names the moment at which the process stops itself
(SIGSTOP) so that the test can SIGKILL it exactly there:

* ``replace:NAME:before`` / ``replace:NAME:after``: the first atomic
  rename onto a file named NAME, before it (the temporary fully written, the
  destination still the previous version) or right after it (the next file
  of the epoch not yet written);
* ``batch:N``: when the N-th training batch of this process is fetched
  (inside an epoch, after compilation);
* ``orbax_save:N:before`` / ``orbax_save:N:after``: the N-th save of an
  Orbax run state, before it is started (the previous one committed) or
  right after it was handed to Orbax (its files being written in the
  background, possibly not yet committed).

Everything else is ``training.train.main``.
"""

import os
import signal
import sys
import time


def stopped(process, timeout=600):
    """Waits until ``process`` stops itself (SIGSTOP at its stop point); False if it exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            return False
        with open(f"/proc/{process.pid}/stat") as handle:
            if handle.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return True
        time.sleep(0.01)
    raise AssertionError("the run neither stopped nor ended")


def _stop():
    os.kill(os.getpid(), signal.SIGSTOP)


def _install(spec):
    import medt_keras  # noqa: F401  (before anything imports keras: it selects the JAX backend)

    kind, _, rest = spec.partition(":")
    if kind == "replace":
        name, _, when = rest.rpartition(":")
        from training import files

        original = files.os.replace

        class _Os:  # the atomic writer's view of os, with one rename watched
            def __getattr__(self, attribute):
                return getattr(os, attribute)

            @staticmethod
            def replace(source, destination):
                hit = os.path.basename(destination) == name
                if hit and when == "before":
                    _stop()
                original(source, destination)
                if hit and when == "after":
                    _stop()

        files.os = _Os()
    elif kind == "batch":
        target = int(rest)
        from training.data import SegmentationBatches

        original = SegmentationBatches.__getitem__
        seen = [0]

        def getitem(self, index):
            if self.shuffle:  # the training batches
                seen[0] += 1
                if seen[0] == target:
                    _stop()
            return original(self, index)

        SegmentationBatches.__getitem__ = getitem
    elif kind == "orbax_save":
        count, _, when = rest.partition(":")
        from training import checkpoint

        original = checkpoint.OrbaxRunState.save
        saves = [0]

        def save(self, *args, **kwargs):
            saves[0] += 1
            hit = saves[0] == int(count)
            if hit and when == "before":
                _stop()
            original(self, *args, **kwargs)
            if hit and when == "after":
                _stop()

        checkpoint.OrbaxRunState.save = save
    elif spec:
        raise SystemExit(f"MEDT_STOP_AT: unknown stop point {spec!r}")


if __name__ == "__main__":
    for stop_point in os.environ.get("MEDT_STOP_AT", "").split(","):
        _install(stop_point)
    from training.train import main

    sys.exit(main(sys.argv[1:]))
