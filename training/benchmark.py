"""``medt-bench``: training and inference speed, compile time, memory and FLOPs.

For each model it times, after compilation, a training step through
``model.train_on_batch`` (forward, backward, Adam) and inference through
``model.predict_on_batch``, as the median of ``--repeats`` runs, and
reports images/s, compile time, peak memory, FLOPs per image (XLA's cost
analysis of the same forward, and of forward plus backward for training:
the optimiser update is left out, a negligible share) and the achieved fraction of the
device's measured peak (a large float32 matrix product). Each measurement
runs in a fresh process so its peak memory is its own.

With ``--official PATH`` (a checkout of the official MedT repository; none
of its code is part of this project) the official PyTorch model is timed
on the same inputs in the same run, and the ratio printed.

Example: ``medt-bench --models medt gated --sizes 128 --json benchmarks/cpu.json``
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def _model_name(text):
    """A registered model name or alias, as its canonical name (argparse ``type``)."""
    # Imported here: the child that times the official PyTorch model must not
    # carry JAX in its memory.
    from medt_keras.models.registry import get_spec

    try:
        return get_spec(text).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _official_builder(model_name):
    from medt_keras.models.registry import get_spec

    return get_spec(model_name).official_builder


def _peak_rss_gib():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class _RssSampler:
    """Peak resident memory of this process while the ``with`` body runs.

    ``ru_maxrss`` covers the whole process life, compilation included; this
    samples ``/proc/self/statm`` every few milliseconds, so it measures what
    the timed steps themselves hold (what a long training run keeps).
    """

    def __init__(self, interval=0.002):
        self.interval = interval
        self.peak_gib = float("nan")

    def _rss_gib(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

    def _run(self):
        while not self._stop.is_set():
            self.peak_gib = max(self.peak_gib, self._rss_gib())
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
        self.peak_gib = self._rss_gib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
        return False


def _median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_then_sample(step, repeats, sampled_steps=2):
    """``(median seconds of step, _RssSampler of further steps)``.

    The sampler wakes every 2 ms, and timed beside it the steps of both
    implementations ran 10-15% slower on a 2-core machine (MedT: ours 1.27
    -> 1.46 s, the official code 4.12 -> 4.58 s): time first, unobserved,
    then sample the memory of a few more steps.
    """
    seconds = _median_seconds(step, repeats)
    with _RssSampler() as memory:
        for _ in range(sampled_steps):
            step()
    return seconds, memory


def measure_keras(model_name, size, batch, infer_batch, repeats, rematerialize=False, dtype="float32"):
    import numpy as np

    import medt_keras  # noqa: F401  (JAX backend)
    import jax
    import keras
    from medt_keras.models.registry import get_spec

    model = get_spec(model_name).model_class(img_size=size, rematerialize=rematerialize, dtype=dtype)
    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 3), dtype=np.float32)
    y = rng.integers(0, 2, (batch, size, size)).astype("int32")
    x_infer = rng.random((infer_batch, size, size, 3), dtype=np.float32)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    start = time.perf_counter()
    model.train_on_batch(x, y)
    compile_train = time.perf_counter() - start
    train, step_memory = _time_then_sample(lambda: model.train_on_batch(x, y), repeats)

    start = time.perf_counter()
    np.asarray(model.predict_on_batch(x_infer))
    compile_infer = time.perf_counter() - start
    infer = _median_seconds(lambda: np.asarray(model.predict_on_batch(x_infer)), repeats)

    # FLOPs and XLA memory from the same computations, lowered directly.
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss_fn(t, n, x, y):
        logits, n = model.stateless_call(t, n, x, training=True)
        return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)), n

    grad_step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    compiled_train = grad_step.lower(trainable, non_trainable, x, y).compile()
    forward = jax.jit(lambda t, n, x: model.stateless_call(t, n, x, training=False)[0])
    compiled_infer = forward.lower(trainable, non_trainable, x_infer).compile()

    def flops(compiled):
        analysis = compiled.cost_analysis()
        if isinstance(analysis, list):
            analysis = analysis[0]
        return float(analysis.get("flops", float("nan"))) if analysis else float("nan")

    def temp_gib(compiled):
        memory = compiled.memory_analysis()
        return None if memory is None else memory.temp_size_in_bytes / 2**30

    return {
        "implementation": "medt-keras",
        "train_seconds": train,
        "infer_seconds": infer,
        "train_images_per_second": batch / train,
        "infer_images_per_second": infer_batch / infer,
        "compile_seconds": compile_train + compile_infer,
        "train_flops_per_image": flops(compiled_train) / batch,
        "infer_flops_per_image": flops(compiled_infer) / infer_batch,
        "xla_train_temp_gib": temp_gib(compiled_train),
        "train_step_peak_rss_gib": step_memory.peak_gib,
        "peak_rss_gib": _peak_rss_gib(),
        "rematerialize": bool(rematerialize),
        "dtype": dtype,
        "device": str(jax.devices()[0].device_kind),
    }


def measure_official(checkout, model_name, official_builder, size, batch, infer_batch, repeats):
    import types

    import numpy as np
    import torch

    for name in ("matplotlib", "matplotlib.pyplot"):
        sys.modules.setdefault(name, types.ModuleType(name))  # imported, never used
    lib = types.ModuleType("lib")  # skip lib/__init__, which imports torchvision
    lib.__path__ = [os.path.join(checkout, "lib")]
    sys.modules["lib"] = lib
    from lib.models import axialnet

    torch.set_num_threads(os.cpu_count())
    model = getattr(axialnet, official_builder)(img_size=size, imgchan=3)
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((batch, 3, size, size), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 2, (batch, size, size)))
    x_infer = torch.from_numpy(rng.random((infer_batch, 3, size, size), dtype=np.float32))

    def step():
        model.train()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    def infer():
        model.eval()
        with torch.no_grad():
            model(x_infer)

    step()
    train, step_memory = _time_then_sample(step, repeats)
    infer()
    inference = _median_seconds(infer, repeats)
    return {
        "implementation": "official PyTorch " + torch.__version__,
        "train_seconds": train,
        "infer_seconds": inference,
        "train_images_per_second": batch / train,
        "infer_images_per_second": infer_batch / inference,
        "train_step_peak_rss_gib": step_memory.peak_gib,
        "peak_rss_gib": _peak_rss_gib(),
    }


def measure_peak_gflops():
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    seconds = _median_seconds(lambda: matmul(a).block_until_ready(), 5)
    return 2 * n**3 / seconds / 1e9


def _run_child(spec):
    """One measurement in a fresh Python process; returns its JSON result."""
    out = subprocess.run(
        [sys.executable, "-m", "training.benchmark", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    if out.returncode != 0:
        killed = out.returncode < 0 or out.returncode == 137
        reason = "killed (out of memory?)" if killed else "failed"
        raise RuntimeError(f"measurement {spec} {reason} (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(value, spec):
    return "" if value is None or value != value else format(value, spec)


def main(argv=None):
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--suite", choices=("models", "accelerator"), default="models")
    if chooser.parse_known_args(argv)[0].suite == "accelerator":  # budgeted, in one process: its own module
        from training.accelerator_suite import main as accelerator_main

        return accelerator_main(chooser.parse_known_args(argv)[1])
    parser = argparse.ArgumentParser(prog="medt-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("models", "accelerator"), default="models",
                        help="accelerator: parity, speed and memory on this device in one budgeted run "
                        "(medt-bench --suite accelerator --help)")
    parser.add_argument("--models", nargs="+", default=["medt", "gated"], type=_model_name,
                        help="model names or aliases (medt, logo, gated, axialunet, ...)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[128])
    parser.add_argument("--batch", type=int, default=4, help="training batch size")
    parser.add_argument("--infer-batch", type=int, default=8, help="inference batch size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--rematerialize",
        choices=["off", "on", "both"],
        default="off",
        help="measure our models with rematerialised attention (see AxialAttention), without, or both",
    )
    parser.add_argument("--dtype", default="float32", help="dtype policy of our models, e.g. mixed_bfloat16")
    parser.add_argument("--official", metavar="PATH", help="checkout of the official MedT repository")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        kind = spec.pop("kind")
        result = {"keras": measure_keras, "official": measure_official, "peak": measure_peak_gflops}[kind](**spec)
        print(json.dumps(result))
        return 0

    peak = _run_child({"kind": "peak"})
    environment = {name: os.environ.get(name, "") for name in ("LD_PRELOAD", "XLA_FLAGS")}
    print(f"device peak (float32 2048^3 matmul): {peak:.0f} GFLOP/s", flush=True)
    print(f"environment: LD_PRELOAD={environment['LD_PRELOAD']!r} XLA_FLAGS={environment['XLA_FLAGS']!r}")
    rows = []
    header = (
        f"{'model':<10} {'size':>4} {'implementation':<30} {'train img/s':>11} {'infer img/s':>11} "
        f"{'compile s':>9} {'step RSS GiB':>12} {'peak RSS GiB':>12} {'XLA temp GiB':>12} "
        f"{'fwd GFLOP':>9} {'% peak':>6}"
    )
    print(header)
    def save():
        if not args.json:
            return
        from medt_keras.files import atomic_write_text

        atomic_write_text(
            args.json,
            json.dumps(
                {
                    "machine": platform.platform(),
                    "cpus": os.cpu_count(),
                    "peak_gflops": peak,
                    "environment": environment,
                    "command": "medt-bench " + " ".join(sys.argv[1:] if argv is None else argv),
                    "results": rows,
                },
                indent=2,
            ),
        )

    variants = {"off": [False], "on": [True], "both": [False, True]}[args.rematerialize]
    for model in args.models:
        for size in args.sizes:
            runs = [("keras", remat) for remat in variants] + ([("official", False)] if args.official else [])
            measured = []
            for kind, remat in runs:
                spec = dict(kind=kind, model_name=model, size=size, batch=args.batch,
                            infer_batch=args.infer_batch, repeats=args.repeats)
                if kind == "official":
                    # The parent looks the builder up: the child keeps JAX out of its memory.
                    spec.update(checkout=args.official, official_builder=_official_builder(model))
                else:
                    spec.update(rematerialize=remat, dtype=args.dtype)
                try:
                    result = _run_child(spec)
                except RuntimeError as error:
                    # One size too large for one implementation must not lose the rest.
                    print(f"{model:<10} {size:>4} {kind:<30} {str(error).splitlines()[0]}", flush=True)
                    rows.append(dict(spec, model=model, size=size, error=str(error).splitlines()[0]))
                    save()
                    continue
                result.update(model=model, size=size, batch=args.batch, infer_batch=args.infer_batch)
                name = result["implementation"]
                if kind == "keras":
                    train_gflops = result["train_flops_per_image"] * result["train_images_per_second"] / 1e9
                    result["train_fraction_of_peak"] = train_gflops / peak
                    name += " remat" if remat else ""
                    name += "" if args.dtype == "float32" else f" {args.dtype}"
                rows.append(result)
                save()  # after every measurement: an interrupted run keeps what it measured
                measured.append((name, result))
                print(
                    f"{model:<10} {size:>4} {name:<30} {result['train_images_per_second']:>11.2f} "
                    f"{result['infer_images_per_second']:>11.2f} {_fmt(result.get('compile_seconds'), '9.1f'):>9} "
                    f"{_fmt(result.get('train_step_peak_rss_gib'), '.2f'):>12} {result['peak_rss_gib']:>12.2f} "
                    f"{_fmt(result.get('xla_train_temp_gib'), '.2f'):>12} "
                    f"{_fmt(result.get('infer_flops_per_image', float('nan')) / 1e9, '.2f'):>9} "
                    f"{_fmt(100 * result.get('train_fraction_of_peak', float('nan')), '.1f'):>6}",
                    flush=True,
                )
            official = [r for n, r in measured if n.startswith("official")]
            for name, result in measured:
                if official and not name.startswith("official"):
                    o = official[0]
                    print(
                        f"{'':<10} {'':>4} {'x official: ' + name[len('medt-keras'):].strip():<30} "
                        f"{o['train_seconds'] / result['train_seconds']:>10.2f}x "
                        f"{o['infer_seconds'] / result['infer_seconds']:>10.2f}x {'':>9} "
                        f"{result['train_step_peak_rss_gib'] / o['train_step_peak_rss_gib']:>11.2f}x",
                        flush=True,
                    )
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
