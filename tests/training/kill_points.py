"""``medt-train`` with a stop point, for the random-kill test (run as ``python -m tests.training.kill_points``).

``MEDT_STOP_AT`` names the moment at which the process stops itself
(SIGSTOP) so that the test can SIGKILL it exactly there:

* ``replace:NAME:before`` / ``replace:NAME:after``: the first atomic
  rename onto a file named NAME, before it (the temporary fully written, the
  destination still the previous version) or right after it (the next file
  of the epoch not yet written);
* ``batch:N``: when the N-th training batch of this process is fetched
  (inside an epoch, after compilation).

Everything else is ``training.train.main``.
"""

import os
import signal
import sys


def _stop():
    os.kill(os.getpid(), signal.SIGSTOP)


def _install(spec):
    kind, _, rest = spec.partition(":")
    if kind == "replace":
        name, _, when = rest.rpartition(":")
        from medt_keras import files

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
    elif spec:
        raise SystemExit(f"MEDT_STOP_AT: unknown stop point {spec!r}")


if __name__ == "__main__":
    _install(os.environ.get("MEDT_STOP_AT", ""))
    from training.train import main

    sys.exit(main(sys.argv[1:]))
