"""Parity of converted checkpoints with the official PyTorch code, measured.

Each case is an official checkpoint ``CASE.pth`` and, beside it,
``CASE.npz`` with what the official code computed from it (input, eval
logits in float32 and float64, train-mode logits, loss, every gradient and
the BatchNorm running statistics after one train-mode forward; see
``shared/fixtures/README.md``). ``compute_case`` converts the checkpoint
and recomputes all of these with the Keras model, ``compare_case`` measures
them against the official values, and ``measure_case`` does both.

Run ``python -m weights_converter.parity [CASE.pth | DIR ...]`` (or
``medt-parity``) for a report; with no argument, run in a checkout's root,
it checks the repository's fixtures in ``tests/fixtures/official`` and the
full-size ones in ``../shared/fixtures/official/full`` when they exist.
"""

import argparse
import dataclasses
import glob
import math
import os
import sys
import time

import numpy as np

from medt_keras import enable_float64, highest_matmul_precision
from weights_converter.convert import load_official_checkpoint
from weights_converter.mapping import official_entries

# Tolerances of the parity contract (relative to the reference's magnitude).
TOLERANCES = {
    "eval32": 1e-5,  # max |diff| / max |ref|, float32
    "eval64": 1e-10,  # float64 from here on
    "train64": 1e-10,
    "loss64": 1e-10,  # |diff| / |ref|
    "grad64": 1e-8,  # worst relative L2 error over all parameters (see ZERO_GRADIENT_FLOOR)
    "stats64": 1e-10,  # worst max |diff| / max |ref| over BN running stats
}

# Some gradients are tiny and come from cancellation: the four gates of a
# gated attention layer act only through BatchNorm's epsilon (BN(f x) is
# BN(x) but for eps), and a BatchNorm bias feeding a softmax or a train-mode
# BatchNorm has zero gradient in exact arithmetic. They are 1e-7..1e-22 of
# the whole gradient's norm and their float64 values carry rounding noise
# of about 1e-16 of that norm: the official run reports the zero ones as
# values near 1e-19, and merely reversing the batch order in our own model
# moves a gate's gradient by up to 1e-9 of itself. So each gradient's L2
# error is taken relative to its own norm or, where that is smaller, to
# this fraction of the whole gradient's norm (an absolute error of at most
# 1e-14 of the whole gradient for these). ``--worst`` shows the raw ratios.
ZERO_GRADIENT_FLOOR = 1e-6


@dataclasses.dataclass
class CaseResult:
    case: str
    architecture: str
    eval32: float
    eval64: float
    train64: float
    loss64: float
    grad64: float
    grad64_worst_key: str
    stats64: float
    stats64_worst_key: str
    counters_equal: bool
    grads_compared: int
    stats_compared: int
    seconds: float
    grad_errors: dict = dataclasses.field(default_factory=dict, repr=False)
    stats_errors: dict = dataclasses.field(default_factory=dict, repr=False)
    raw_grad_errors: dict = dataclasses.field(default_factory=dict, repr=False)

    def failures(self):
        failed = [name for name, tol in TOLERANCES.items() if not getattr(self, name) <= tol]
        if not self.counters_equal:
            failed.append("num_batches_tracked")
        return failed


def to_nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def to_nchw(a):
    return np.transpose(np.asarray(a), (0, 3, 1, 2))


def all_finite(*arrays):
    return all(bool(np.all(np.isfinite(np.asarray(a, dtype=np.float64)))) for a in arrays)


def relative_max(ours, reference):
    """max |ours - reference| / max |reference|; NaN (a failure) if either holds a NaN or an Inf."""
    if not all_finite(ours, reference):
        return float("nan")
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def worst_key(errors):
    """The key of the largest error, a NaN counting as larger than any number.

    ``max(errors, key=errors.get)`` would lose a NaN: it compares false
    both ways, so a NaN in any but the first entry is never picked.
    """
    return max(errors, key=lambda key: (math.isnan(errors[key]), errors[key]))


def jitted_forward(model, training):
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def forward(trainable, non_trainable, x):
        return model.stateless_call(trainable, non_trainable, x, training=training)[0]

    return lambda x: forward(trainable, non_trainable, x)


def cross_entropy(logits, target):
    """``F.cross_entropy`` (the official LogNLLLoss): mean over pixels, logits NHWC."""
    import jax
    import jax.numpy as jnp

    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, target[..., None], axis=-1)
    return -jnp.mean(picked)


