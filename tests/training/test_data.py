import importlib.util
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import medt_keras  # noqa: F401

from medt_keras.datasets import DatasetError
from training.data import SegmentationBatches, to_model_input


def _source(count, size=6, channels=3):
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.integers(0, 256, (size, size, channels)).astype(np.uint8),
            "mask": (rng.random((size, size, 1)) < 0.5).astype(np.uint8),
            "name": f"ex{i}".encode(),
        }
        for i in range(count)
    ]


def test_batches_are_a_pure_function_of_seed_epoch_and_index():
    source = _source(10)
    a = SegmentationBatches(source, 4, 6, shuffle=True, flip_probability=0.5, seed=3)
    b = SegmentationBatches(source, 4, 6, shuffle=True, flip_probability=0.5, seed=3)
    assert a.num_batches == 3 and a[2][0].shape == (2, 6, 6, 3)  # last batch keeps the remainder
    for epoch in (0, 1, 5):
        a.epoch = b.epoch = epoch
        for index in (2, 0, 1):  # any order, any process: same batch
            np.testing.assert_array_equal(a[index][0], b[index][0])
    a.epoch = 0
    first = np.concatenate([a[i][1] for i in range(3)])
    a.epoch = 1
    second = np.concatenate([a[i][1] for i in range(3)])
    assert not np.array_equal(first, second)  # a new order each epoch


def test_flip_moves_image_and_mask_together_and_channel_order():
    source = _source(1)
    flipped = SegmentationBatches(source, 1, 6, shuffle=True, flip_probability=1.0)
    image, mask = flipped[0]
    expected = source[0]["image"][:, ::-1, ::-1].astype(np.float32) / 255  # flipped, BGR
    np.testing.assert_allclose(image[0], expected)
    np.testing.assert_array_equal(mask[0], source[0]["mask"][:, ::-1, 0])
    rgb = to_model_input(source[0]["image"], "rgb")
    np.testing.assert_allclose(rgb, source[0]["image"] / 255.0, rtol=1e-6)


def test_examples_per_epoch_draws_a_fresh_sample():
    source = _source(12)
    batches = SegmentationBatches(source, 2, 6, shuffle=True, examples_per_epoch=4)
    assert batches.num_batches == 2
    seen = set()
    for epoch in range(4):
        batches.epoch = epoch
        seen |= {m.tobytes() for i in range(2) for m in batches[i][1]}
    assert len(seen) > 4


def test_crop_and_resize_to_the_model_size():
    source = _source(2, size=16)
    cropped = SegmentationBatches(source, 2, 8, shuffle=True, crop_size=8)
    image, mask = cropped[0]
    assert image.shape == (2, 8, 8, 3) and mask.shape == (2, 8, 8)
    resized = SegmentationBatches(source, 2, 8)
    assert resized[0][0].shape == (2, 8, 8, 3) and set(np.unique(resized[0][1])) <= {0, 1}


def test_split_errors_name_the_split():
    with pytest.raises(DatasetError, match="hela train: the split is empty"):
        SegmentationBatches([], 4, 6, name="hela train")
    with pytest.raises(DatasetError, match="hela train: 3 example.*one batch of 4"):
        SegmentationBatches(_source(3), 4, 6, shuffle=True, name="hela train")
    bad = _source(1)
    bad[0]["mask"] = bad[0]["mask"][:5]
    with pytest.raises(DatasetError, match="ex0"):
        SegmentationBatches(bad, 1, 6, name="x")[0]


def _large_source(shapes, foreground=None):
    """Examples of the given ``(h, w)`` sizes; pixel value = example index, mask 1 only at ``foreground[i]``."""
    records = []
    for i, (h, w) in enumerate(shapes):
        mask = np.zeros((h, w, 1), np.uint8)
        if foreground and foreground[i] is not None:
            y, x = foreground[i]
            mask[y, x] = 1
        records.append({"image": np.full((h, w, 1), i, np.uint8), "mask": mask, "name": f"ex{i}"})
    return records


