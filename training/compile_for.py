"""Compile ``medt-train``'s programs for a TPU slice or NVIDIA GPUs on this machine, without them, and report what the compiler says.

    JAX_PLATFORMS=cpu medt-bench compile-for tpu:v5e:2x2 --config medt_hela --batch-per-chip 8
    JAX_PLATFORMS=cpu medt-bench compile-for tpu:v5e:16x16 --config medt_hela --dtype mixed_bfloat16 --json out.json
    JAX_PLATFORMS=cpu medt-bench compile-for cuda:h100x8 --config medt_hela   # needs jax[cuda12] (gpu_devices)

(``python -m training.compile_for TARGET ...`` is the same.)

libtpu (``pip install "medt-keras[aot]"``) gives compile-only TPU devices
for any slice shape (``jax.experimental.topologies``), as MaxText's
``train_compile.py`` checks pod-scale programs on a CPU host. On them this
module compiles what ``medt-train --distribution data_parallel`` runs: the
config's model compiled with ``OfficialAdam``, the loss and the weighted
metrics, Keras' own ``train_step`` (the function ``model.fit`` jits, its
state donated as fit donates it) with the global batch split over every
chip and the variables replicated, and the ``predict_step``. It reports,
per chip: argument, output and temporary memory against the chip's HBM,
FLOPs and HBM bytes by the compiler's cost analysis, the collectives by
kind, the data's sharding, and the compile time. These are compiler
figures, not timings.

Run it with ``JAX_PLATFORMS=cpu``: with libtpu installed JAX would
otherwise try to start a TPU. The same process compiles for its CPU too
(``cpu_train_program``): ``attention="auto"`` takes the CPU kernels there
and ``keras.ops`` in the TPU program (``medt_keras.kernels.dispatch``).
"""

import json
import os
import re
import sys
import time

import medt_keras  # noqa: F401  (selects the JAX backend before keras is imported)
import numpy as np

from training import hlo_traffic

# HBM per chip, GiB (Cloud TPU documentation): what "fits" is measured against. A v4 chip's two
# TensorCores are two devices of libtpu's compile-only topologies, each with half.
HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


class CompileTargetError(ValueError):
    """The target cannot be compiled for here (unknown name, libtpu missing, JAX started on a TPU)."""


def tpu_devices(target):
    """The compile-only devices of ``target`` (``"tpu:v5e:2x2"``, ``"tpu:v4:2x2x1"``, ...) and each one's HBM, GiB."""
    platform, _, topology = target.partition(":")
    generation = topology.split(":")[0]
    if platform != "tpu" or ":" not in topology:
        raise CompileTargetError(f"compile target {target!r}: use tpu:GENERATION:SHAPE, e.g. tpu:v5e:2x2, "
                                 f"tpu:v5e:16x16, tpu:v5p:2x2x1, tpu:v4:2x2x1 (generations: {', '.join(HBM_GIB)}).")
    if generation not in HBM_GIB:
        raise CompileTargetError(f"compile target {target!r}: unknown TPU generation {generation!r}; "
                                 f"known: {', '.join(HBM_GIB)}.")
    if os.environ.get("JAX_PLATFORMS") != "cpu":
        raise CompileTargetError("compiling for a TPU without one needs JAX_PLATFORMS=cpu in the environment "
                                 "(with libtpu installed, JAX would otherwise try to start a TPU).")
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise CompileTargetError('compiling for a TPU needs libtpu: pip install "medt-keras[aot]".')
    from jax.experimental import topologies

    try:
        description = topologies.get_topology_desc(topology, "tpu")
    except Exception as error:  # libtpu's own message names what it did not accept
        raise CompileTargetError(f"compile target {target!r}: libtpu refused the topology ({error}); "
                                 "one libtpu process at a time may hold its lock file.") from error
    devices = list(description.devices)
    cores_per_chip = len({getattr(device, "core_on_chip", 0) for device in devices})
    return devices, HBM_GIB[generation] / cores_per_chip


GPU_TARGETS = {"h100": "h100.txtpb"}


