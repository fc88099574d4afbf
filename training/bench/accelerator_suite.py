r"""``medt-bench suite accelerator``: everything worth knowing about one device, in one budgeted run.

Written for a machine lent for a few minutes: it runs in one process (JAX
starts once), measures the most valuable numbers first, writes the JSON after
every item (a run killed at its time limit keeps what it measured), records a
failing item as an error and goes on, and skips any item whose estimated cost
(from the compile and step times measured so far) would overrun
``--budget-s``. How to run it on a remote device session:
``docs/accelerators.md`` ("The accelerator suite").

Order of work (each line one or more items):

1. platform: host, Python, jax/jaxlib/keras/numpy versions, JAX backend,
   devices, ``memory_stats()`` of device 0 (``None`` on CPU), XLA
   environment variables, ``jax.print_environment_info`` (nvidia-smi on GPUs);
2. peak: an n^3 float32 matrix product at default and at highest
   precision (TF32 or not on NVIDIA GPUs) and a bfloat16 one, in GFLOP/s
   (n = 8192 on accelerators, 2048 and 512 on CPUs);
3. parity with the official outputs, at most ``--parity-budget-s`` of the
   budget: at highest matmul precision the whole contract
   (``weights_converter.parity.measure_case``: float32 eval, float64 eval,
   train, loss, gradients, BatchNorm statistics), at default precision the
   float32 eval only (what TF32 does to it). First the tiny fixtures found
   from ``--fixtures-root`` (``tests/fixtures/official``, every architecture)
   at highest; then each full-size one found there
   (``../shared/fixtures/official/full`` or ``shared/fixtures/official/full``;
   MedT, gated first) at default, then highest; the tiny ones at default last;
4. throughput of our models through ``train_on_batch`` / ``predict_on_batch``
   (images/s, compile seconds, device memory): the first model at the first
   size, float32 then mixed_bfloat16, the first two batch sizes; the other
   models the same; the larger batch sizes; the other image sizes (first two
   batch sizes);
5. the official PyTorch code (``--official PATH``, a checkout of
   jeya-maria-jose/Medical-Transformer) on the same device, when ``import
   torch`` works and ``torch.cuda.is_available()``; else one item "skipped"
   with the reason.

JSON (``--json FILE``, rewritten after every item)::

    {"suite": "accelerator", "command": str, "started_utc": str,
     "budget_s": float, "elapsed_s": float, "finished": bool,
     "platform": {...},
     "items": [{"kind": "peak" | "parity" | "throughput" | "official",
                "name": str, "status": "ok" | "error" | "skipped",
                "seconds": float,          # wall time of the item
                "error": str,              # status "error": exception and message
                "reason": str,             # status "skipped"
                "device_memory": {"bytes_in_use", "peak_bytes_in_use"} | null,
                ...the item's numbers}],
     "counts": {"ok": int, "error": int, "skipped": int}}

A throughput item holds model, size, batch, dtype, train_seconds,
infer_seconds (medians of ``--repeats``), train/infer_images_per_second,
compile_train_seconds / compile_infer_seconds (first call minus one step),
train_flops_per_image (XLA's cost analysis of forward+backward, once per
model and size), train_tflops_per_second. ``peak_bytes_in_use`` is the
process's peak so far (JAX offers no reset): items run in rising batch size,
so an increase is the item's own.
"""

import gc
import glob
import json
import os
import pathlib
import platform
import sys
import time
import traceback

from training.bench import ours
from training.bench.official import measure_official_cuda, torch_cuda_unavailable
from training.bench.records import write_json
from training.bench.tables import fmt
from training.bench.timing import matmul_gflops, median_seconds

DEFAULT_BUDGET_S = 420.0
DEFAULT_PARITY_BUDGET_S = 150.0
UNMEASURED_ESTIMATE_S = 30.0  # an item's assumed cost when nothing like it has been measured