def reference_path(pth_path):
    """``CASE.npz``, the official outputs beside the checkpoint ``CASE.pth``."""
    return os.path.splitext(pth_path)[0] + ".npz"


@dataclasses.dataclass
class CaseOutputs:
    """What the converted model computes from one case's input, in the official layouts.

    ``y_*`` are logits ``(batch, classes, height, width)``; ``grads`` and
    ``stats`` map official state_dict keys to the gradient of that
    parameter and to the BatchNorm buffer after the train-mode step.
    """

    case: str
    architecture: str
    y_eval32: np.ndarray
    y_eval64: np.ndarray
    y_train64: np.ndarray
    loss64: float
    grads: dict
    stats: dict
    seconds: float


@highest_matmul_precision()  # no TF32 on GPU, no bfloat16 passes on TPU
def compute_case(pth_path, npz_path=None):
    """Converts ``pth_path`` and runs it on the input in its ``.npz``: eval in float32 and float64, one train step."""
    import jax

    start = time.perf_counter()
    npz_path = npz_path or reference_path(pth_path)
    ref = np.load(npz_path)
    x = to_nhwc(ref["x"])

    model32 = load_official_checkpoint(pth_path, dtype="float32")
    architecture = type(model32).__name__
    y_eval32 = to_nchw(jitted_forward(model32, training=False)(x.astype(np.float32)))
    del model32

    enable_float64()
    model = load_official_checkpoint(pth_path, dtype="float64")
    x64 = x.astype(np.float64)
    y_eval64 = to_nchw(jitted_forward(model, training=False)(x64))

    # Every official parameter gets a gradient, the frozen gates included.
    entries = official_entries(model)
    for entry in entries:
        if entry.variable is not None and entry.variable.dtype.startswith("float"):
            if not entry.key.endswith(("running_mean", "running_var")) and "unused" not in entry.variable.path:
                entry.variable.trainable = True
    trainable_vars = model.trainable_variables
    non_trainable_vars = model.non_trainable_variables
    target = ref["target"].astype(np.int32)

    def loss_fn(trainable, non_trainable):
        logits, new_non_trainable = model.stateless_call(trainable, non_trainable, x64, training=True)
        return cross_entropy(logits, target), (logits, new_non_trainable)

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, (logits, new_non_trainable)), grads = step(
        [v.value for v in trainable_vars], [v.value for v in non_trainable_vars]
    )
    grad_of = {id(v): g for v, g in zip(trainable_vars, grads)}
    after_of = {id(v): a for v, a in zip(non_trainable_vars, new_non_trainable)}
    official_grads, official_stats = {}, {}
    for entry in entries:
        if entry.variable is None:
            continue
        if id(entry.variable) in grad_of:
            official_grads[entry.key] = entry.to_official(np.asarray(grad_of[id(entry.variable)]))
        if id(entry.variable) in after_of:
            official_stats[entry.key] = entry.to_official(np.asarray(after_of[id(entry.variable)]))
    return CaseOutputs(
        case=os.path.basename(os.path.splitext(pth_path)[0]),
        architecture=architecture,
        y_eval32=y_eval32,
        y_eval64=y_eval64,
        y_train64=to_nchw(logits),
        loss64=float(loss),
        grads=official_grads,
        stats=official_stats,
        seconds=time.perf_counter() - start,
    )


