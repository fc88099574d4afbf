"""Running code in a fresh interpreter where ``training`` cannot be imported (the library on its own)."""

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

BLOCK_TRAINING = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockTraining(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "training" or name.startswith("training."):
                raise ImportError(f"{name} is blocked: the library must not need the application")
            return None

    sys.meta_path.insert(0, BlockTraining())
    """
)


def run_without_training(code, timeout=600):
    """Runs ``code`` (dedented) after blocking ``training``; returns the finished process (stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               KERAS_BACKEND="jax")
    result = subprocess.run([sys.executable, "-c", BLOCK_TRAINING + textwrap.dedent(code)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
