import os

import numpy as np
import pytest

import medt_keras  # noqa: F401

import keras

from training import checkpoint
from medt_keras.optimizers import OfficialAdam


def test_interrupted_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "log.csv"
    checkpoint.atomic_write_text(path, "first\n")
    with pytest.raises(RuntimeError):
        with checkpoint.atomic_path(path) as temporary:
            with open(temporary, "w") as handle:
                handle.write("half of the sec")
            raise RuntimeError("killed while writing")
    assert path.read_text() == "first\n"
    assert os.listdir(tmp_path) == ["log.csv"]  # the partial file is gone


def _model():
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs))


def test_run_state_round_trip_and_mismatch_error(tmp_path):
    model, optimizer = _model(), OfficialAdam(l2=1e-5)
    optimizer.build(model.trainable_variables)
    optimizer.apply([np.ones((3, 2), "float32"), np.ones(2, "float32")], model.trainable_variables)
    checkpoint.save_run_state(tmp_path, model, optimizer, {"next_epoch": 4})
    other, other_optimizer = _model(), OfficialAdam(l2=1e-5)
    other_optimizer.build(other.trainable_variables)
    assert checkpoint.restore_run_state(tmp_path, other, other_optimizer) == {"next_epoch": 4}
    for a, b in zip(model.variables + optimizer.variables, other.variables + other_optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    inputs = keras.Input((3,))
    wider = keras.Model(inputs, keras.layers.Dense(5, name="dense")(inputs))
    wider_optimizer = OfficialAdam()
    wider_optimizer.build(wider.trainable_variables)
    with pytest.raises(ValueError, match="dense/kernel saved with shape"):
        checkpoint.restore_run_state(tmp_path, wider, wider_optimizer)


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    # A SIGKILL during an atomic write leaves ".tmp-PID-NAME" behind, half-written.
    (tmp_path / "checkpoints").mkdir()
    dead = tmp_path / "checkpoints" / ".tmp-999999999-epoch_0002.weights.h5"
    alive = tmp_path / f".tmp-{os.getppid()}-run_state.npz"  # a process still writing it
    kept = tmp_path / "run_state.npz"
    for path in (dead, alive, kept):
        path.write_bytes(b"partial")
    assert checkpoint.remove_stale_temporaries(tmp_path) == [os.fspath(dead)]
    assert alive.exists() and kept.exists() and not dead.exists()
