"""The package as a user installs it: a wheel in a fresh virtual environment, run outside the checkout.

Installed code must find nothing beside itself but what the wheel holds:
paths to fixtures, official checkouts and result files are arguments.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.library_only import ROOT

CASE = ROOT / "tests" / "fixtures" / "official" / "gated_img32_c3_k2_b2_s3_w0.03125_g2_l1-1-1-1.pth"
SOURCES = ("pyproject.toml", "README.md", "medt_keras", "weights_converter", "training")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(bin folder, environment, working folder)`` of a venv where ``pip install .`` put the wheel."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"  # a copy: building in the checkout would leave build/ there
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        kwargs = dict(ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so")) if (ROOT / name).is_dir() else {}
        copy(ROOT / name, source / name, **kwargs)
    venv = root / "venv"
    # The dependencies come from this interpreter's site-packages (no downloads in CI); the
    # package itself, from the wheel only: the test checks where it is imported from.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
                    "--disable-pip-version-check", str(source)],
                   check=True, cwd=root)
    shutil.rmtree(source)
    work = root / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", JAX_PLATFORMS="cpu", KERAS_BACKEND="jax")
    return venv / "bin", env, work


def _run(installed, *command, timeout=600):
    bin_dir, env, work = installed
    result = subprocess.run([str(bin_dir / command[0]), *command[1:]], cwd=work, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.mark.slow
def test_the_packages_come_from_the_wheel_and_load_reads_official_files(installed):
    out = _run(installed, "python", "-c", f"""
import json, sys
import medt_keras, weights_converter, training.bench.cli
from medt_keras.kernels import native_attention
model = medt_keras.load({str(CASE)!r})
print(json.dumps(dict(files=[m.__file__ for m in (medt_keras, weights_converter, training)],
                      model=type(model).__name__, kernel_source=native_attention.SOURCE.is_file())))
""")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for path in report["files"]:
        assert path.startswith(str(installed[0].parent)), path
    assert report["model"] == "GatedAxialUNet" and report["kernel_source"]


@pytest.mark.slow
def test_commands_work_outside_the_checkout(installed):
    from PIL import Image

    assert "SUBCOMMAND" in _run(installed, "medt-bench", "--help").stdout
    parity = _run(installed, "medt-parity", str(CASE)).stdout
    assert parity.strip().splitlines()[-1] == "1 passed, 0 failed", parity
    work = installed[2]
    image = (np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(work / "cells.png")
    _run(installed, "medt-predict", str(CASE), "cells.png", "--output", "masks", "--quiet")
    mask = np.asarray(Image.open(work / "masks" / "cells.png"))
    assert mask.shape == (40, 52) and set(np.unique(mask)) <= {0, 255}
    # With no case named and none found from here, medt-parity says so instead of looking beside itself.
    bin_dir, env, _ = installed
    result = subprocess.run([str(bin_dir / "medt-parity")], cwd=work, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "no cases given" in result.stderr
