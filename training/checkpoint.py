"""Checkpoints that survive a kill at any moment (written through ``medt_keras.files``).

``save_run_state`` / ``restore_run_state`` hold what resuming needs: every
model variable (weights, BatchNorm statistics and counters), every
optimiser variable (moments, step counts, which variables are frozen), and
the run's bookkeeping (next epoch, best validation score, history).
"""

import json
import os

import numpy as np

# Re-exported: the loop and the command-line tools write through these.
from medt_keras.files import (  # noqa: F401
    atomic_path,
    atomic_write_csv,
    atomic_write_text,
    remove_stale_temporaries,
    save_model,
    save_weights,
)

STATE_FILE = "run_state.npz"


def save_run_state(directory, model, optimizer, meta):
    arrays = {}
    for prefix, variables in (("model", model.variables), ("optimizer", optimizer.variables)):
        arrays[f"{prefix}_paths"] = np.array([v.path for v in variables])
        for i, variable in enumerate(variables):
            arrays[f"{prefix}_{i}"] = np.asarray(variable.numpy())
    arrays["meta"] = np.array(json.dumps(meta))
    with atomic_path(os.path.join(directory, STATE_FILE)) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)


def read_run_state(directory):
    """The saved state's bookkeeping, or ``None`` when there is none."""
    path = os.path.join(os.fspath(directory), STATE_FILE)
    if not os.path.isfile(path):
        return None
    with np.load(path) as data:
        return json.loads(str(data["meta"]))


def restore_run_state(directory, model, optimizer):
    """Assigns the saved variables to ``model`` and the (built) ``optimizer``; returns the bookkeeping."""
    path = os.path.join(os.fspath(directory), STATE_FILE)
    with np.load(path) as data:
        for prefix, variables in (("model", model.variables), ("optimizer", optimizer.variables)):
            paths = [str(p) for p in data[f"{prefix}_paths"]]
            current = [v.path for v in variables]
            if paths != current:
                missing = sorted(set(current) - set(paths)) or sorted(set(paths) - set(current))
                raise ValueError(
                    f"{path}: the saved {prefix} variables do not match this run's "
                    f"({len(paths)} saved, {len(current)} now; first difference: {missing[:1] or 'order'}). "
                    "Resume with the same config, or start a new output directory."
                )
            for i, variable in enumerate(variables):
                value = data[f"{prefix}_{i}"]
                if tuple(value.shape) != tuple(variable.shape):
                    raise ValueError(f"{path}: {variable.path} saved with shape {value.shape}, model has {variable.shape}.")
                variable.assign(value)
        return json.loads(str(data["meta"]))