def device_memory():
    """``{"bytes_in_use", "peak_bytes_in_use", "bytes_limit"}`` of device 0; ``None`` where JAX has none (CPU)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001  (some backends raise instead of returning None)
        return None
    if not stats:
        return None
    return {key: int(stats[key]) for key in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if key in stats}


def platform_info():
    """The host, the versions and the devices, as a JSON-ready dict."""
    import jax
    import jaxlib
    import keras
    import numpy as np

    devices = jax.devices()
    info = {
        "host": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "default_matmul_precision": jax.config.jax_default_matmul_precision,  # None: the backend's own (TF32)
        "devices": [
            {"id": d.id, "platform": d.platform, "device_kind": d.device_kind, "str": str(d)} for d in devices
        ],
        "device_memory_stats": None,
        "environment": {
            name: os.environ[name]
            for name in sorted(os.environ)
            if name.startswith(("XLA_", "JAX_", "TF_", "NVIDIA_", "CUDA_")) or name in ("LD_PRELOAD", "KERAS_BACKEND")
        },
    }
    try:
        stats = devices[0].memory_stats()
        info["device_memory_stats"] = None if not stats else {k: int(v) for k, v in stats.items()}
    except Exception as error:  # noqa: BLE001
        info["device_memory_stats"] = f"{type(error).__name__}: {error}"
    try:
        info["environment_info"] = jax.print_environment_info(return_string=True)
    except Exception as error:  # noqa: BLE001
        info["environment_info"] = f"{type(error).__name__}: {error}"
    return info


def parity_highest(path):
    """The whole parity contract of one fixture at highest matmul precision; errors relative, see parity.TOLERANCES."""
    import jax

    from weights_converter.parity import TOLERANCES, measure_case

    with jax.default_matmul_precision("highest"):
        r = measure_case(path)
    fields = ("architecture", "eval32", "eval64", "train64", "loss64", "grad64", "grad64_worst_key",
              "stats64", "stats64_worst_key", "counters_equal", "grads_compared", "stats_compared")
    result = {field: getattr(r, field) for field in fields}
    result.update(precision="highest", failures=r.failures(), tolerances=dict(TOLERANCES))
    return result


def parity_eval32_default(path):
    """``eval32`` of one fixture (max |ours - official| / max |official|, float32 eval) at default precision."""
    import numpy as np

    from weights_converter.convert import load_official_checkpoint
    from weights_converter.parity import TOLERANCES, jitted_forward, reference_path, relative_max, to_nchw, to_nhwc

    ref = np.load(reference_path(path))
    model = load_official_checkpoint(path, dtype="float32")
    y = to_nchw(jitted_forward(model, training=False)(to_nhwc(ref["x"]).astype(np.float32)))
    eval32 = relative_max(y, ref["y_eval"])
    return {"architecture": type(model).__name__, "precision": "default", "eval32": eval32,
            "within_tolerance": eval32 <= TOLERANCES["eval32"]}


_flops_cache = {}


def measure_throughput(model_name, size, batch, dtype="float32", repeats=5, model_kwargs=None):
    """Training (``train_on_batch``: forward, backward, Adam) and inference (``predict_on_batch``) speed.

    Inputs: random ``(batch, size, size, 3)`` float32 images, ``(batch, size, size)``
    int32 labels; the same batch size for both. Built fresh with
    ``model_kwargs`` replacing the official hyperparameters (for tiny test models).
    """
    import medt_keras  # noqa: F401  (the JAX backend, before Keras loads)
    import keras
    import numpy as np

    keras.backend.clear_session()
    model = ours.compiled_model(model_name, size, dtype=dtype, **(model_kwargs or {}))
    x, y, _ = ours.random_inputs(size, batch)
    start = time.perf_counter()
    model.train_on_batch(x, y)  # returns host floats: synchronised
    first_train = time.perf_counter() - start
    train = median_seconds(lambda: model.train_on_batch(x, y), repeats)
    start = time.perf_counter()
    np.asarray(model.predict_on_batch(x))
    first_infer = time.perf_counter() - start
    infer = median_seconds(lambda: np.asarray(model.predict_on_batch(x)), repeats)

    result = {
        "model": model_name, "size": size, "batch": batch, "dtype": dtype, "repeats": repeats,
        "train_seconds": train, "infer_seconds": infer,
        "train_images_per_second": batch / train, "infer_images_per_second": batch / infer,
        "compile_train_seconds": max(first_train - train, 0.0),
        "compile_infer_seconds": max(first_infer - infer, 0.0),
        "parameters": int(model.count_params()),
    }
    key = (model_name, size, json.dumps(model_kwargs or {}, sort_keys=True))
    if key not in _flops_cache:
        try:
            # Lowered, not compiled: costs tracing only.
            flops = ours.xla_flops(ours.lower_step(model, x, y, "train")) / batch
            _flops_cache[key] = None if flops != flops else flops
        except Exception as error:  # noqa: BLE001  (FLOPs are a bonus; the timing stands)
            _flops_cache[key] = None
            result["flops_error"] = f"{type(error).__name__}: {error}"[:300]
    flops = _flops_cache[key]
    result["train_flops_per_image"] = flops
    result["train_tflops_per_second"] = None if flops is None else flops * batch / train / 1e12
    del model
    keras.backend.clear_session()
    gc.collect()
    return result


def _is_tiny(path):
    """A shipped tiny fixture (under a ``tests`` folder), not a full-size one."""
    return "tests" in pathlib.Path(os.path.abspath(path)).parts


def fixture_paths(explicit, root="."):
    """Fixtures to check: ``explicit`` paths/folders, else those found from ``root``: tiny, then full-size.

    Full-size: MedT, then gated, then the others.

    From ``root``: ``weights_converter.parity.default_case_paths(root)`` and,
    for a device machine where only the checkout travels, its own
    ``shared/fixtures/official/full``.
    """
    from weights_converter.parity import default_case_paths, expand_case_paths

    if explicit:
        return expand_case_paths(explicit)
    paths = default_case_paths(root)
    paths += sorted(glob.glob(os.path.join(root, "shared", "fixtures", "official", "full", "*.pth")))
    seen, unique = set(), []
    for path in paths:
        if os.path.basename(path) not in seen:
            seen.add(os.path.basename(path))
            unique.append(path)
    rank = {"medt": 0, "gated": 1, "logo": 2, "axialunet": 3}
    tiny = [p for p in unique if _is_tiny(p)]
    full = sorted((p for p in unique if p not in tiny), key=lambda p: rank.get(os.path.basename(p).split("_")[0], 9))
    return tiny + full


class Suite:
    """Runs items in order within a time budget, recording each and saving the JSON after each."""

    def __init__(self, budget_s, json_path, command):
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.json_path = json_path
        self.report = {
            "suite": "accelerator",
            "command": command,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "budget_s": budget_s,
            "elapsed_s": 0.0,
            "finished": False,
            "platform": None,
            "items": [],
            "counts": {"ok": 0, "error": 0, "skipped": 0},
        }

    def elapsed(self):
        return time.perf_counter() - self.start

    def save(self):
        self.report["elapsed_s"] = self.elapsed()
        counts = {"ok": 0, "error": 0, "skipped": 0}
        for item in self.report["items"]:
            counts[item["status"]] += 1
        self.report["counts"] = counts
        write_json(self.json_path, self.report, default=str)

    def skip(self, kind, name, reason, **meta):
        item = dict(kind=kind, name=name, status="skipped", reason=reason, seconds=0.0, **meta)
        self._record(item)
        return item

    def run(self, kind, name, fn, estimate_s=None, limit_s=None, **meta):
        """Runs ``fn()`` (a dict of results) unless ``estimate_s`` would overrun the budget (or ``limit_s``).

        Returns the recorded item (``status`` ok, error or skipped).
        """
        left = self.budget_s - self.elapsed()
        if limit_s is not None:
            left = min(left, limit_s)
        if estimate_s is not None and estimate_s > left:
            reason = f"over budget: estimated {estimate_s:.1f} s, {max(left, 0):.1f} s left"
            return self.skip(kind, name, reason, **meta)
        if left <= 0:
            return self.skip(kind, name, "over budget: no time left", **meta)
        item = dict(kind=kind, name=name, **meta)
        start = time.perf_counter()
        try:
            item.update(fn())
            item["status"] = "ok"
        except Exception as error:  # noqa: BLE001  (one failing measurement must not end the suite)
            item["status"] = "error"
            item["error"] = f"{type(error).__name__}: {error}"[:2000]
            item["traceback"] = traceback.format_exc()[-3000:]
        item["seconds"] = time.perf_counter() - start
        try:
            item["device_memory"] = device_memory()
        except Exception:  # noqa: BLE001
            item["device_memory"] = None
        self._record(item)
        return item

    def _record(self, item):
        self.report["items"].append(item)
        self.save()
        try:
            line = summary(item)
        except (KeyError, TypeError, ValueError):  # an item without the usual numbers still gets its line
            line = f"{item['status']} ({item['seconds']:.1f} s)"
        print(f"[{self.elapsed():7.1f} s] {item['kind']:<10} {item['name']:<58} {line}", flush=True)


def summary(item):
    """One line for the console."""
    if item["status"] == "skipped":
        return "skipped: " + item["reason"]
    if item["status"] == "error":
        return f"ERROR ({item['seconds']:.1f} s): " + item["error"].splitlines()[0][:200]
    kind, took = item["kind"], f"({item['seconds']:.1f} s)"
    if kind == "peak":
        return f"{item['gflops']:.0f} GFLOP/s {took}"
    if kind == "parity" and item["precision"] == "highest":
        verdict = "FAIL " + ",".join(item["failures"]) if item["failures"] else "pass"
        return (f"eval32 {item['eval32']:.1e} eval64 {item['eval64']:.1e} train64 {item['train64']:.1e} "
                f"grad64 {item['grad64']:.1e} stats64 {item['stats64']:.1e} {verdict} {took}")
    if kind == "parity":
        return f"eval32 {item['eval32']:.1e} ({'within' if item['within_tolerance'] else 'over'} 1e-5) {took}"
    if kind in ("throughput", "official"):
        memory = (item.get("device_memory") or {}).get("peak_bytes_in_use")
        compile_s = item.get("compile_train_seconds", 0) + item.get("compile_infer_seconds", 0)
        return (f"train {item['train_images_per_second']:.1f} img/s, "
                f"infer {item['infer_images_per_second']:.1f} img/s, "
                f"compile {compile_s:.1f} s, peak {fmt(memory and memory / 2**30, '.2f', missing='-')} GiB {took}")
    return took


def throughput_estimate(done, model, size, batch, dtype, repeats):
    """Seconds a throughput item should take, from the finished ones; ``None`` when nothing is known yet.

    Prefers the same model, size and dtype (compile as measured, step time
    scaled linearly with the batch: conservative); then the same model and
    size in another dtype; then the same model at another size (steps and
    compile scaled by the pixel ratio); else the slowest item so far.
    """
    ok = [i for i in done if i["kind"] == "throughput" and i["status"] == "ok"]
    for match in (
        lambda i: (i["model"], i["size"], i["dtype"]) == (model, size, dtype),
        lambda i: (i["model"], i["size"]) == (model, size),
        lambda i: i["model"] == model,
    ):
        same = [i for i in ok if match(i)]
        if same:
            ref = max(same, key=lambda i: i["batch"])
            pixels = (size / ref["size"]) ** 2
            steps = (repeats + 1) * (ref["train_seconds"] + ref["infer_seconds"]) * batch / ref["batch"] * pixels
            compile_s = (ref["compile_train_seconds"] + ref["compile_infer_seconds"]) * max(1.0, pixels ** 0.5)
            return compile_s + steps + 2.0  # + model build
    return max((i["seconds"] for i in ok), default=None)


def add_arguments(parser):
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="start no item expected to end after this many seconds from the start")
    parser.add_argument("--parity-budget-s", type=float, default=DEFAULT_PARITY_BUDGET_S,
                        help="at most this much of the budget on parity")
    parser.add_argument("--json", metavar="FILE", help="write the report here (after every item)")
    parser.add_argument("--models", nargs="+", default=["medt", "gated"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256],
                        help="image sizes; the first gets every batch size, the others the first two")
    parser.add_argument("--batches", nargs="+", type=int, default=[4, 8, 16, 32, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "mixed_bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fixtures", nargs="*", default=None,
                        help="parity fixtures (.pth or folders); default: those found from --fixtures-root, tiny "
                             "then full-size; none given: skip parity")
    parser.add_argument("--fixtures-root", default=".", metavar="DIR",
                        help="where the default fixtures are looked for: DIR/tests/fixtures/official, "
                             "DIR/../shared/fixtures/official/full, DIR/shared/fixtures/official/full "
                             "(default: the working folder, a checkout's root)")
    parser.add_argument("--official", metavar="PATH", help="checkout of the official MedT repository (lib/ is enough)")
    parser.add_argument("--official-batches", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--model-kwargs", type=json.loads, default=None, metavar="JSON",
                        help='hyperparameters replacing the official ones, e.g. \'{"width_scale": 0.03125}\' (tests)')
    parser.add_argument("--no-peak", action="store_true", help="skip the matrix-product peaks")


def _peaks(suite, accelerator):
    """What fraction of the device the models reach needs a ceiling.

    ``medt-bench models``' 2048^3 is dispatch-bound on a large GPU (tens of
    microseconds), so accelerators get 8192^3; bfloat16 is slow on CPUs.
    """
    n32, n16 = (8192, 8192) if accelerator else (2048, 512)
    for dtype, precision, n in (("float32", None, n32), ("float32", "highest", n32), ("bfloat16", None, n16)):
        suite.run("peak", f"{dtype} {n}^3 {precision or 'default'} precision",
                  lambda d=dtype, p=precision, n=n: matmul_gflops(d, p, n), estimate_s=30)


def _parity(suite, args):
    """The contract at highest precision on the tiny fixtures (every architecture, cheap); then each full-size one
    at default precision (cheap: one float32 forward, shows what TF32 does at full width) and at highest; the tiny
    ones at default precision last."""
    import jax

    fixtures = fixture_paths(args.fixtures, args.fixtures_root) if args.fixtures != [] else []
    is_full = {path: not _is_tiny(path) for path in fixtures}
    order = [(p, "highest") for p in fixtures if not is_full[p]]
    order += [(p, precision) for p in fixtures if is_full[p] for precision in ("default", "highest")]
    order += [(p, "default") for p in fixtures if not is_full[p]]
    parity_start = suite.elapsed()
    durations = {}
    for path, precision in order:
        case = os.path.basename(os.path.splitext(path)[0])
        full = is_full[path]
        fn = parity_highest if precision == "highest" else parity_eval32_default
        # Until one is measured, a full-size case is guessed at 3x the slowest
        # tiny contract, its float32 eval alone at 1x.
        tiny = durations.get((False, "highest"), 1.0)
        known = durations.get((full, precision)) or (None if not full else tiny * (3 if precision == "highest" else 1))
        item = suite.run(
            "parity", f"{case} {precision}", lambda fn=fn, path=path: fn(path),
            estimate_s=known, limit_s=args.parity_budget_s - (suite.elapsed() - parity_start),
            case=case, fixture=path, full_size=full, precision=precision,
        )
        if item["status"] == "ok":
            durations[(full, precision)] = max(durations.get((full, precision), 0), item["seconds"])
    if fixtures:
        # measure_case turned on x64; throughput is of the float32/bfloat16 models as users run them.
        jax.config.update("jax_enable_x64", False)


def _throughput(suite, args, models):
    """Most valuable first: every model at the first size and the first two batches, then larger ones, then sizes."""
    first, others = args.sizes[0], args.sizes[1:]
    small, large = args.batches[:2], args.batches[2:]
    plan = []
    for model in models:
        plan += [(model, first, dtype, b) for dtype in args.dtypes for b in small]
    plan += [(model, first, dtype, b) for b in large for model in models for dtype in args.dtypes]
    plan += [(model, size, dtype, b) for size in others for model in models for dtype in args.dtypes for b in small]
    for model, size, dtype, batch in plan:
        estimate = throughput_estimate(suite.report["items"], model, size, batch, dtype, args.repeats)
        # Nothing measured yet: a full model's first compile takes tens of seconds; start none in less.
        estimate = UNMEASURED_ESTIMATE_S if estimate is None else estimate
        suite.run(
            "throughput", f"{model} {size}x{size} batch {batch} {dtype}",
            lambda m=model, s=size, d=dtype, b=batch: measure_throughput(m, s, b, d, args.repeats, args.model_kwargs),
            estimate_s=estimate, model=model, size=size, batch=batch, dtype=dtype,
        )


def _official(suite, args, models):
    """The official PyTorch code on the same device, at the first size."""
    from medt_keras.models.registry import get_spec

    first = args.sizes[0]
    reason = None if args.official else "no --official checkout given"
    reason = reason or torch_cuda_unavailable()
    if reason:
        suite.skip("official", "official PyTorch", reason)
        return
    for model in models:
        for batch in args.official_batches:
            builder = get_spec(model).official_builder
            suite.run(
                "official", f"official {model} {first}x{first} batch {batch}",
                lambda b=builder, n=batch: measure_official_cuda(args.official, b, first, n, args.repeats),
                estimate_s=UNMEASURED_ESTIMATE_S, model=model, size=first, batch=batch, dtype="float32",
            )


def run(args):
    """The whole suite, items in the order of the module's docstring."""
    import medt_keras  # noqa: F401  (selects JAX)
    import jax

    from medt_keras.models.registry import get_spec

    suite = Suite(args.budget_s, args.json, args.command)
    try:
        suite.report["platform"] = platform_info()
    except Exception as error:  # noqa: BLE001
        suite.report["platform"] = {"error": f"{type(error).__name__}: {error}"}
    platform_line = suite.report["platform"]
    print(f"platform: {platform_line.get('backend')} {[d['device_kind'] for d in platform_line.get('devices', [])]} "
          f"jax {platform_line.get('jax')} jaxlib {platform_line.get('jaxlib')}", flush=True)
    suite.save()
    if not args.no_peak:
        _peaks(suite, accelerator=jax.default_backend() != "cpu")
    _parity(suite, args)
    models = [get_spec(m).name for m in args.models]
    _throughput(suite, args, models)
    _official(suite, args, models)
    suite.report["finished"] = True
    suite.save()
    counts = suite.report["counts"]
    print(f"done in {suite.elapsed():.0f} s: {counts['ok']} ok, {counts['error']} errors, "
          f"{counts['skipped']} skipped" + (f"; wrote {args.json}" if args.json else ""), flush=True)
    return 0