def gpu_devices(target):
    """The compile-only GPUs of ``target`` (``"cuda:h100"``, ``"cuda:h100x8"``) and each one's memory, GiB.

    ``cuda:NAMExN``: N GPUs in one host. The GPU is described to XLA's
    compiler by a target configuration (``training/gpu_targets/``); it
    compiles there as for the device (PTX to SASS with ptxas) but cannot
    autotune without one.
    """
    platform, _, name = target.partition(":")
    model, _, count = name.partition("x")
    if platform != "cuda" or model not in GPU_TARGETS or (count and not count.isdigit()):
        raise CompileTargetError(f"compile target {target!r}: use cuda:GPU or cuda:GPUxN, e.g. cuda:h100 or "
                                 f"cuda:h100x8 (GPUs: {', '.join(GPU_TARGETS)}).")
    if os.environ.get("JAX_PLATFORMS") != "cpu":
        raise CompileTargetError("compiling for a GPU without one needs JAX_PLATFORMS=cpu in the environment.")
    import importlib.util

    if importlib.util.find_spec("jax_plugins") is None or importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        raise CompileTargetError('compiling for an NVIDIA GPU needs JAX\'s CUDA plugin: pip install "jax[cuda12]" '
                                 "(matched to the installed jax; about 5 GB with the CUDA libraries).")
    from jax.experimental import topologies

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets", GPU_TARGETS[model])) as handle:
        target_config = handle.read()
    memory = int(re.search(r"device_memory_size:\s*(\d+)", target_config).group(1))
    try:
        description = topologies.get_topology_desc(platform="cuda", topology_name=model,
                                                   topology=f"1x1x{int(count or 1)}", target_config=target_config)
    except Exception as error:
        raise CompileTargetError(f"compile target {target!r}: the CUDA plugin refused it ({error}).") from error
    return list(description.devices), memory / 2.0 ** 30


def target_devices(target):
    """``(devices, memory per device in GiB)`` of a ``tpu:...`` or ``cuda:...`` target."""
    return gpu_devices(target) if target.startswith("cuda:") else tpu_devices(target)


def build_compiled_model(config):
    """The config's model, compiled as ``medt-train`` compiles it, its optimizer and metrics built.

    The loss and metrics are built by one eager call on one example (Keras
    builds compiled metrics on first use).
    """
    from training.train import build_for_training

    model, _ = build_for_training(config, in_channels=3)
    x, y = _batch(config, 1)
    y_pred = model(x, training=False)
    model.compute_loss(x, y, y_pred)
    model.compute_metrics(x, y, y_pred, sample_weight=None)
    return model


def _state(model):
    return ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
            [v.value for v in model.optimizer.variables], [v.value for v in model.metrics_variables])


def _abstract(tree, sharding):
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding), tree)


def _batch(config, batch):
    x = np.zeros((batch, config.img_size, config.img_size, 3), "float32")
    y = np.zeros((batch, config.img_size, config.img_size), "int32")
    return x, y


def _shardings(devices):
    """``(replicated, split along the batch)`` over a one-axis mesh of ``devices``."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices), ("batch",))
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("batch"))


def train_program(model, config, devices, batch_per_chip):
    """Keras' ``train_step`` jitted (state donated) for ``devices``: the global batch split over them, the state replicated.

    Returns the lowered program (``.compile()`` it).
    """
    import jax

    replicated, split = _shardings(devices)
    state = _abstract(_state(model), replicated)
    data = _abstract(_batch(config, batch_per_chip * len(devices)), split)
    return jax.jit(model.train_step, donate_argnums=0).lower(state, data)


def predict_program(model, config, devices, batch_per_chip):
    """Keras' ``predict_step`` for ``devices``, the batch split over them (lowered)."""
    import jax

    replicated, split = _shardings(devices)
    state = _abstract(_state(model)[:2], replicated)
    x = _abstract(_batch(config, batch_per_chip * len(devices))[0], split)
    return jax.jit(model.predict_step).lower(state, (x,))


def cpu_train_program(model, config, batch):
    """The same ``train_step`` lowered for this process' CPU (one device)."""
    import jax

    return jax.jit(model.train_step, donate_argnums=0).lower(_state(model), _batch(config, batch))


def collectives(hlo_text):
    """``{kind: count}`` of the cross-device operations in an optimised HLO module's text."""
    return {kind: len(re.findall(rf"\s{kind}(?:-start)?\(", hlo_text)) for kind in COLLECTIVES}


