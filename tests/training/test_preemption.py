"""Preemption: a SIGTERM saves at the next step and exits with status 75; ``--resume`` continues at the exact batch.

The multi-process case (a SIGTERM to one process of two) is in
``tests/training/test_distribution.py``, with the other two-process runs.
"""

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from training import checkpoint
from training.preemption import PREEMPTED
from tests.synthetic_data import write_medt_folder
from tests.training.kill_points import stopped
from tests.training.test_train import _assert_every_file_readable, _command, _launch_with_stop, _run

FLOAT64 = ("--dtype", "float64", "--epochs", "3")
STEPS_PER_EPOCH = 6  # 24 training examples, batches of 4


def _watch_script(body):
    """A Python program using ``SigtermWatch`` alone (no JAX): its exit status and output."""
    program = "import os, signal, sys\nfrom training.preemption import SigtermWatch\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_sigterm_policy_by_phase():
    # Start-up: at once, status 75.
    result = _watch_script("""
        with SigtermWatch() as watch:
            os.kill(os.getpid(), signal.SIGTERM)
            print("not reached")
    """)
    assert result.returncode == PREEMPTED and "not reached" not in result.stdout
    assert "exiting at once" in result.stderr
    # Training: the first asks for a save at the next step, the second leaves at once.
    result = _watch_script("""
        with SigtermWatch() as watch:
            watch.training()
            assert not watch.should_save(1, 1)
            os.kill(os.getpid(), signal.SIGTERM)
            assert watch.should_save(2, 2) and watch.pending()
            print("saved", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            print("not reached")
    """)
    assert result.returncode == PREEMPTED, result.stderr
    assert result.stdout.split() == ["saved"]
    # After training (the test evaluation): at once.
    result = _watch_script("""
        with SigtermWatch() as watch:
            watch.training()
            watch.finishing()
            os.kill(os.getpid(), signal.SIGTERM)
            print("not reached")
    """)
    assert result.returncode == PREEMPTED and not result.stdout
    # The caller's handler is back afterwards.
    result = _watch_script("""
        def mine(*_):
            print("mine")
        signal.signal(signal.SIGTERM, mine)
        with SigtermWatch():
            assert signal.getsignal(signal.SIGTERM) is not mine
        assert signal.getsignal(signal.SIGTERM) is mine
        os.kill(os.getpid(), signal.SIGTERM)
    """)
    assert result.returncode == 0 and result.stdout.split() == ["mine"], result.stderr


def test_a_run_state_saved_before_saves_inside_epochs_resumes_at_its_epoch():
    from training.train import upgrade_meta

    old = {"next_epoch": 2, "best_val_f1": 0.5, "best_epoch": 1, "history": [{}, {}]}
    assert upgrade_meta(old, 6) == {**old, "next_batch": 0, "step": 12}
    new = {**old, "next_batch": 3, "step": 9}
    assert upgrade_meta(new, 6) == new


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("preemption_data")
    manual = write_medt_folder(os.fspath(root / "manual"), {"train": 24, "validation": 4, "test": 4}, size=32)
    return dict(manual_dir=manual, data_dir=os.fspath(root / "tfds"))


