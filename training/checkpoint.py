"""Checkpoints that survive a kill at any moment.

The run state holds what resuming needs: every model variable (weights,
BatchNorm statistics and counters), every optimiser variable (moments,
step counts, which variables are frozen), and the run's bookkeeping (next
epoch and batch, steps done, best validation score, history, and after a
save inside an epoch the epoch's metric sums so far). It is kept in one of
two formats:

* ``npz``: ``run_state.npz``, written by one process through
  ``medt_keras.files`` (a temporary renamed over the old file);
* ``orbax``: an Orbax checkpoint directory ``run_state/`` with one folder
  per save, named by the optimizer steps done (the latest two kept). Every
  process of a multi-process run saves its own shards, in the background while training goes on, to a
  local or remote (``gs://``) path; a folder counts only once Orbax has
  committed it (renamed from its temporary name, or marked committed on
  object stores), so a kill leaves the previous save's. Loading reshards
  onto the devices of the resuming run, whatever their number.

``choose_format`` picks one for a new run (``orbax`` for multi-process runs
and URL output directories) and keeps the saved one for a resumed run.
"""

import json
import logging
import os

import numpy as np

# Re-exported: the loop and the command-line tools write through these.
from training.files import (  # noqa: F401
    atomic_path,
    atomic_write_csv,
    atomic_write_text,
    exists,
    is_remote,
    remove_stale_temporaries,
    save_model,
    save_weights,
)

STATE_FILE = "run_state.npz"
ORBAX_DIR = "run_state"
FORMATS = ("npz", "orbax")


class _QuietOrbax(logging.Filter):
    """Drops Orbax's warning that the bookkeeping (strings, no arrays) has no array files to merge."""

    def filter(self, record):
        return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


def _orbax():
    try:
        import orbax.checkpoint
    except ImportError as error:
        raise ValueError("the Orbax run state (multi-process runs, remote output folders, --checkpoint-format "
                         "orbax) needs the orbax-checkpoint package, Python 3.11 or later: "
                         "pip install orbax-checkpoint") from error
    ocp = orbax.checkpoint.v1  # the API Keras' own OrbaxCheckpoint uses

    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _QuietOrbax) for f in absl_logger.filters):
        absl_logger.addFilter(_QuietOrbax())
    return ocp


def _orbax_root(directory):
    return os.path.join(os.fspath(directory), ORBAX_DIR)


def _orbax_checkpointer(directory):
    ocp = _orbax()
    return ocp.training.Checkpointer(
        directory=_orbax_root(directory),
        preservation_policy=ocp.training.preservation_policies.LatestN(2),
        save_decision_policy=ocp.training.save_decision_policies.FixedIntervalPolicy(1),
    )


def _has_npz(directory):
    return not is_remote(directory) and os.path.isfile(os.path.join(os.fspath(directory), STATE_FILE))


def saved_format(directory):
    """The format of the run state saved in ``directory``, or ``None`` when there is none."""
    if _has_npz(directory):
        return "npz"
    if exists(_orbax_root(directory)):
        checkpointer = _orbax_checkpointer(directory)
        try:
            if checkpointer.latest is not None:
                return "orbax"
        finally:
            checkpointer.close()
    return None


def choose_format(directory, preference="auto", process_count=1):
    """The run state format: the saved one if any, else ``preference`` (``auto``: see the module)."""
    saved = saved_format(directory)
    if saved is not None:
        return saved
    needs_orbax = process_count > 1 or is_remote(directory)
    if preference in FORMATS:
        chosen = preference
    elif preference == "auto":
        chosen = "orbax" if needs_orbax else "npz"
    else:
        raise ValueError(f"checkpoint format {preference!r}: use auto, {' or '.join(FORMATS)}.")
    if chosen == "npz" and needs_orbax:
        raise ValueError(f"{directory}: run_state.npz is written by one process to a local folder; "
                         "a multi-process run or a remote output directory needs --checkpoint-format orbax.")
    return chosen


class OrbaxRunState:
    """The run state as an Orbax checkpoint: ``save`` returns once the arrays are copied off the device.

    Every process of the run must construct it and call ``save`` after the
    same steps (Orbax coordinates the processes); ``close`` waits for the
    last save to be committed.
    """

    def __init__(self, directory):
        self.checkpointer = _orbax_checkpointer(directory)

    def save(self, model, optimizer, meta):
        state, described = _state_and_description(model, optimizer)
        # Finish the previous save first: one save in flight at a time.
        self.checkpointer.wait()
        # Named by the optimizer steps done: increasing through mid-epoch and epoch-end saves
        # (a run saved by an older version, named by epochs, resumes into larger numbers).
        self.checkpointer.save_checkpointables_async(
            int(meta["step"]), {"state": state, "meta": {"json": json.dumps({**meta, **described})}}
        )

    def wait(self):
        self.checkpointer.wait()

    def close(self):
        self.checkpointer.close()


def _state_and_description(model, optimizer):
    import jax.numpy as jnp

    state, described = {}, {}
    for prefix, variables in (("model", model.variables), ("optimizer", optimizer.variables)):
        # Copies: the training step donates the variables' buffers, and the
        # save reads these after fit has moved on.
        state[prefix] = [jnp.copy(v.value) for v in variables]
        described[f"{prefix}_paths"] = [v.path for v in variables]
        described[f"{prefix}_shapes"] = [list(v.shape) for v in variables]
    return state, described


