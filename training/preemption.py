"""Preemption: a SIGTERM becomes a save at the next training step, on every process, then a resumable exit.

Spot and preemptible machines get a SIGTERM and about 30 seconds before
they go. ``medt-train`` answers it by phase:

* **start-up and compilation** (nothing trained yet in this run): it exits
  at once with ``PREEMPTED``; the saved state is whatever was saved before;
* **training**: every process saves the run state after the same next step
  and exits with ``PREEMPTED``; ``--resume`` continues at the batch after it;
* **after training** (the test evaluation, the final files): it exits at
  once with ``PREEMPTED``; ``--resume`` redoes only that evaluation;
* **a second SIGTERM**, in any phase: it exits at once with ``PREEMPTED``.

Exiting at once is as safe as a SIGKILL, which the run survives at any
moment (every file is written beside its name and renamed into place).

How the processes agree on the step: one process runs alone on a Python
SIGTERM handler. Several processes (``jax.distributed``) use JAX's
preemption service: ``jax.distributed.initialize`` installs its own SIGTERM
handler, tells the coordination service when any process receives one, and
``multihost_utils.reached_preemption_sync_point`` returns True on every
process at the same step, one after the furthest process' current one
(every process passes it the number of each step done, the optimizer's
step count, the same numbers Orbax passes when it saves). There, until the processes have agreed, a second SIGTERM is absorbed
by JAX's handler; from the agreement on, it exits at once.
"""

import os
import signal
import sys
import threading

# sysexits.h's EX_TEMPFAIL, "a temporary failure; the user is invited to retry":
# the state is saved and ``--resume`` continues it.
PREEMPTED = 75


class Preempted(Exception):
    """Training stopped for a SIGTERM after saving the run state (``step``: optimizer steps done)."""

    def __init__(self, step):
        super().__init__(f"preempted (SIGTERM): run state saved after step {step}")
        self.step = step


class SigtermWatch:
    """The run's SIGTERM policy (see the module), as a context manager around the whole run.

    The handler is installed only in the main thread (Python delivers
    signals there) and the previous one is restored on exit, so a script
    that calls ``training.train.train`` keeps its own handler afterwards.
    """

    def __init__(self, command="medt-train"):
        self.command = command
        self.phase = "starting"
        self.received = 0
        self.multi_process = False
        self._previous = None
        self._installed = False

    def __enter__(self):
        self._install()
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False
        return False

    def _install(self):
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        if not self._installed:
            self._previous, self._installed = previous, True

    def _handle(self, signum, frame):
        self.received += 1
        if self.received > 1 or self.phase != "training":
            self.exit_now()
        print(f"{self.command}: SIGTERM: saving the run state after the next step, then exiting "
              f"with status {PREEMPTED} (a second SIGTERM exits at once)", file=sys.stderr, flush=True)

    def exit_now(self):
        """Leaves the process at once with ``PREEMPTED`` (as safe as a SIGKILL: see the module)."""
        print(f"{self.command}: SIGTERM ({self.phase}): exiting at once with status {PREEMPTED}; "
              "--resume continues from the last saved state", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(PREEMPTED)

    def distributed(self, process_count):
        """After ``jax.distributed`` may have started: several processes leave SIGTERM to JAX's service.

        One process takes SIGTERM back (``jax.distributed.initialize`` on a
        single host, e.g. ``--cloud-tpu`` on one TPU VM, installs JAX's handler too).
        """
        self.multi_process = process_count > 1
        if not self.multi_process:
            self._install()

    def training(self):
        self.phase = "training"

    def finishing(self):
        self.phase = "finishing"
        if self.multi_process:
            self._install()  # the agreement needs training steps: from here, any SIGTERM exits at once
        elif self.received:
            self.exit_now()  # arrived between the last step and here (the last epoch's validation)

    def should_save(self, first_step, last_step):
        """True when the run must save now and stop, after the steps ``first_step..last_step`` of one training call.

        Several processes: every step's number goes to JAX's sync point, one
        by one, as its protocol expects (it agrees on the furthest step + 1,
        and an execution of several steps must not jump over it). Orbax,
        which saves the Orbax run state, asks the same sync point with the
        steps it saves: the numbers are the same steps.
        """
        if self.multi_process:
            from jax.experimental import multihost_utils

            reached = [multihost_utils.reached_preemption_sync_point(step) for step in range(first_step, last_step + 1)]
            if not any(reached):
                return False
            self._install()  # agreed: a further SIGTERM exits at once
            self.received = max(self.received, 1)
            return True
        return self.received > 0

    def pending(self):
        """A SIGTERM has been received and not yet acted on (one process: at an epoch's end)."""
        return not self.multi_process and self.received > 0
