"""Measurements in processes of their own: the child protocol and the long-lived worker protocol.

A *child* (``run_child``) makes one measurement in a fresh Python process and
prints its JSON result as its last line: its peak memory is its own, and the
process that starts it never starts JAX (on a GPU the first JAX process takes
most of the memory). ``CHILD_MEASUREMENTS`` names what a child can measure.

A *worker* (``Worker``, ``serve_worker``) builds and compiles once, then times
steps on request, so runs of two sides can alternate (ours, official, ours,
...) without recompiling. It answers on stdout behind ``REPLY``; anything else
it prints is ignored. Requests, one JSON object a line on its stdin:

* ``{"op": "time", "workload": "train"|"infer", "repeats", "warmup", "config", "give_up_after"}``:
  ``timing.timed_steps``;
* ``{"op": "memory", "workload", "steps", "config"}``: resident memory sampled over a few steps;
* ``{"op": "quit"}``: the process's peak RSS, then it ends.

Both run as ``python -m training.bench.worker child|serve SPEC`` (``SPEC``: a JSON
object whose ``kind`` picks the measurement or timer, the rest its arguments).
"""

import importlib
import json
import os
import subprocess
import sys

from training.bench.timing import RssSampler, peak_rss_gib, timed_steps

REPLY = "@medt-bench-reply "

# kind -> "module:function" whose keyword arguments are the rest of the spec (imported in the child only).
CHILD_MEASUREMENTS = {
    "keras": "training.bench.ours:measure_keras",
    "official": "training.bench.official:measure_official",
    "peak": "training.bench.timing:peak_gflops",
    "sliding": "training.bench.sliding_window:measure_sliding_window",
    "loader": "training.bench.loader:measure_loader",
    "train_profile": "training.bench.op_profile:measure_train_profile",
    "platform": "training.devices:platform",
}
# kind -> the class a worker times with: its info dict, then train(config) and infer(config).
TIMERS = {
    "keras": "training.bench.ours:KerasTimer",
    "official": "training.bench.official:OfficialTimer",
}


def resolve(target):
    """The object a ``"module:name"`` string names (anything else as it is)."""
    if not isinstance(target, str):
        return target
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _command(role, spec):
    return [sys.executable, "-m", "training.bench.worker", role, json.dumps(spec)]


def run_child(spec, env=None):
    """One measurement in a fresh Python process (environment ``env``, else this one's); returns its JSON result."""
    out = subprocess.run(_command("child", spec), capture_output=True, text=True,
                         env=os.environ.copy() if env is None else env)
    if out.returncode != 0:
        killed = out.returncode < 0 or out.returncode == 137
        reason = "killed (out of memory?)" if killed else "failed"
        raise RuntimeError(f"measurement {spec} {reason} (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_platform(require_accelerator=False):
    """Prints what JAX runs on, asked of a child; False (after an error line) where an accelerator is required and
    JAX finds only CPUs. A child, as everything that starts JAX here: on a GPU the first JAX process takes most of
    its memory."""
    from training import devices

    try:
        devices.check("medt-bench", require_accelerator, info=run_child({"kind": "platform"}))
    except devices.AcceleratorError as error:
        print(f"medt-bench: error: {error}", file=sys.stderr)
        return False
    return True


def measure_in_child(spec):
    """A child's life: the measurement ``spec`` names, printed as one JSON line."""
    spec = dict(spec)
    measure = resolve(CHILD_MEASUREMENTS[spec.pop("kind")])
    print(json.dumps(measure(**spec)))
    return 0


def reply(message):
    print(REPLY + json.dumps(message), flush=True)


def serve_worker(spec):
    """A worker's life: build, reply with its ``info``, then answer requests on stdin until ``quit``."""
    spec = dict(spec)
    timer = resolve(TIMERS[spec.pop("kind")])(**spec)
    reply(dict(timer.info, ready=True))
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "quit":
            reply({"peak_rss_gib": peak_rss_gib()})
            return 0
        step = getattr(timer, request["workload"])
        config = request.get("config")
        if op == "time":
            reply(timed_steps(lambda: step(config), request["repeats"], request.get("warmup", 1),
                              request.get("give_up_after")))
        elif op == "memory":
            step(config)
            with RssSampler() as memory:
                for _ in range(request.get("steps", 2)):
                    step(config)
            reply({"step_peak_rss_gib": memory.peak_gib})
        else:
            raise ValueError(f"unknown request {request}")
    return 0


class Worker:
    """The parent's handle on a worker process (``serve_worker``) under a given environment."""

    def __init__(self, spec, env):
        import tempfile

        self.spec = spec
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(_command("serve", spec), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._stderr, text=True, env=env)
        self.info = self._read()

    def _read(self):
        for line in self._process.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        code = self._process.wait()
        self._stderr.seek(0)
        killed = code < 0 or code == 137
        reason = "was killed (out of memory?)" if killed else "failed"
        raise RuntimeError(f"worker {self.spec['kind']} {reason} (exit {code}):\n{self._stderr.read()[-3000:]}")

    def request(self, **request):
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        return self._read()

    def close(self):
        if self._process.poll() is None:
            try:
                self.info["peak_rss_gib"] = self.request(op="quit")["peak_rss_gib"]
            except (RuntimeError, OSError):
                pass
            self._process.stdin.close()
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def main(argv=None):
    """``child SPEC`` or ``serve SPEC`` (what ``run_child`` and ``Worker`` start)."""
    role, spec = sys.argv[1:] if argv is None else argv
    return {"child": measure_in_child, "serve": serve_worker}[role](json.loads(spec))


if __name__ == "__main__":
    sys.exit(main())
