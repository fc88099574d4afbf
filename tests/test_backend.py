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
