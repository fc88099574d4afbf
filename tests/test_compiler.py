"""XLA options per program (medt_keras.compiler): nothing process-wide, the right options in each program."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import keras

import medt_keras
from medt_keras import compiler
from tests.conftest import TINY_IMG_SIZE
from tests.conftest import TINY_MODEL as TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_MEASURED_JAXLIB = compiler.MEASURED_JAXLIB[0] <= compiler._jaxlib_version() < compiler.MEASURED_JAXLIB[1]
_PLAIN_ENVIRONMENT = {k: v for k, v in os.environ.items()
                      if k not in ("XLA_FLAGS", "KERAS_BACKEND", compiler.KEEP_DEFAULTS_VARIABLE)}


def _run_fresh(code, *args, **env_changes):
    """Runs ``code`` in a fresh Python with the repository importable; its last printed line, parsed as JSON."""
    env = dict(_PLAIN_ENVIRONMENT, **env_changes)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


_ENVIRONMENT_AFTER_IMPORT = f"""
import json, os
before = dict(os.environ)
import medt_keras
after_import = dict(os.environ)
import keras
models = [spec.model_class(img_size={TINY_IMG_SIZE}, patch_grid=1, **{TINY!r}, rematerialize=True) for spec in medt_keras.MODELS]
models.append(medt_keras.MedT(img_size={TINY_IMG_SIZE}, patch_grid=1, **{TINY!r}))
after_models = dict(os.environ)
print(json.dumps(dict(import_changed=sorted(set(before.items()) ^ set(after_import.items())),
                      models_changed=sorted(set(before.items()) ^ set(after_models.items())),
                      backend=keras.backend.backend(), models=len(models))))
"""


def test_import_and_building_every_model_leave_the_environment_untouched():
    # Not even KERAS_BACKEND, which the import sets only while Keras loads: JAX is chosen all the same.
    seen = _run_fresh(_ENVIRONMENT_AFTER_IMPORT)
    assert seen["import_changed"] == [] and seen["models_changed"] == [], seen
    assert seen["backend"] == "jax" and seen["models"] == len(medt_keras.MODELS) + 1


_UNRELATED_PROGRAM = f"""
import json, sys
if sys.argv[1:] == ["with medt_keras"]:  # the models' programs compiled first, with their options
    import medt_keras, keras, numpy as np
    model = medt_keras.GatedAxialUNet(img_size={TINY_IMG_SIZE}, **{TINY!r})
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.rand(2, {TINY_IMG_SIZE}, {TINY_IMG_SIZE}, 3).astype("float32")
    model.train_on_batch(x, np.zeros((2, {TINY_IMG_SIZE}, {TINY_IMG_SIZE}), "int32"))
    model.predict_on_batch(x)