def test_crops_are_the_unit_of_an_epoch_drawn_by_area_and_deterministic():
    source = _large_source([(40, 60), (120, 180), (40, 60)])  # areas 1 : 9 : 1
    batches = SegmentationBatches(source, 4, 8, shuffle=True, crop_size=8, examples_per_epoch=400, seed=5)
    assert len(batches) == 100  # 400 crops from 3 images, drawn with replacement
    order, _, crops = batches._epoch_plan()
    assert len(order) == 400 and np.mean(order == 1) == pytest.approx(9 / 11, abs=0.06)
    image, mask = batches[7]
    assert image.shape == (4, 8, 8, 1) and mask.shape == (4, 8, 8)
    again = SegmentationBatches(source, 4, 8, shuffle=True, crop_size=8, examples_per_epoch=400, seed=5)
    again.epoch = batches.epoch = 3
    np.testing.assert_array_equal(again[7][0], batches[7][0])  # a pure function of (seed, epoch, batch)
    batches.epoch = 4
    assert not np.array_equal(again._epoch_plan()[0], batches._epoch_plan()[0])


def test_foreground_fraction_centres_crops_on_foreground():
    source = _large_source([(64, 64)] * 2, foreground=[(50, 10), None])
    uniform = SegmentationBatches(source, 4, 8, shuffle=True, crop_size=8, examples_per_epoch=200)
    centred = SegmentationBatches(source, 4, 8, shuffle=True, crop_size=8, examples_per_epoch=200,
                                  foreground_fraction=1.0)
    hits = [sum(int(b[i][1].sum()) for i in range(len(b))) for b in (uniform, centred)]
    # Every crop of image 0 holds its one foreground pixel (about 100 of 200); image 1 has none: uniform crops.
    assert hits[1] == np.sum(centred._epoch_plan()[0] == 0) and hits[0] < hits[1] / 5
    with pytest.raises(ValueError, match="foreground_fraction"):
        SegmentationBatches(source, 4, 8, shuffle=True, crop_size=8, examples_per_epoch=8, foreground_fraction=1.5)


def test_prefetching_workers_give_the_same_batches_as_none():
    """Threads build batches ahead, keyed by (epoch, index): an epoch change mid-prefetch uses the new plan."""
    source = _source(22, size=8)
    plain = SegmentationBatches(source, 4, 8, shuffle=True, flip_probability=0.5, crop_size=6, drop_remainder=True)
    threaded = SegmentationBatches(source, 4, 8, shuffle=True, flip_probability=0.5, crop_size=6,
                                   drop_remainder=True, workers=3, max_queue_size=4)
    assert threaded.num_batches == 5  # 22 crops: the partial sixth batch is dropped
    for epoch in (0, 1, 2):
        plain.epoch = threaded.epoch = epoch
        for index in (0, 1, 4, 2) if epoch == 1 else range(threaded.num_batches):
            for a, b in zip(plain[index], threaded[index]):
                np.testing.assert_array_equal(a, b)


def test_padded_evaluation_batches_weigh_real_examples_to_the_exact_mean():
    """6 examples in batches of 4: 2 zero-weight copies; real pixels weigh 8/6 so Keras' mean over 8 is exact."""
    batches = SegmentationBatches(_source(6), 4, 6, pad_remainder=True)
    weights = np.concatenate([batches[i][2] for i in range(batches.num_batches)])
    assert weights.shape == (8, 6, 6)
    np.testing.assert_allclose(weights[:6], 8 / 6)
    np.testing.assert_array_equal(weights[6:], 0.0)
    assert weights.sum() == pytest.approx(6 * 36 * 8 / 6)


needs_grain = pytest.mark.skipif(importlib.util.find_spec("grain") is None,
                                 reason="grain is not installed (pip install -e '.[test]', Python >= 3.11)")


