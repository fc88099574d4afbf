"""The platform line and --require-accelerator of medt-train, medt-predict and medt-bench (on CPU)."""

import jax
import pytest

from training import benchmark, devices, predict, train

ON_CPU = jax.default_backend() == "cpu"


def test_describe_names_jax_platform_and_devices():
    assert devices.describe("medt-train", ("0.10.2", "cpu", 1, 1, 1)) == "medt-train: JAX 0.10.2 on cpu, 1 device"
    assert devices.describe("medt-train", ("0.10.2", "tpu", 32, 4, 8)) == (
        "medt-train: JAX 0.10.2 on tpu, 32 devices (4 in this process, 8 processes)"
    )
    assert devices.describe("x") == f"x: JAX {jax.__version__} on {jax.default_backend()}, " + (
        f"{jax.device_count()} device" + ("s" if jax.device_count() != 1 else "")
    )


def test_check_prints_the_line_and_refuses_cpu_only_when_required(capsys):
    devices.check("medt-predict", info=("0.10.2", "cpu", 1, 1, 1))
    assert capsys.readouterr().out == "medt-predict: JAX 0.10.2 on cpu, 1 device\n"
    with pytest.raises(devices.AcceleratorError, match="JAX sees only the CPU"):
        devices.check("medt-predict", True, info=("0.10.2", "cpu", 1, 1, 1))
    devices.check("medt-predict", True, info=("0.10.2", "gpu", 2, 2, 1))


@pytest.mark.skipif(not ON_CPU, reason="needs a machine without accelerators")
@pytest.mark.parametrize(
    "program,main,argv",
    [
        ("medt-predict", predict.main, ["missing.keras", "missing.png", "-o", "out"]),
        ("medt-train", train.main, ["--output-dir", "{tmp}"]),
        ("medt-bench", benchmark.main, []),
    ],
)
def test_require_accelerator_on_cpu_is_a_clear_error(program, main, argv, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path / "run")) for a in argv]
    assert main(argv + ["--require-accelerator"]) == 2
    out, err = capsys.readouterr()
    assert f"{program}: JAX {jax.__version__} on cpu" in out
    assert err.startswith(f"{program}: error: --require-accelerator: JAX sees only the CPU.")
    assert "Traceback" not in err