@pytest.fixture(scope="module")
def uninterrupted64(data, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted64")
    _run(data, output, *FLOAT64)
    return output


def _steps_saved(directory):
    """``(meta["step"], the optimizer's iteration counter)`` of the saved state: they must agree."""
    meta = checkpoint.read_run_state(directory)
    iterations = [v for k, v in checkpoint.state_arrays(directory)["optimizer"].items() if k.endswith("iteration")]
    assert len(iterations) == 1
    return meta["step"], int(iterations[0])


def _log_rows(directory):
    with open(os.path.join(directory, "log.csv")) as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def _assert_equals_uninterrupted(expected_dir, resumed_dir, rtol=0.0, atol=1e-12):
    """Variables (float64) to ``atol``, history and log.csv the same (all but the seconds)."""
    expected, resumed = (checkpoint.state_arrays(d) for d in (expected_dir, resumed_dir))
    for prefix in ("model", "optimizer"):
        assert expected[prefix].keys() == resumed[prefix].keys()
        for key, value in expected[prefix].items():
            assert np.isfinite(resumed[prefix][key]).all(), key
            np.testing.assert_allclose(resumed[prefix][key], value, rtol=rtol, atol=atol, err_msg=key)
    histories = [checkpoint.read_run_state(d)["history"] for d in (expected_dir, resumed_dir)]
    assert [row["epoch"] for row in histories[1]] == [1, 2, 3]
    for a, b in zip(*histories):
        assert a.keys() == b.keys()
        for key in a:
            if key != "seconds":
                np.testing.assert_allclose(b[key], a[key], rtol=max(rtol, 1e-12), err_msg=key)
    if not rtol:
        assert _log_rows(resumed_dir) == _log_rows(expected_dir)


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_the_next_step_and_resumes_to_the_uninterrupted_run(data, uninterrupted64, tmp_path):
    import random

    rng = random.Random(29)
    output = tmp_path / "preempted"

    # During start-up (from the line that says JAX has started: data, model, compilation
    # follow): out at once, nothing written that does not parse.
    process = subprocess.Popen(_command(data, output, *FLOAT64), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().startswith("medt-train: JAX"), process.stderr.read()[-2000:]
    time.sleep(rng.uniform(0.0, 2.0))
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == PREEMPTED, err[-2000:]
    _assert_every_file_readable(output)
    assert checkpoint.read_run_state(output) is None

    # A SIGTERM inside the first epoch, and a second one while the state it asked for is
    # written (its temporary whole, not yet renamed): out at once, the rename never done.
    process = _launch_with_stop(data, output, f"batch:{rng.randint(3, 6)},replace:run_state.npz:before", *FLOAT64)
    assert stopped(process), process.stderr.read()[-2000:]
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    assert stopped(process), process.stderr.read()[-2000:]
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    assert process.wait(timeout=30) == PREEMPTED
    assert "exiting at once" in process.stderr.read()
    process.stderr.close()
    _assert_every_file_readable(output)
    assert checkpoint.read_run_state(output) is None

    # One SIGTERM in the second epoch, while the process fetches its N-th training
    # batch (one more fetch than steps: Keras reads a batch to build the model first).
    fetch = rng.randint(STEPS_PER_EPOCH + 3, 2 * STEPS_PER_EPOCH)
    process = _launch_with_stop(data, output, f"batch:{fetch}", *FLOAT64)
    assert stopped(process), process.stderr.read()[-2000:]
    signalled = time.time()
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    status = process.wait(timeout=60)
    seconds = time.time() - signalled
    err = process.stderr.read()
    process.stderr.close()
    assert status == PREEMPTED, err[-3000:]
    assert seconds < 20, f"{seconds:.1f} s from SIGTERM to exit"
    _assert_every_file_readable(output)
    # Steps dispatched when signalled: fetch - 2 done, the fetched one about to run. The
    # state holds that one too: the step in flight is finished and saved, none is lost.
    step, iterations = _steps_saved(output)
    assert step == iterations == fetch - 1, err[-2000:]
    meta = checkpoint.read_run_state(output)
    assert (meta["next_epoch"], meta["next_batch"]) == (1, step - STEPS_PER_EPOCH)
    assert [row["epoch"] for row in meta["history"]] == [1]

    resumed = subprocess.run(_command(data, output, *FLOAT64, "--resume"), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {output} at epoch 2, batch {meta['next_batch'] + 1}." in resumed.stdout
    _assert_equals_uninterrupted(uninterrupted64, output)


@pytest.mark.slow
def test_save_every_steps_with_steps_per_execution_saves_on_execution_boundaries(data, uninterrupted64, tmp_path):
    output = tmp_path / "every"
    every = ("--save-every-steps", "2", "--steps-per-execution", "3", "--loader-workers", "1")
    # Stopped and killed right after the first save inside an epoch.
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.training.kill_points", *_command(data, output, *FLOAT64, *every)[3:]],
        env=dict(os.environ, MEDT_STOP_AT="replace:run_state.npz:after"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert stopped(process), process.stderr.read()[-2000:]
    process.kill()
    out, _ = process.communicate()
    assert "saved at execution boundaries" in out
    # 2 steps asked, 3 per execution: the first boundary at or after step 2.
    assert _steps_saved(output) == (3, 3)
    assert checkpoint.read_run_state(output)["next_batch"] == 3

    resumed = _run(data, output, *FLOAT64, *every, "--resume")
    assert "at epoch 1, batch 4." in resumed.stdout
    # Three steps per call compute what one per call does, up to the order of float64 sums.
    _assert_equals_uninterrupted(uninterrupted64, output, rtol=1e-9, atol=1e-12)