def _assert_same_batches(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@needs_grain
def test_grain_worker_processes_give_the_same_batches_as_the_threads():
    """Two grain worker processes, one stream through 3 epochs of flipped, foreground-centred crops."""
    source = _source(22, size=8)
    plan = dict(shuffle=True, flip_probability=0.5, crop_size=6, foreground_fraction=0.5, drop_remainder=True, seed=4)
    threads = SegmentationBatches(source, 4, 8, **plan)
    grain = SegmentationBatches(source, 4, 8, loader="grain", workers=2, max_queue_size=4, **plan)
    try:
        assert grain.num_batches == threads.num_batches == 5
        built = [grain[0]]  # Keras reads batch 0 once before epoch 0: the stream starts there
        _assert_same_batches(threads[0], built[0])
        assert len(multiprocessing.active_children()) >= 2
        for epoch in range(3):
            threads.epoch = grain.epoch = epoch
            for index in range(grain.num_batches):
                _assert_same_batches(threads[index], grain[index])
        assert not np.array_equal(threads[0][0], built[0][0])  # epoch 2 is not epoch 0
        grain.epoch = 0  # behind the stream: built in this process, the stream left as it is
        _assert_same_batches(built[0], grain[0])
        assert grain._stream.starts == 1
    finally:
        grain.close()


@needs_grain
def test_grain_loader_shares_global_batches_over_processes_and_pads_evaluation():
    """process_count=2: each process's stream yields its half of every global batch, shuffled or padded."""
    source = _source(10, size=6)
    for plan in (dict(shuffle=True, flip_probability=0.5, seed=1), dict(pad_remainder=True)):
        whole = SegmentationBatches(source, 4, 6, **plan)
        halves = [SegmentationBatches(source, 4, 6, loader="grain", workers=1 - p, process_index=p, process_count=2,
                                      **plan) for p in (0, 1)]  # process 0 in a worker process, 1 in a grain thread
        try:
            for epoch in (0, 1):  # two passes: evaluation batches repeat, training ones change
                whole.epoch = halves[0].epoch = halves[1].epoch = epoch
                for index in range(whole.num_batches):
                    parts = [h[index] for h in halves]
                    _assert_same_batches(whole[index], [np.concatenate(p) for p in zip(*parts)])
            if plan.get("pad_remainder"):  # 10 examples in batches of 4: the last 2 of the third are copies
                np.testing.assert_allclose(parts[0][2], 12 / 10)
                np.testing.assert_array_equal(parts[1][2], 0.0)
            assert [h._stream.starts for h in halves] == [1, 1]
        finally:
            for h in halves:
                h.close()


# A training process's stand-in (no Keras): starts one grain worker, prints its pid, waits to be killed.
_PARENT = """
import multiprocessing, time
import numpy as np
from training.batch_builder import BatchBuilder
from training.grain_stream import BatchStream
if __name__ == "__main__":
    source = [{"image": np.zeros((4, 4, 1), np.uint8), "mask": np.zeros((4, 4, 1), np.uint8)}] * 8
    stream = BatchStream(BatchBuilder(source, 2, 4, shuffle=True), workers=1)
    stream.get(0, 0)
    print(*[p.pid for p in multiprocessing.active_children()], flush=True)
    time.sleep(120)
"""


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@needs_grain
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc (Linux)")
def test_grain_workers_end_when_their_parent_is_killed():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True, env=env)
    workers = []
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 1 and _running(workers[0])
        parent.kill()  # SIGKILL: no clean-up in the parent
        parent.wait()
        deadline = time.monotonic() + 10
        while _running(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(workers[0])
    finally:
        parent.kill()
        parent.stdout.close()
        for pid in workers:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


@needs_grain
def test_loader_choice_is_checked_and_passed_by_make_batches():
    from training.config import TrainConfig
    from training.train import make_batches

    with pytest.raises(ValueError, match="loader"):
        SegmentationBatches(_source(4), 2, 6, loader="processes")
    with pytest.raises(ValueError, match="loader"):
        TrainConfig(loader="processes")
    sources = {split: _source(8) for split in ("train", "validation", "test")}
    config = TrainConfig(loader="grain", loader_workers=3, img_size=6, batch_size=4)
    assert [(b.loader, b.workers_) for b in make_batches(config, sources)] == [("grain", 3)] * 3
