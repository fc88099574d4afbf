"""Checkpoints that survive a kill at any moment.

Every file is written beside its final name, flushed to disk and then
renamed over it (``os.replace`` is atomic on POSIX): a reader sees either the
previous complete file or the new complete file, never half of one.

``save_run_state`` / ``restore_run_state`` hold what resuming needs: every
model variable (weights, BatchNorm statistics and counters), every
optimiser variable (moments, step counts, which variables are frozen), and
the run's bookkeeping (next epoch, best validation score, history).
"""

import contextlib
import json
import os

import numpy as np

STATE_FILE = "run_state.npz"


def _fsync_directory(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside ``path`` (same suffixes); on success renames it to ``path``."""
    path = os.fspath(path)
    directory, filename = os.path.split(path)
    directory = directory or "."
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".tmp-{os.getpid()}-{filename}")
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_directory(directory)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def remove_stale_temporaries(directory):
    """Deletes the temporaries of ``atomic_path`` left by killed processes in ``directory`` and below.

    A temporary (``.tmp-PID-NAME``) is never read, but a kill leaves it
    behind half-written; those of a process that no longer runs are removed
    when a run starts or resumes. Returns the paths removed.
    """
    removed = []
    for folder, _subfolders, files in os.walk(os.fspath(directory)):
        for name in files:
            if not name.startswith(".tmp-"):
                continue
            pid = name[len(".tmp-"):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
                continue
            path = os.path.join(folder, name)
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_text(path, text):
    with atomic_path(path) as temporary:
        with open(temporary, "w") as handle:
            handle.write(text)


def atomic_write_csv(path, rows, float_format="{:.6g}"):
    """Rows (dicts) as CSV with a header of every key in first-seen order, atomically."""
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def cell(value):
        return float_format.format(value) if isinstance(value, float) else str(value)

    lines = [",".join(columns)] + [",".join(cell(row.get(c, "")) for c in columns) for row in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def save_weights(model, path):
    """``model.save_weights`` (``.weights.h5``), atomically."""
    with atomic_path(path) as temporary:
        model.save_weights(temporary)


def save_model(model, path):
    """``model.save`` (``.keras``: architecture, weights, optimiser), atomically."""
    with atomic_path(path) as temporary:
        model.save(temporary)


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
