"""The JSON every subcommand writes: the common header and the atomic write."""

import json
import os
import platform


def header(command, **fields):
    """``{"machine", "cpus", "command", **fields}``: what every record starts with."""
    return {"machine": platform.platform(), "cpus": os.cpu_count(), "command": command, **fields}


def environment(names=("LD_PRELOAD", "XLA_FLAGS")):
    """The environment variables that change what is measured, as set in this process."""
    return {name: os.environ.get(name, "") for name in names}


def write_json(path, record, **dumps):
    """Writes ``record`` to ``path`` (if given) whole or not at all: an interrupted run keeps the last record."""
    if not path:
        return
    from training.files import atomic_write_text

    atomic_write_text(path, json.dumps(record, indent=2, **dumps))
