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


def _save(kind, directory, model, optimizer, meta):
    if kind == "npz":
        checkpoint.save_run_state(directory, model, optimizer, meta)
    else:
        store = checkpoint.OrbaxRunState(directory)
        store.save(model, optimizer, meta)
        store.close()


@pytest.mark.parametrize("kind", ["npz", "orbax"])
def test_run_state_round_trip_and_mismatch_error(tmp_path, kind):
    model, optimizer = _model(), OfficialAdam(l2=1e-5)
    optimizer.build(model.trainable_variables)
    optimizer.apply([np.ones((3, 2), "float32"), np.ones(2, "float32")], model.trainable_variables)
    _save(kind, tmp_path, model, optimizer, {"next_epoch": 4, "step": 40, "history": [{"val_f1": float("nan")}]})
    assert checkpoint.saved_format(tmp_path) == kind
    assert checkpoint.choose_format(tmp_path, "npz" if kind == "orbax" else "orbax") == kind  # a run keeps its format
    other, other_optimizer = _model(), OfficialAdam(l2=1e-5)
    other_optimizer.build(other.trainable_variables)
    meta = checkpoint.restore_run_state(tmp_path, other, other_optimizer)
    assert meta["next_epoch"] == 4 and np.isnan(meta["history"][0]["val_f1"])
    assert checkpoint.read_run_state(tmp_path)["next_epoch"] == 4
    saved = checkpoint.state_arrays(tmp_path)
    assert [saved["model"][v.path].shape for v in model.variables] == [tuple(v.shape) for v in model.variables]
    for a, b in zip(model.variables + optimizer.variables, other.variables + other_optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    inputs = keras.Input((3,))
    wider = keras.Model(inputs, keras.layers.Dense(5, name="dense")(inputs))
    wider_optimizer = OfficialAdam()
    wider_optimizer.build(wider.trainable_variables)
    with pytest.raises(ValueError, match="dense/kernel saved with shape"):
        checkpoint.restore_run_state(tmp_path, wider, wider_optimizer)


def test_orbax_keeps_the_latest_two_committed_saves(tmp_path):
    # Saves in flight one after another (each waits for the previous commit): three saves
    # leave the latest two folders, named by steps done, no temporaries, and restore reads the last one.
    model, optimizer = _model(), OfficialAdam(l2=1e-5)
    optimizer.build(model.trainable_variables)
    store = checkpoint.OrbaxRunState(tmp_path)
    for epoch in (1, 2, 3):
        model.variables[0].assign(np.full((3, 2), float(epoch), "float32"))
        store.save(model, optimizer, {"next_epoch": epoch, "step": 10 * epoch})
    store.close()
    assert sorted(os.listdir(tmp_path / checkpoint.ORBAX_DIR)) == ["20", "30"]
    other, other_optimizer = _model(), OfficialAdam(l2=1e-5)
    other_optimizer.build(other.trainable_variables)
    assert checkpoint.restore_run_state(tmp_path, other, other_optimizer)["next_epoch"] == 3
    np.testing.assert_array_equal(other.variables[0].numpy(), np.full((3, 2), 3.0, "float32"))


def test_orbax_state_saved_on_four_devices_restores_on_one(tmp_path):
    # Saved in a process whose variables are replicated over 4 devices (Keras DataParallel);
    # restored here, on this process' one device: Orbax reshards onto the variables' sharding.
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = f"""
import json, numpy as np, medt_keras, keras
from training import checkpoint
from medt_keras.optimizers import OfficialAdam
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices()))
inputs = keras.Input((3,))
model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs))
optimizer = OfficialAdam(l2=1e-5)
optimizer.build(model.trainable_variables)
optimizer.apply([np.full((3, 2), 0.5, "float32"), np.ones(2, "float32")], model.trainable_variables)
store = checkpoint.OrbaxRunState({os.fspath(tmp_path)!r})
store.save(model, optimizer, {{"next_epoch": 3, "step": 30}})
store.close()
print(json.dumps(dict(devices=len(model.variables[0].value.sharding.device_set),
                      values=[np.asarray(v.value).tolist() for v in model.variables + optimizer.variables])))
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads(result.stdout.strip().splitlines()[-1])
    assert saved["devices"] == 4
    model, optimizer = _model(), OfficialAdam(l2=1e-5)
    optimizer.build(model.trainable_variables)
    assert checkpoint.restore_run_state(tmp_path, model, optimizer)["next_epoch"] == 3
    for variable, value in zip(model.variables + optimizer.variables, saved["values"]):
        assert len(variable.value.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(variable.value), np.asarray(value, dtype=variable.dtype))


def test_format_choice(tmp_path, monkeypatch):
    assert checkpoint.choose_format(tmp_path, "auto", process_count=1) == "npz"
    assert checkpoint.choose_format(tmp_path, "auto", process_count=2) == "orbax"
    monkeypatch.setattr(checkpoint, "saved_format", lambda directory: None)  # no GCS here to look in
    assert checkpoint.choose_format("gs://bucket/run", "auto") == "orbax"
    with pytest.raises(ValueError, match="needs --checkpoint-format orbax"):
        checkpoint.choose_format(tmp_path, "npz", process_count=2)


def test_remote_files_are_uploaded_whole_and_read_back(tmp_path, monkeypatch):
    # A URL goes through etils.epath; here a scheme mapped onto a local folder stands in for gs://.
    from etils import epath

    from training import files

    bucket = tmp_path / "bucket"
    monkeypatch.setattr(files, "remote_path", lambda path: epath.Path(os.fspath(path).replace("fake://", f"{bucket}/")))
    files.makedirs("fake://run")
    assert (bucket / "run").is_dir() and not files.exists("fake://run/log.csv")
    checkpoint.atomic_write_csv("fake://run/log.csv", [{"epoch": 1, "loss": 0.5}])
    assert (bucket / "run" / "log.csv").read_text() == "epoch,loss\n1,0.5\n"
    with pytest.raises(RuntimeError):
        with files.atomic_path("fake://run/log.csv") as temporary:
            with open(temporary, "w") as handle:
                handle.write("half")
            raise RuntimeError("killed while writing")
    assert (bucket / "run" / "log.csv").read_text() == "epoch,loss\n1,0.5\n"  # nothing uploaded
    model = _model()
    checkpoint.save_weights(model, "fake://run/best.weights.h5")
    assert files.exists("fake://run/best.weights.h5")
    other = _model()
    with files.local_copy("fake://run/best.weights.h5") as local:
        other.load_weights(local)
    for a, b in zip(model.variables, other.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


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
