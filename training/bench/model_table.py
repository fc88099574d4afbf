"""``medt-bench models``: each model's training and inference speed, compile time, memory and FLOPs.

For each model and size it times, after compilation, a training step
through ``model.train_on_batch`` (forward, backward, Adam) and inference
through ``model.predict_on_batch``, as the median of ``--repeats`` runs, and
reports images/s, compile time, peak memory, FLOPs per image (XLA's cost
analysis of the same forward, and of forward plus backward for training: the
optimiser update is left out, a negligible share) and the achieved fraction
of the device's measured peak (a large float32 matrix product). Each
measurement runs in a fresh process so its peak memory is its own; ours in
one process per workload (each program compiles with its workload's XLA
options, ``medt_keras.compiler``, as in ``medt-train``, ``medt-predict`` or a
user's own ``fit``). With ``--official PATH`` the official PyTorch code is
timed once per model in a fresh process beside ours (PyTorch on all cores,
this process's allocator), with both sides' memory.
"""

from training.bench import ours, worker
from training.bench.official import official_builder
from training.bench.records import environment, header, write_json
from training.bench.tables import MODELS_HEADER, models_ratio_row, models_row


def add_model_arguments(parser, rematerialize=("off", "on", "both")):
    """The options of which models to build and how (shared with ``medt-bench compare``)."""
    from training import devices

    parser.add_argument("--models", nargs="+", default=["medt", "gated"], type=ours.model_name,
                        help="model names or aliases (medt, logo, gated, axialunet, ...)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[128])
    parser.add_argument("--batch", type=int, default=4, help="training batch size")
    parser.add_argument("--infer-batch", type=int, default=8, help="inference batch size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rematerialize", choices=rematerialize, default="off",
                        help="our models with rematerialised attention (see AxialAttention), without"
                        + (", or both" if "both" in rematerialize else ""))
    parser.add_argument("--dtype", default="float32", help="dtype policy of our models, e.g. mixed_bfloat16")
    parser.add_argument("--json", metavar="FILE", help="write the results here (after every measurement)")
    devices.add_argument(parser)


def add_arguments(parser):
    add_model_arguments(parser)
    parser.add_argument("--official", metavar="PATH",
                        help="checkout of the official MedT repository: its model is timed once per model and size "
                             "in a fresh process beside ours (PyTorch on all cores, this process's allocator)")
    parser.add_argument("--separate", action="store_true", help="(accepted for the old form --official PATH "
                        "--separate; this subcommand always times the official code separately)")


def platform_and_peak(args):
    """Says what JAX runs on and measures the device's peak, each in a child; ``None`` after an error."""
    if not worker.check_platform(args.require_accelerator):
        return None
    peak = worker.run_child({"kind": "peak"})
    print(f"device peak (float32 2048^3 matmul): {peak:.0f} GFLOP/s", flush=True)
    env = environment()
    print(f"environment: LD_PRELOAD={env['LD_PRELOAD']!r} XLA_FLAGS={env['XLA_FLAGS']!r}")
    return peak


def _measure(args, model, size, kind, remat, peak):
    """``(name, result)`` of one implementation, or ``(None, error row)`` where it failed."""
    spec = dict(kind=kind, model_name=model, size=size, batch=args.batch, infer_batch=args.infer_batch,
                repeats=args.repeats)
    if kind == "official":
        # The parent looks the builder up: the child keeps JAX out of its memory.
        spec.update(checkout=args.official, official_builder=official_builder(model))
    else:
        spec.update(rematerialize=remat, dtype=args.dtype)
    try:
        # Ours: each workload in its own process.
        result = worker.run_child(spec) if kind == "official" else ours.measure_keras_per_workload(
            worker.run_child, spec)
    except RuntimeError as error:
        # One size too large for one implementation must not lose the rest.
        print(f"{model:<10} {size:>4} {kind:<30} {str(error).splitlines()[0]}", flush=True)
        return None, dict(spec, model=model, size=size, error=str(error).splitlines()[0])
    result.update(model=model, size=size, batch=args.batch, infer_batch=args.infer_batch)
    name = result["implementation"]
    if kind == "keras":
        train_gflops = result["train_flops_per_image"] * result["train_images_per_second"] / 1e9
        result["train_fraction_of_peak"] = train_gflops / peak
        name += " remat" if remat else ""
        name += "" if args.dtype == "float32" else f" {args.dtype}"
    print(models_row(model, size, name, result), flush=True)
    return name, result


def run(args):
    """Every model, size and variant measured, printed and saved after each measurement."""
    peak = platform_and_peak(args)
    if peak is None:
        return 2
    record = header(args.command, peak_gflops=peak, environment=environment(), results=[])
    print(MODELS_HEADER)
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.rematerialize]
    runs = [("keras", remat) for remat in variants] + ([("official", False)] if args.official else [])
    for model in args.models:
        for size in args.sizes:
            measured = []
            for kind, remat in runs:
                name, result = _measure(args, model, size, kind, remat, peak)
                record["results"].append(result)
                write_json(args.json, record)  # after every measurement: an interrupted run keeps what it measured
                if name is not None:
                    measured.append((name, result))
            official = [r for n, r in measured if n.startswith("official")]
            for name, result in measured:
                if official and not name.startswith("official"):
                    print(models_ratio_row(name, result, official[0]), flush=True)
    write_json(args.json, record)
    return 0
