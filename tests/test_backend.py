import jax
import numpy as np
import pytest

from medt_keras._backend import highest_matmul_precision
from weights_converter import parity


def test_highest_matmul_precision_sets_and_restores_jax_precision():
    before = jax.config.jax_default_matmul_precision
    with highest_matmul_precision():
        assert jax.config.jax_default_matmul_precision == "highest"
    assert jax.config.jax_default_matmul_precision == before


def test_parity_measures_at_highest_precision(tmp_path, monkeypatch):
    seen = []

    def load(path, dtype):
        seen.append(jax.config.jax_default_matmul_precision)
        raise RuntimeError("stop")

    monkeypatch.setattr(parity, "load_official_checkpoint", load)
    np.savez(tmp_path / "case.npz", x=np.zeros((1, 3, 32, 32)))
    # Outside the tests' own highest-precision fixture.
    with jax.default_matmul_precision("default"):
        with pytest.raises(RuntimeError, match="stop"):
            parity.measure_case(str(tmp_path / "case.pth"))
    assert seen == ["highest"]


_FUSIONS = """
import os, sys, json, medt_keras
if sys.argv[1:] == ["medt-train"]:
    from training.train import main
    main(["--list-configs"])  # medt-train's start, up to where it would begin training
import jax, jax.numpy as jnp
x = jnp.ones((64, 256, 256))
text = jax.jit(lambda x, w: (jnp.sum(jnp.exp(x), -1), x.reshape(-1, 256) @ w)).lower(x, jnp.ones((256, 256))).compile().as_text()
names = [line.split("=")[0].strip() for line in text.splitlines() if line.startswith("  %")]
print(json.dumps(dict(flags=os.environ.get("XLA_FLAGS", ""), ynn=sum(n.startswith("%ynn_fusion") for n in names),
                      reduce_windows=text.count(" reduce-window("))))
"""


def _run_fresh(*args, **env_changes):
    """A fresh process importing medt_keras first, as a user's script would: its XLA_FLAGS and YNNPACK fusions."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "MEDT_KERAS_KEEP_XLA_FLAGS", "MEDT_KERAS_ADDED_XLA_FLAGS")}
    env.update(env_changes)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", _FUSIONS, *args], env=env, cwd=root, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_cpu_compiler_hands_only_products_to_ynnpack():
    # The import adds the flags (with a jaxlib that has them): the reduction and the exponential
    # compile to XLA's own code, the product still to YNNPACK, and the reduction over 256 stays
    # whole (XLA's tree-reduction rewrite off); MEDT_KERAS_KEEP_XLA_FLAGS leaves XLA's default
    # (the reduction in YNNPACK too); a user's own setting of a flag is kept; medt-train replaces
    # the import's choice with training's.
    from medt_keras import _backend

    if jax.default_backend() != "cpu":
        pytest.skip("a CPU compiler flag")
    version = _backend._jaxlib_version()
    low, high = _backend._LIBRARY_FUSION_JAXLIB
    tuned = _run_fresh()
    default = _run_fresh(MEDT_KERAS_KEEP_XLA_FLAGS="1")
    assert default["flags"] == ""
    if not low <= version < high:
        assert tuned["flags"] == ""
        return
    expected = list(_backend.CPU_COMPILER_FLAGS["inference"])
    if _backend._accelerator_plugin_installed():
        expected = expected[:1]
    assert tuned["flags"].split() == expected
    assert tuned["ynn"] == 1 and default["ynn"] == 2, (tuned, default)
    own = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"
    mine = _run_fresh(XLA_FLAGS=own)
    assert mine["flags"].split()[0] == own, mine
    # With a setting of its own for the disabled passes, the user keeps the rewrite.
    passes = "--xla_disable_hlo_passes=algsimp"
    theirs = _run_fresh(XLA_FLAGS=passes)
    assert theirs["flags"].split() == [passes, expected[0]], theirs
    assert theirs["reduce_windows"] == 1 and (len(expected) == 1 or tuned["reduce_windows"] == 0), (theirs, tuned)
    # medt-train swaps in training's choice, the reduction back in YNNPACK and the rewrite on;
    # not over the user's.
    training = _run_fresh("medt-train")
    assert training["flags"].split() == list(_backend.CPU_COMPILER_FLAGS["training"]) and training["ynn"] == 2, training
    assert _run_fresh("medt-train", XLA_FLAGS=own)["flags"] == own
    # Started from a process that imported medt_keras (its XLA_FLAGS inherited), medt-train
    # still tells the import's flags from the user's and sets training's.
    inherited = " ".join(expected)
    started = _run_fresh("medt-train", XLA_FLAGS=inherited, MEDT_KERAS_ADDED_XLA_FLAGS=inherited)
    assert started["flags"].split() == list(_backend.CPU_COMPILER_FLAGS["training"]), started


def test_accelerator_plugins_keep_the_tree_reduction_rewrite(tmp_path, monkeypatch):
    # Where JAX may find a GPU or TPU (a jax_plugins package, as the CUDA plugin installs),
    # the import leaves XLA's tree-reduction rewrite on; JAX_PLATFORMS=cpu says it will not.
    from medt_keras import _backend

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    if _backend._accelerator_plugin_installed():
        pytest.skip("an accelerator plugin is installed here")
    (tmp_path / "jax_plugins" / "xla_cuda12").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "xla_cuda12" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _backend._accelerator_plugin_installed()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not _backend._accelerator_plugin_installed()