def report(lowered, hbm_gib, seconds, data_argument, batch_per_chip, breakdown=0, hlo_path=None, flops=None):
    """The compiler's figures for one compiled program, per chip.

    ``breakdown``: also where the bytes go, the ``breakdown`` largest of each
    grouping (``training.hlo_traffic``: an estimate from the optimised HLO,
    with the tiled layouts' padding). A GPU executable has no cost analysis
    here: its bytes are ``hlo_traffic``'s estimate (``bytes_accessed_source``
    says so) and its FLOPs the caller's ``flops``.
    """
    compiled_started = time.time()
    compiled = lowered.compile()
    seconds += time.time() - compiled_started
    memory = compiled.memory_analysis()
    try:
        cost = compiled.cost_analysis() or {}
    except Exception:  # a GPU executable compiled without its device: not implemented
        cost = {}
    if isinstance(cost, list):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    gib = 2.0 ** 30
    used = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes \
        - memory.alias_size_in_bytes
    text = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as handle:
            handle.write(text)
    sharding = compiled.input_shardings[0][data_argument]
    # Where XLA gives no byte count (a GPU executable here), the estimate stands in for it.
    traffic = hlo_traffic.breakdown(text, top=breakdown) if breakdown or "bytes accessed" not in cost else None
    return dict(
        compile_seconds=round(seconds, 1),
        argument_gib=memory.argument_size_in_bytes / gib,
        output_gib=memory.output_size_in_bytes / gib,
        temp_gib=memory.temp_size_in_bytes / gib,
        alias_gib=memory.alias_size_in_bytes / gib,
        used_gib=used / gib,
        hbm_gib=hbm_gib,
        fits=used / gib < hbm_gib,
        # Memory taken as proportional to the batch (its fixed part counted per image too): a floor.
        batch_per_chip_that_fits_at_least=int(batch_per_chip * hbm_gib * gib // used) if used else None,
        flops=float(cost.get("flops", float("nan") if flops is None else flops)),
        bytes_accessed=float(cost["bytes accessed"] if "bytes accessed" in cost else traffic["bytes"]),
        bytes_accessed_source="XLA's cost analysis" if "bytes accessed" in cost else
        "estimate: the optimised program's instructions between memory (training.hlo_traffic)",
        collectives=collectives(text),
        # The images' partition, one entry per dimension: ["batch"] is split along the batch.
        data_sharding=[None if axis is None else str(axis) for axis in _first(sharding).spec],
        native_kernel="medt_native_attention" in text,
        **({"traffic": traffic} if breakdown else {}),
    )


def _first(tree):
    while isinstance(tree, (list, tuple)):
        tree = tree[0]
    return tree


def gpu_flops(config, batch_per_device):
    """FLOPs of one device's training step as a GPU runs it (``keras.ops`` attention), by XLA's cost analysis.

    Counted on the step lowered for this CPU, unoptimised: a GPU executable
    compiled without its device offers no cost analysis.
    """
    import dataclasses

    counted = dataclasses.replace(config, model_args={**config.model_args, "attention": "keras_ops"})
    cost = cpu_train_program(build_compiled_model(counted), counted, batch_per_device).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", float("nan")))


def compile_for(target, config, batch_per_chip=8, predict=True, breakdown=0, hlo_path=None):
    """``{"train": report, "predict": report}`` of ``config``'s programs compiled for ``target``."""
    import jax

    devices, hbm_gib = target_devices(target)
    model = build_compiled_model(config)
    flops = gpu_flops(config, batch_per_chip) if target.startswith("cuda:") else None
    # "chips": the devices of the slice; a v4 chip is two (its TensorCores), each with half its HBM.
    results = dict(target=target, chips=len(devices), batch_per_chip=batch_per_chip, model=config.model,
                   img_size=config.img_size, dtype=config.dtype, jax=jax.__version__)
    started = time.time()
    lowered = train_program(model, config, devices, batch_per_chip)
    # train_step(state, data): the data is the second argument, x its first entry.
    results["train"] = report(lowered, hbm_gib, time.time() - started, 1, batch_per_chip, breakdown, hlo_path,
                              flops)
    if predict:
        started = time.time()
        lowered = predict_program(model, config, devices, batch_per_chip)
        results["predict"] = report(lowered, hbm_gib, time.time() - started, 1, batch_per_chip, breakdown)
    return results


def main(argv=None):
    from training.config import apply_overrides, load_config, parser_with_overrides

    parser = parser_with_overrides(prog="medt-bench compile-for", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="tpu:GENERATION:SHAPE, e.g. tpu:v5e:2x2 or tpu:v5e:16x16 (256 chips), or "
                                       "cuda:GPU[xN], e.g. cuda:h100x8")
    parser.add_argument("--config", default="medt_hela")
    parser.add_argument("--batch-per-chip", type=int, default=8)
    parser.add_argument("--no-predict", action="store_true", help="compile the training program only")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--breakdown", type=int, default=0, metavar="N",
                        help="also where the memory traffic goes: the N largest instructions, operations and "
                             "sources (an estimate from the optimised HLO, tiled layouts' padding included)")
    parser.add_argument("--hlo", help="write the optimised training program's HLO text here")
    args = parser.parse_args(argv)
    try:
        config = apply_overrides(load_config(args.config), args)
        results = compile_for(args.target, config, args.batch_per_chip, predict=not args.no_predict,
                              breakdown=args.breakdown, hlo_path=args.hlo)
    except CompileTargetError as error:
        print(f"medt-bench compile-for: error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
