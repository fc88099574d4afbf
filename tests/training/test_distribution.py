"""Data parallelism through the Keras distribution API, on 8 CPU devices and on 2 processes.

Both run in subprocesses: the device count is fixed when JAX starts.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from medt_keras import datasets
from training import checkpoint
from training.preemption import PREEMPTED
from tests.synthetic_data import write_medt_folder
from tests.training.kill_points import stopped

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_eight_device_data_parallel_fit_equals_one_device():
    result = subprocess.run([sys.executable, "-m", "tests.training.distributed_worker"], env=_env(8), cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8 and report["same_variables"]
    # MedT, float64, 2 epochs of 2 global batches of 8: the same loss curve (Keras
    # tracks the loss in float32) and the same variables, BatchNorm statistics
    # included: batch statistics are taken over the global batch (synchronised BN).
    assert np.all(np.isfinite(report["single_losses"])) and np.all(np.isfinite(report["parallel_losses"]))
    np.testing.assert_allclose(report["parallel_losses"], report["single_losses"], rtol=1e-6)
    assert len(report["single_losses"]) == 4
    differences = report["differences"]
    assert all(np.isfinite(v) for v in differences.values()), {k: v for k, v in differences.items() if not np.isfinite(v)}
    worst = max(differences.items(), key=lambda item: item[1])
    # Not 1e-15: the deepest local layers' BatchNorm statistics (2x2 maps) carry rounding
    # forward through 4 steps. Two one-device runs whose only difference is the order of
    # XLA's float64 sums (YNNPACK's reductions or XLA's own) end up to 3e-8 apart there.
    assert worst[1] < 1e-7, worst

    _assert_data_parallel_step(report["parallel_step"], report["single_step"])
    assert report["mismatch"] == "batch size 4 does not divide over 8 devices; use a multiple of 8 (e.g. --batch-size 8)."


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["auto", "keras_ops"])
def test_data_parallel_train_step_communicates_only_by_all_reduce(attention):
    # MedT's train step (tiny widths, batch 8 of 128x128) compiled under
    # DataParallel over 8 devices, with the CPU's blocked kernel ("auto")
    # and with the GPU/TPU form: the batch stays sharded through the patch
    # fold, the local branch's per-patch BatchNorm groups, the attention and
    # the unfold; gradients and batch statistics are all-reduced. With the
    # earlier patch-major fold XLA all-gathered the folded patches and ran
    # the local branch replicated on every device (2 all-gathers).
    result = subprocess.run([sys.executable, "-m", "tests.training.hlo_worker", attention], env=_env(8), cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    assert set(report["collectives"]) == {"all-reduce"}, report


def _assert_data_parallel_step(parallel, single):
    """Data parallelism really ran, as seen in the compiled train steps.

    The step received the global batch of 8 sharded over the 8 devices (one
    example each), and its optimised HLO all-reduces gradients: among the
    shapes its all-reduce instructions reduce (up to layout) are conv
    kernels' (batch statistics are 1-d, the loss a scalar) and a good part
    of all the trainable variables' shapes (XLA reduces some gradients in
    other shapes, before a reshape or split across instructions). The
    one-device step has no all-reduce, on a batch that is not sharded.
    """
    import math

    assert parallel["input_devices"] == 8 and parallel["input_shape"] == [8, 128, 128, 1]
    assert parallel["input_spec"].startswith("P('batch'")
    assert parallel["input_shard_shapes"] == [[1, 128, 128, 1]]
    assert single["input_devices"] == 1 and single["all_reduces"] == 0
    assert parallel["all_reduces"] > 0
    reduced = {tuple(shape) for shape in parallel["all_reduced_shapes"]}
    trainable = {tuple(shape) for shape in parallel["trainable_shapes"]}
    kernels = [s for s in trainable & reduced if len(s) == 4 and math.prod(s) > 64]
    assert len(kernels) >= 3, (sorted(reduced), sorted(trainable))
    assert len(trainable & reduced) >= len(trainable) // 3, (sorted(reduced), sorted(trainable))


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_preempted_killed_and_resumed_through_orbax(tmp_path):
    # Two processes of 2 devices each save the run state as an Orbax checkpoint. A SIGTERM
    # to process 1 alone, inside epoch 1, makes both save after the same step and exit with
    # the preempted status; resumed, both are SIGKILLed while epoch 1's save is being
    # written in the background; resumed again in two processes, they end with the
    # variables of the same run in one process on 4 devices.
    # (Resuming on another device count: tests/training/test_checkpoint.py.)
    manual = write_medt_folder(os.fspath(tmp_path / "manual"), {"train": 16, "validation": 6, "test": 6}, size=32)
    # Not prepared here: process 0 prepares the dataset while process 1 waits for it.
    data_dir = os.fspath(tmp_path / "tfds")
    common = ["--model", "gated", "--model-args", '{"blocks": [1, 1, 1, 1], "groups": 2}', "--img-size", "32",
              "--dataset", "medt_folder", "--manual-dir", manual, "--data-dir", data_dir, "--batch-size", "4",
              "--epochs", "2", "--distribution", "data_parallel", "--verbose", "0", "--checkpoint-every", "1",
              # float64: in float32 the two runs differ by reduction order (gloo across processes,
              # XLA within one), and Adam amplifies that noise on near-zero gradients within a few steps.
              "--dtype", "float64"]
    multi = os.fspath(tmp_path / "multi")

    def two_processes(stop_at=("", ""), *extra):
        address = f"127.0.0.1:{_free_port()}"
        return [
            subprocess.Popen(
                [sys.executable, "-m", "tests.training.kill_points", *common, "--output-dir", multi, *extra,
                 "--coordinator-address", address, "--num-processes", "2", "--process-id", str(index)],
                env=dict(_env(2), MEDT_STOP_AT=stop_at[index]), cwd=ROOT, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
            )
            for index in range(2)
        ]

    # Process 1 stops while it fetches its 3rd training batch (Keras reads one to build the
    # model first): step 2 is about to run, with 4 steps an epoch (8 examples per process).
    preempted = two_processes(("", "batch:3"))
    assert stopped(preempted[1], timeout=900), preempted[1].communicate()[1][-3000:]
    preempted[1].send_signal(signal.SIGTERM)
    preempted[1].send_signal(signal.SIGCONT)
    outputs = [p.communicate(timeout=300) for p in preempted]
    for process, (_, err) in zip(preempted, outputs):
        assert process.returncode == PREEMPTED, err[-3000:]
        assert "run state saved after step 2;" in err, err[-3000:]
    meta = checkpoint.read_run_state(multi)
    assert (meta["next_epoch"], meta["next_batch"], meta["step"]) == (0, 2, 2)
    assert sorted(os.listdir(os.path.join(multi, checkpoint.ORBAX_DIR))) == ["2"]

    killed = two_processes(("orbax_save:1:after",) * 2, "--resume")
    for process in killed:
        assert stopped(process, timeout=900), process.communicate()[1][-3000:]
    for process in killed:
        process.kill()
        process.communicate()
    # Epoch 1's save (step 4) may or may not have been committed; nothing else is there.
    assert not os.path.exists(os.path.join(multi, checkpoint.STATE_FILE))
    assert checkpoint.saved_format(multi) == "orbax"
    assert checkpoint.read_run_state(multi)["step"] in (2, 4)

    resumed = two_processes(("", ""), "--resume")
    outputs = [p.communicate(timeout=900) for p in resumed]
    for process, (out, err) in zip(resumed, outputs):
        assert process.returncode == 0, err[-3000:]
    assert "data-parallel over 4 devices in 2 process(es)" in outputs[0][0]
    assert checkpoint.saved_format(multi) == "orbax"
    for name in ("model.keras", "test_metrics.json", "log.csv", "best.weights.h5"):
        assert (tmp_path / "multi" / name).is_file(), name
    assert datasets.load("medt_folder", data_dir=data_dir, manual_dir=manual)["train"][0]["image"].shape == (32, 32, 3)
    meta = checkpoint.read_run_state(multi)
    assert [row["epoch"] for row in meta["history"]] == [1, 2]
    # Named by steps done (4 an epoch), the latest two kept, no temporaries left.
    assert sorted(os.listdir(os.path.join(multi, checkpoint.ORBAX_DIR))) == ["4", "8"]

    # The same run in one process with 4 devices (run_state.npz) ends with the same variables.
    single = subprocess.run([sys.executable, "-m", "training.train", *common, "--output-dir",
                             os.fspath(tmp_path / "single")], env=_env(4), cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    assert checkpoint.saved_format(tmp_path / "single") == "npz"
    states = [checkpoint.state_arrays(d) for d in (multi, tmp_path / "single")]
    for prefix in ("model", "optimizer"):
        assert states[0][prefix].keys() == states[1][prefix].keys()
        for key, value in states[0][prefix].items():
            assert np.isfinite(value).all(), key
            np.testing.assert_allclose(value, states[1][prefix][key], rtol=1e-6, atol=1e-6, err_msg=key)
    histories = [checkpoint.read_run_state(d)["history"] for d in (multi, tmp_path / "single")]
    for a, b in zip(*histories):
        for key in ("loss", "f1", "val_loss", "val_f1"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-9, err_msg=f"epoch {a['epoch']} {key}")
    reports = [json.loads((tmp_path / d / "test_metrics.json").read_text()) for d in ("multi", "single")]
    assert abs(reports[0]["f1"] - reports[1]["f1"]) < 1e-6
