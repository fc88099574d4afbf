"""``medt-bench loader``: the input pipeline alone, against the models' training rate.

The training split of a config (default ``medt_hela``: HeLa 128x128 tiles,
shuffled, flipped, batch 4) as ``medt-train`` builds it, read in order epoch
after epoch, with the threads loader and the grain loader (worker processes)
for each worker count, in images/s and as a multiple of the training rate
that a ``medt-bench models`` JSON (``--training-json``) records.
"""

import json
import os
import statistics
import sys
import time

from training.bench import worker
from training.bench.records import header, write_json
from training.bench.tables import loader_header, loader_row
from training.bench.timing import peak_rss_gib

# The training rates of the 2-core CPU, where a checkout's root is the working folder.
DEFAULT_TRAINING_JSON = os.path.join("benchmarks", "cpu-2core-128.json")


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
        "peak_rss_gib": peak_rss_gib(),
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


def add_arguments(parser):
    parser.add_argument("--config", "--loader-config", dest="config", default="medt_hela",
                        help="the config whose training split is read")
    parser.add_argument("--workers", "--loader-workers", dest="workers", nargs="+", type=int, default=[0, 2, 4],
                        help="thread / worker process counts")
    parser.add_argument("--epochs", "--loader-epochs", dest="epochs", type=int, default=5,
                        help="epochs read (the rate is of the median epoch)")
    parser.add_argument("--batch", type=int, default=4, help="batch size")
    parser.add_argument("--img-size", "--loader-img-size", dest="img_size", type=int, default=128,
                        help="the training rates of this image size are compared")
    parser.add_argument("--training-json", metavar="FILE",
                        help="a medt-bench models JSON with training steps to compare with (default: "
                             f"{DEFAULT_TRAINING_JSON} from the working folder, where it exists)")
    parser.add_argument("--data-dir", help="the TFDS data directory")
    parser.add_argument("--json", metavar="FILE", help="write the results here")


def _rates(args):
    """``(source, {model: train images/s})``: from ``--training-json``, else the default file where it exists."""
    path = args.training_json or DEFAULT_TRAINING_JSON
    if os.path.isfile(path):
        return path, training_rates(path, args.img_size, args.batch)
    if args.training_json:
        raise FileNotFoundError(f"--training-json {os.path.abspath(path)}: no such file")
    print(f"medt-bench loader: no {os.path.abspath(path)} (run from a checkout's root, or give --training-json "
          "FILE): no ratio to the training rate", file=sys.stderr)
    return None, {}


def run(args):
    """Each loader and worker count in a fresh process, a table, the JSON."""
    try:
        source, rates = _rates(args)
    except FileNotFoundError as error:
        print(f"medt-bench: error: {error}", file=sys.stderr)
        return 2
    print(f"config {args.config}, training split, batch {args.batch}, {args.epochs} epochs; "
          f"training rates from {source}: "
          + (", ".join(f"{m} {r:.2f} img/s" for m, r in rates.items()) or "none"), flush=True)
    print(loader_header(rates), flush=True)
    rows = []
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    for loader in ("threads", "grain"):
        for workers in args.workers:
            result = worker.run_child(dict(kind="loader", config_name=args.config, loader=loader, workers=workers,
                                           batch=args.batch, epochs=args.epochs, data_dir=args.data_dir))
            result["times_training_rate"] = {m: result["images_per_second"] / r for m, r in rates.items()}
            rows.append(result)
            print(loader_row(result, rates), flush=True)
    write_json(args.json, header(
        args.command,
        # The machine's 1/5/15-minute load averages before and after: other work shares the cores.
        load_average={"before": load_before, "after": os.getloadavg() if hasattr(os, "getloadavg") else None},
        training_rates={"source": source, "images_per_second": rates},
        results=rows,
    ))
    return 0
