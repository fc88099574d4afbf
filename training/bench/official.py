"""The official PyTorch code, as the benchmark imports, builds and times it.

None of the official code is part of this project: ``--official PATH`` names a
checkout of jeya-maria-jose/Medical-Transformer (its ``lib/`` is enough).
``import_axialnet`` is the one way it is imported, ``train_step`` and
``infer_step`` the one way it is run. ``measure_official`` times it once in a
fresh process (``medt-bench models --official PATH``), ``OfficialTimer`` keeps
it built and times steps on request in any configuration of
``official_configs`` (the interleaved comparison's worker), and
``measure_official_cuda`` times it on a CUDA device (the accelerator suite).

Nothing here imports JAX: these processes must not carry it in their memory.
"""

import os
import sys

from training.bench.ours import random_inputs
from training.bench.timing import median_seconds, peak_rss_gib, time_then_sample


def official_builder(model_name):
    """The name of the official ``lib.models.axialnet`` function that builds ``model_name``."""
    from medt_keras.models.registry import get_spec

    return get_spec(model_name).official_builder


def import_axialnet(checkout):
    """The official ``lib.models.axialnet`` module of a checkout, imported without its unused dependencies.

    ``lib/__init__`` imports torchvision, and ``axialnet`` imports matplotlib
    without using it: empty stand-ins in ``sys.modules`` take their place.
    """
    import types

    for name in ("matplotlib", "matplotlib.pyplot"):
        sys.modules.setdefault(name, types.ModuleType(name))  # imported, never used
    lib = types.ModuleType("lib")  # skip lib/__init__, which imports torchvision
    lib.__path__ = [os.path.join(checkout, "lib")]
    sys.modules["lib"] = lib
    from lib.models import axialnet

    return axialnet


def build_official(builder, size, device=None, memory_format=None):
    """``(model, optimizer)``: the official model (``builder`` of axialnet, 3 channels), Adam as in its train.py."""
    import torch

    model = builder(img_size=size, imgchan=3)
    if device is not None:
        model = model.to(device)
    if memory_format is not None:
        model = model.to(memory_format=memory_format)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)


def torch_inputs(size, batch, infer_batch, device=None):
    """``(x, y, x_infer)`` of ``ours.random_inputs`` as torch tensors (NCHW images, int64 masks)."""
    import torch

    x, y, x_infer = random_inputs(size, batch, infer_batch, channels_first=True)
    tensors = [torch.from_numpy(x), torch.from_numpy(y.astype("int64")), torch.from_numpy(x_infer)]
    return tuple(t if device is None else t.to(device) for t in tensors)


def train_step(model, optimizer, x, y):
    """One training step: cross-entropy of the logits, backward, Adam."""
    import torch

    model.train()
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def infer_step(model, x):
    """One inference batch (eval mode, no autograd)."""
    import torch

    model.eval()
    with torch.inference_mode():
        model(x)


def measure_official(checkout, model_name, official_builder, size, batch, infer_batch, repeats):
    """The official model's training step and inference, PyTorch on every core, with the steps' memory."""
    import torch

    torch.set_num_threads(os.cpu_count())
    model, optimizer = build_official(getattr(import_axialnet(checkout), official_builder), size)
    x, y, x_infer = torch_inputs(size, batch, infer_batch)
    step = lambda: train_step(model, optimizer, x, y)  # noqa: E731
    step()
    train, step_memory = time_then_sample(step, repeats)
    infer_step(model, x_infer)
    inference = median_seconds(lambda: infer_step(model, x_infer), repeats)
    return {
        "implementation": "official PyTorch " + torch.__version__,
        "train_seconds": train,
        "infer_seconds": inference,
        "train_images_per_second": batch / train,
        "infer_images_per_second": infer_batch / inference,
        "train_step_peak_rss_gib": step_memory.peak_gib,
        "peak_rss_gib": peak_rss_gib(),
    }


def torch_cuda_unavailable():
    """Why the official code cannot run on a CUDA device here, or ``None`` if it can."""
    try:
        import torch
    except Exception as error:  # noqa: BLE001
        return f"import torch failed: {type(error).__name__}: {error}"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


def measure_official_cuda(checkout, official_builder, size, batch, repeats=5):
    """The official PyTorch model's train step (cross-entropy, Adam) and inference on the CUDA device."""
    import time

    import torch

    device = torch.device("cuda")
    model, optimizer = build_official(getattr(import_axialnet(checkout), official_builder), size, device=device)
    x, y, _ = torch_inputs(size, batch, batch, device=device)

    def step():
        train_step(model, optimizer, x, y)
        torch.cuda.synchronize()

    def infer():
        infer_step(model, x)
        torch.cuda.synchronize()

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    first_train = time.perf_counter() - start
    train = median_seconds(step, repeats)
    infer()
    inference = median_seconds(infer, repeats)
    result = {
        "implementation": "official PyTorch " + torch.__version__,
        "size": size, "batch": batch, "repeats": repeats,
        "train_seconds": train, "infer_seconds": inference,
        "train_images_per_second": batch / train, "infer_images_per_second": batch / inference,
        "first_train_step_seconds": first_train,
        "torch_peak_bytes_allocated": int(torch.cuda.max_memory_allocated()),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
    }
    del model, optimizer
    torch.cuda.empty_cache()
    return result


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


def official_environment(env, policy):
    """``env`` with ``OMP_WAIT_POLICY`` set to ``policy`` (None: OpenMP's default, any inherited setting dropped)."""
    env = {key: value for key, value in env.items() if key != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    return env


class OfficialTimer:
    """The official PyTorch model, timed on request in any configuration of ``official_configs``.

    One model and Adam optimiser per memory format, built on first use with
    the same seed; ``torch.set_num_threads`` before each request. The
    inter-op pool is sized once, before any parallel work, as PyTorch requires.
    """

    def __init__(self, checkout, official_builder, size, batch, infer_batch, interop_threads=1):
        import torch

        torch.set_num_interop_threads(int(interop_threads))
        self.torch = torch
        self.builder = getattr(import_axialnet(checkout), official_builder)
        self.size = size
        self.interop_threads = int(interop_threads)
        self.x, self.y, self.x_infer = torch_inputs(size, batch, infer_batch)
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
            fmt = torch.channels_last if last else torch.contiguous_format
            model, optimizer = build_official(self.builder, self.size, memory_format=fmt)
            self.models[last] = (model, optimizer, self.x.contiguous(memory_format=fmt),
                                 self.x_infer.contiguous(memory_format=fmt))
        return self.models[last]

    def train(self, config):
        model, optimizer, x, _ = self._setup(config)
        train_step(model, optimizer, x, self.y)

    def infer(self, config):
        model, _, _, x = self._setup(config)
        infer_step(model, x)