def compare_case(outputs, npz_path):
    """``outputs`` (``compute_case``) against the official values in ``npz_path``, as a ``CaseResult``."""
    ref = np.load(npz_path)
    eval32 = relative_max(outputs.y_eval32, ref["y_eval"])
    eval64 = relative_max(outputs.y_eval64, ref["y_eval64"])
    train64 = relative_max(outputs.y_train64, ref["y_train"])
    loss64 = float(abs(outputs.loss64 - float(ref["loss"])) / abs(float(ref["loss"])))
    if not all_finite(outputs.loss64, ref["loss"]):
        loss64 = float("nan")

    reference_grads = [k for k in ref.files if k.startswith("grad/")]
    reference_norm = np.sqrt(sum(np.sum(ref[k] ** 2) for k in reference_grads))
    grad_errors, stats_errors, raw_grad_errors = {}, {}, {}
    counters_equal = True
    for key, ours in outputs.grads.items():
        if "grad/" + key not in ref.files:
            continue
        reference = ref["grad/" + key]
        error = np.linalg.norm(ours - reference) if all_finite(ours, reference) else float("nan")
        scale = max(np.linalg.norm(reference), ZERO_GRADIENT_FLOOR * reference_norm)
        grad_errors[key] = float(error / scale)
        raw_grad_errors[key] = float(error / max(np.linalg.norm(reference), 1e-300))
    for key, ours in outputs.stats.items():
        if "after/" + key not in ref.files:
            continue
        if key.endswith("num_batches_tracked"):
            counters_equal &= int(ours) == int(ref["after/" + key])
        else:
            stats_errors[key] = relative_max(ours, ref["after/" + key])
    if len(grad_errors) != len(reference_grads):
        raise AssertionError(
            f"{npz_path}: {len(reference_grads) - len(grad_errors)} reference gradients have no Keras variable"
        )
    grad_worst = worst_key(grad_errors)
    stats_worst = worst_key(stats_errors)
    return CaseResult(
        case=outputs.case,
        architecture=outputs.architecture,
        eval32=eval32,
        eval64=eval64,
        train64=train64,
        loss64=loss64,
        grad64=grad_errors[grad_worst],
        grad64_worst_key=grad_worst,
        stats64=stats_errors[stats_worst],
        stats64_worst_key=stats_worst,
        counters_equal=bool(counters_equal),
        grads_compared=len(grad_errors),
        stats_compared=len(stats_errors),
        seconds=outputs.seconds,
        grad_errors=grad_errors,
        stats_errors=stats_errors,
        raw_grad_errors=raw_grad_errors,
    )


def measure_case(pth_path, npz_path=None):
    """Converts ``pth_path`` and compares it with its ``.npz`` in every way (``compute_case``, ``compare_case``)."""
    npz_path = npz_path or reference_path(pth_path)
    return compare_case(compute_case(pth_path, npz_path), npz_path)


def default_case_paths(root="."):
    """The cases a checkout offers, found from ``root`` (the folder a command runs in).

    The tiny fixtures in ``tests/fixtures/official`` and the full-size ones in
    ``../shared/fixtures/official/full`` where they exist. Installed code never
    looks beside itself: run from a checkout's root, or name the cases.
    """
    folders = [
        os.path.join(root, "tests", "fixtures", "official"),
        os.path.join(root, "..", "shared", "fixtures", "official", "full"),
    ]
    return [p for folder in folders for p in sorted(glob.glob(os.path.join(folder, "*.pth")))]


def expand_case_paths(paths):
    result = []
    for path in paths:
        if os.path.isdir(path):
            result += sorted(glob.glob(os.path.join(path, "*.pth")))
        else:
            result.append(path)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="medt-parity",
        description="Convert official MedT checkpoints and measure parity with the official outputs.",
    )
    parser.add_argument("paths", nargs="*", help=".pth files or folders of CASE.pth + CASE.npz")
    parser.add_argument(
        "--worst", type=int, default=0, metavar="N", help="also list the N worst gradients and statistics"
    )
    args = parser.parse_args(argv)
    paths = expand_case_paths(args.paths) if args.paths else default_case_paths()
    if not paths:
        print("medt-parity: no cases given, and none found from this folder (tests/fixtures/official of a "
              "checkout): name CASE.pth files or folders of them", file=sys.stderr)
        return 2
    header = (
        f"{'case':<52} {'model':<15} {'eval f32':>9} {'eval f64':>9} {'train f64':>9} "
        f"{'loss f64':>9} {'grad f64':>9} {'BN stats':>9} {'time':>6}"
    )
    print(header)
    print(f"{'tolerance':<52} {'':<15} " + " ".join(f"{TOLERANCES[k]:>9.0e}" for k in TOLERANCES))
    failed = 0
    for path in paths:
        r = measure_case(path)
        bad = r.failures()
        failed += bool(bad)
        print(
            f"{r.case:<52} {r.architecture:<15} {r.eval32:>9.1e} {r.eval64:>9.1e} {r.train64:>9.1e} "
            f"{r.loss64:>9.1e} {r.grad64:>9.1e} {r.stats64:>9.1e} {r.seconds:>5.0f}s"
            + ("  FAIL: " + ", ".join(bad) if bad else ""),
            flush=True,
        )
        for title, errors in (
            ("gradient", r.grad_errors),
            ("raw gradient", r.raw_grad_errors),
            ("BN statistic", r.stats_errors),
        ):
            for key in sorted(errors, key=lambda k: (math.isnan(errors[k]), errors[k]), reverse=True)[: args.worst]:
                print(f"    {title:<12} {key:<60} {errors[key]:.1e}")
    print(f"{len(paths) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