import re, jax, jax.numpy as jnp
x = jnp.ones((64, 256, 256))
program = jax.jit(lambda x, w: (jnp.sum(jnp.exp(x), -1), x.reshape(-1, 256) @ w)).lower(x, jnp.ones((256, 256)))
# Without the source locations (metadata and the tables of files, functions and frames it
# points into): Python's own frames differ between the two.
text = re.sub(r", metadata=\\{{[^}}]*\\}}", "", program.compile().as_text())
print(json.dumps([line for line in text.splitlines() if not re.match(r"(\\d+ |FileNames|FunctionNames|FileLocations|StackFrames)", line)]))
"""


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are the CPU compiler's")
@pytest.mark.slow
def test_an_unrelated_program_compiles_the_same_with_and_without_medt_keras():
    plain = _run_fresh(_UNRELATED_PROGRAM)
    used = _run_fresh(_UNRELATED_PROGRAM, "with medt_keras")
    assert any("fusion" in line for line in plain)  # a real compiled program
    assert used == plain


def test_compiler_options_by_workload_platform_and_user_flags(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv(compiler.KEEP_DEFAULTS_VARIABLE, raising=False)
    tuned = compiler.CPU_OPTIONS if IN_MEASURED_JAXLIB else {"training": {}, "inference": {}}
    for workload in compiler.WORKLOADS:
        assert compiler.compiler_options(workload, platform="cpu") == (tuned[workload] or None)
        assert compiler.compiler_options(workload, platform="tpu") is None
        assert compiler.compiler_options(workload, platform="gpu", rematerialize=True) is None
    remat = compiler.compiler_options("training", rematerialize=True, platform="cpu")
    assert remat == dict(tuned["training"], **compiler.REMATERIALIZATION_OPTIONS)
    # The user's own setting of a flag wins; the opt-out keeps only what rematerialisation needs.
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT")
    assert "xla_cpu_experimental_ynn_fusion_type" not in (compiler.compiler_options("training", platform="cpu") or {})
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv(compiler.KEEP_DEFAULTS_VARIABLE, "1")
    assert compiler.compiler_options("inference", platform="cpu") is None
    assert compiler.compiler_options("training", rematerialize=True, platform="cpu") == compiler.REMATERIALIZATION_OPTIONS
    with pytest.raises(ValueError, match="workload"):
        compiler.compiler_options("serving")


@pytest.mark.skipif(jax.default_backend() != "cpu" or not IN_MEASURED_JAXLIB, reason="the options of jaxlib 0.9-0.10's CPU compiler")
def test_the_options_change_the_program_they_are_given_to(monkeypatch):
    # Inference's options keep the reduction and the exponential in XLA's own code (only the
    # product in YNNPACK) and the reduction over 256 whole (no tree-reduction rewrite).
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv(compiler.KEEP_DEFAULTS_VARIABLE, raising=False)

    def fun(x, w):
        return jnp.sum(jnp.exp(x), -1), x.reshape(-1, 256) @ w

    args = (jnp.ones((64, 256, 256)), jnp.ones((256, 256)))

    def library_fusions(program):
        text = program.lower(*args).compile().as_text()
        names = [line.split("=")[0].strip() for line in text.splitlines() if line.startswith("  %")]
        return sum(name.startswith("%ynn_fusion") for name in names), text.count(" reduce-window(")

    default = library_fusions(jax.jit(fun))
    inference = library_fusions(compiler.jit(fun, "inference"))
    training = library_fusions(compiler.jit(fun, "training"))
    assert default[0] == 2 and inference == (1, 0) and training[0] == 2, (default, inference, training)


def _recording_jit(monkeypatch):
    """Records the ``compiler_options`` of every ``jax.jit`` Keras' trainer makes; returns the record."""
    from keras.src.backend.jax import trainer

    real = jax.jit
    seen = []

    def recording(fun=None, **kwargs):
        seen.append((getattr(fun, "__name__", None), kwargs.get("compiler_options")))
        return real(fun, **kwargs)

    monkeypatch.setattr(jax, "jit", recording)
    monkeypatch.setattr(trainer, "jit", recording)
    return seen, trainer, recording


@pytest.mark.slow
def test_fit_evaluate_and_predict_compile_with_their_workloads_options(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv(compiler.KEEP_DEFAULTS_VARIABLE, raising=False)
    seen, trainer, recording = _recording_jit(monkeypatch)
    x = np.random.default_rng(0).random((2, TINY_IMG_SIZE, TINY_IMG_SIZE, 3)).astype("float32")
    y = np.zeros((2, TINY_IMG_SIZE, TINY_IMG_SIZE), "int32")
    for rematerialize in (False, True):
        model = medt_keras.GatedAxialUNet(img_size=TINY_IMG_SIZE, rematerialize=rematerialize, **TINY)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        runs = [("train", "training", lambda: model.train_on_batch(x, y))]
        if not rematerialize:  # rematerialisation changes the training program only
            runs += [("test", "inference", lambda: model.test_on_batch(x, y)),
                     ("predict", "inference", lambda: model.predict_on_batch(x))]
        for name, workload, run in runs:
            seen.clear()
            value = run()
            assert np.all(np.isfinite(np.asarray(value))), name
            expected = compiler.compiler_options(workload, rematerialize=rematerialize)
            assert (f"{name}_step", expected) in seen, (name, rematerialize, seen)
            assert trainer.jit is recording  # Keras' own jit is back
    assert expected is not None or jax.default_backend() != "cpu"


def test_the_sliding_window_program_has_inference_options(monkeypatch):
    from medt_keras import inference

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv(compiler.KEEP_DEFAULTS_VARIABLE, raising=False)
    seen, _, _ = _recording_jit(monkeypatch)
    model = medt_keras.GatedAxialUNet(img_size=TINY_IMG_SIZE, **TINY)
    inference._program(model)
    assert seen == [("probabilities", compiler.compiler_options("inference"))]
