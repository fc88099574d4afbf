"""Files written so that a kill at any moment leaves the old or the new one, never half.

Every file is written beside its final name, flushed to disk and then
renamed over it (``os.replace`` is atomic on POSIX): a reader sees either the
previous complete file or the new complete file.

A URL (``gs://bucket/run/log.csv``, any scheme ``etils.epath`` knows) is
written to a local temporary file first and then uploaded in one piece: an
object store shows an object whole or not at all, which is the atomic step
there. ``exists`` and ``local_copy`` read either kind of path.
"""

import contextlib
import os
import shutil
import tempfile


def is_remote(path):
    """A URL (``scheme://...``) rather than a local path."""
    return "://" in os.fspath(path)


def remote_path(path):
    """An ``etils.epath.Path`` for a URL (GCS needs ``gcsfs`` or TensorFlow installed)."""
    from etils import epath

    return epath.Path(os.fspath(path))


def exists(path):
    return remote_path(path).exists() if is_remote(path) else os.path.exists(path)


def makedirs(path):
    if is_remote(path):
        remote_path(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def local_copy(path):
    """Yields a local path holding the file at ``path`` (itself if local, a downloaded copy if a URL)."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="medt-download-") as folder:
        local = os.path.join(folder, os.path.basename(os.fspath(path)))
        with remote_path(path).open("rb") as source, open(local, "wb") as target:
            shutil.copyfileobj(source, target)
        yield local


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
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="medt-upload-") as folder:
            temporary = os.path.join(folder, os.path.basename(path))
            yield temporary
            destination = remote_path(path)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "rb") as source, destination.open("wb") as target:
                shutil.copyfileobj(source, target)
        return
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
