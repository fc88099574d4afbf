"""medt-train's programs compiled for TPU slices on this CPU, without a TPU (training/compile_for.py).

The compiles run in a child process with ``JAX_PLATFORMS=cpu`` (libtpu,
from the ``aot`` extra, would otherwise try to start a TPU). They need
libtpu; without it they skip, saying so.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from training.compile_for import CompileTargetError, collectives, gpu_devices, tpu_devices

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
NEEDS_LIBTPU = pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed: pip install "medt-keras[aot]"')
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_plugins") is not None and \
    importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
# The CUDA wheels are about 5 GB installed: .ci/run leaves them out, and these tests are run
# (and the cuda-h100x8 JSON in benchmarks/compiled/ checked in) where they are installed.
NEEDS_CUDA_PLUGIN = pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason='JAX\'s CUDA plugin is not installed: '
                                       'pip install "jax[cuda12]" (about 5 GB) to compile for H100s here')

# One child process: the default model (attention="auto") compiled for a v5e 2x2 slice and
# for this CPU; a tiny MedT for a 256-chip v5e slice.
CHILD = """
import json, sys
from training import compile_for
from training.config import TrainConfig
from medt_keras.kernels import native_attention

tiny = dict(model_args={"blocks": [1, 1, 1, 1], "groups": 2}, img_size=32)
results = {}
gated = TrainConfig(model="gated", **tiny)
results["gated_v5e_2x2"] = compile_for.compile_for("tpu:v5e:2x2", gated, batch_per_chip=2, predict=False)
model = compile_for.build_compiled_model(gated)
cpu = compile_for.cpu_train_program(model, gated, batch=2).compile().as_text()
results["cpu_native"] = "medt_native_attention" in cpu
results["native_built"] = native_attention.build_reason() is None
medt = TrainConfig(model="medt", model_args={**tiny["model_args"], "patch_grid": 1}, img_size=32)
results["medt_v5e_16x16"] = compile_for.compile_for("tpu:v5e:16x16", medt, batch_per_chip=1, predict=False)
print("RESULTS " + json.dumps(results))
"""


def _compiled_in_a_child(code):
    """The JSON a child process with ``JAX_PLATFORMS=cpu`` prints after ``RESULTS ``."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [row for row in result.stdout.splitlines() if row.startswith("RESULTS ")][-1]
    return json.loads(line.removeprefix("RESULTS "))


def test_collectives_are_counted_by_kind():
    text = """
  %a = f32[4]{0} all-reduce(f32[4]{0} %x), replica_groups={}
  %b = f32[8]{0} all-gather-start(f32[4]{0} %y), dimensions={0}
  %c = f32[8]{0} all-reduce-start(f32[8]{0} %z)
  %d = f32[8]{0} add(f32[8]{0} %all-reduce.1, f32[8]{0} %z)
"""
    assert collectives(text) == {"all-reduce": 2, "all-gather": 1, "reduce-scatter": 0, "collective-permute": 0,
                                 "all-to-all": 0}


def test_targets_are_checked(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    for target in ("cuda:a100", "cuda:h100xN", "gpu:h100"):
        with pytest.raises(CompileTargetError, match="cuda:GPU"):
            gpu_devices(target)
    for target, message in (("gpu:h100", "tpu:GENERATION:SHAPE"), ("tpu:v9:2x2", "unknown TPU generation"),
                            ("tpu", "tpu:GENERATION:SHAPE")):
        with pytest.raises(CompileTargetError, match=message):
            tpu_devices(target)
    monkeypatch.setenv("JAX_PLATFORMS", "")
    with pytest.raises(CompileTargetError, match="JAX_PLATFORMS=cpu"):
        tpu_devices("tpu:v5e:2x2")


@NEEDS_LIBTPU
@pytest.mark.slow
def test_training_compiles_for_tpu_slices_sharded_by_all_reduce_and_fits():
    results = _compiled_in_a_child(CHILD)
    for name, chips in (("gated_v5e_2x2", 4), ("medt_v5e_16x16", 256)):
        train = results[name]["train"]
        assert results[name]["chips"] == chips, name
        assert train["data_sharding"] == ["batch"], (name, train["data_sharding"])
        # Data parallelism communicates by all-reduce alone (gradients, BatchNorm statistics).
        kinds = {kind for kind, count in train["collectives"].items() if count}
        assert kinds == {"all-reduce"}, (name, train["collectives"])
        assert train["fits"] and 0 < train["used_gib"] < train["hbm_gib"], (name, train)
        assert train["flops"] > 0 and train["bytes_accessed"] > 0, (name, train)
        # attention="auto" took keras.ops in the TPU program: no CPU kernel in it.
        assert not train["native_kernel"], name
    # ... and in the same process the CPU program took the native kernel, where it is built here.
    assert results["cpu_native"] == results["native_built"]


# 8 H100s in one host: the default gated U-Net's training program, small.
GPU_CHILD = """
import json
from training import compile_for
from training.config import TrainConfig

gated = TrainConfig(model="gated", model_args={"blocks": [1, 1, 1, 1], "groups": 2}, img_size=32)
print("RESULTS " + json.dumps(compile_for.compile_for("cuda:h100x8", gated, batch_per_chip=2, predict=False)))
"""


@NEEDS_CUDA_PLUGIN
@pytest.mark.slow
def test_training_compiles_for_eight_h100s_sharded_by_all_reduce_and_fits():
    results = _compiled_in_a_child(GPU_CHILD)
    train = results["train"]
    assert results["chips"] == 8 and train["data_sharding"] == ["batch"]
    assert {kind for kind, count in train["collectives"].items() if count} == {"all-reduce"}
    assert train["fits"] and 0 < train["used_gib"] < train["hbm_gib"] and train["hbm_gib"] > 70
    assert train["flops"] > 0 and train["bytes_accessed"] > 0 and train["bytes_accessed_source"].startswith("estimate")
    assert not train["native_kernel"]  # attention="auto" takes keras.ops on a GPU
