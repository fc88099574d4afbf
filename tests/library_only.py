"""Running code in a fresh interpreter where the packages above a layer cannot be imported.

The packages are layered, each importing only those before it in ``LAYERS``:
the library, the converter built on it, the commands built on both.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ("medt_keras", "weights_converter", "training")


def above(package):
    """The packages ``package`` must not import."""
    return LAYERS[LAYERS.index(package) + 1:]


def _blocker(blocked):
    return textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Blocked(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {tuple(blocked)!r}:
                    raise ImportError(f"{{name}} is blocked: a package must not need the ones above it")
                return None

        sys.meta_path.insert(0, Blocked())
        """
    )


def run_with_blocked(code, blocked, timeout=600):
    """Runs ``code`` (dedented) with the packages ``blocked`` unimportable; returns the finished process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               KERAS_BACKEND="jax")
    result = subprocess.run([sys.executable, "-c", _blocker(blocked) + textwrap.dedent(code)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_library_alone(code, timeout=600):
    """Runs ``code`` where only the library (``medt_keras``) can be imported of the three packages."""
    return run_with_blocked(code, above("medt_keras"), timeout=timeout)