def _read_orbax(directory, model=None, optimizer=None):
    """The latest committed state's bookkeeping; with a model and optimizer, also assigns their variables."""
    checkpointer = _orbax_checkpointer(directory)
    root = _orbax_root(directory)
    try:
        latest = checkpointer.latest
        if latest is None:
            return None
        meta = json.loads(checkpointer.load_checkpointables(latest.step, {"meta": None})["meta"]["json"])
        if model is None:
            return _public(meta)
        import jax

        where = f"{root}/{latest.step}"
        abstract = {}
        for prefix, variables in (("model", model.variables), ("optimizer", optimizer.variables)):
            _check_same_variables(where, prefix, meta[f"{prefix}_paths"], variables)
            for path, shape, variable in zip(meta[f"{prefix}_paths"], meta[f"{prefix}_shapes"], variables):
                if tuple(shape) != tuple(variable.shape):
                    raise ValueError(f"{where}: {path} saved with shape {tuple(shape)}, model has {variable.shape}.")
            # The arrays land with the sharding of this run's variables, whatever the saving run's devices were.
            abstract[prefix] = [jax.ShapeDtypeStruct(tuple(v.shape), v.value.dtype, sharding=v.value.sharding)
                                for v in variables]
        state = checkpointer.load_checkpointables(latest.step, {"state": abstract})["state"]
        for prefix, variables in (("model", model.variables), ("optimizer", optimizer.variables)):
            for variable, value in zip(variables, state[prefix]):
                variable.assign(value)
        return _public(meta)
    finally:
        checkpointer.close()


def _public(meta):
    return {k: v for k, v in meta.items() if not k.endswith(("_paths", "_shapes"))}


def _check_same_variables(where, prefix, paths, variables):
    current = [v.path for v in variables]
    if list(paths) != current:
        missing = sorted(set(current) - set(paths)) or sorted(set(paths) - set(current))
        raise ValueError(
            f"{where}: the saved {prefix} variables do not match this run's "
            f"({len(paths)} saved, {len(current)} now; first difference: {missing[:1] or 'order'}). "
            "Resume with the same config, or start a new output directory."
        )


def state_arrays(directory):
    """``{"model": {path: array}, "optimizer": {path: array}}`` of the saved state, in either format (for comparisons)."""
    if _has_npz(directory):
        with np.load(os.path.join(os.fspath(directory), STATE_FILE)) as data:
            return {prefix: {str(p): data[f"{prefix}_{i}"] for i, p in enumerate(data[f"{prefix}_paths"])}
                    for prefix in ("model", "optimizer")}
    import jax

    ocp, checkpointer = _orbax(), _orbax_checkpointer(directory)
    try:
        step = checkpointer.latest.step
        meta = json.loads(checkpointer.load_checkpointables(step, {"meta": None})["meta"]["json"])
        saved = ocp.checkpointables_metadata(f"{_orbax_root(directory)}/{step}").metadata["state"]
        # Onto this process' first device, whatever devices saved it; float64 stays float64 (the
        # setting is global: Orbax loads in threads of its own, which a context would not reach).
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        x64 = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)
        try:
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), saved,
                                    is_leaf=lambda m: hasattr(m, "shape"))
            state = jax.tree.map(np.asarray, checkpointer.load_checkpointables(step, {"state": abstract})["state"])
        finally:
            jax.config.update("jax_enable_x64", x64)
    finally:
        checkpointer.close()
    return {prefix: {p: np.asarray(a) for p, a in zip(meta[f"{prefix}_paths"], state[prefix])}
            for prefix in ("model", "optimizer")}


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
    """The saved state's bookkeeping (either format), or ``None`` when there is none."""
    if _has_npz(directory):
        with np.load(os.path.join(os.fspath(directory), STATE_FILE)) as data:
            return json.loads(str(data["meta"]))
    return _read_orbax(directory) if exists(_orbax_root(directory)) else None


def restore_run_state(directory, model, optimizer):
    """Assigns the saved variables (either format) to ``model`` and the (built) ``optimizer``; returns the bookkeeping."""
    if not _has_npz(directory):
        meta = _read_orbax(directory, model, optimizer) if exists(_orbax_root(directory)) else None
        if meta is None:
            raise FileNotFoundError(f"{directory}: no run state ({STATE_FILE} or a committed {ORBAX_DIR}/) to restore.")
        return meta
    path = os.path.join(os.fspath(directory), STATE_FILE)
    with np.load(path) as data:
        for prefix, variables in (("model", model.variables), ("optimizer", optimizer.variables)):
            _check_same_variables(path, prefix, [str(p) for p in data[f"{prefix}_paths"]], variables)
            for i, variable in enumerate(variables):
                value = data[f"{prefix}_{i}"]
                if tuple(value.shape) != tuple(variable.shape):
                    raise ValueError(f"{path}: {variable.path} saved with shape {value.shape}, model has {variable.shape}.")
                variable.assign(value)
        return json.loads(str(data["meta"]))
