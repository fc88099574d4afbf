import numpy as np
import pytest

from training.benchmark import _RssSampler


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_step_memory_sampler_sees_memory_held_inside_the_block():
    with _RssSampler() as idle:
        pass
    with _RssSampler() as busy:
        block = np.ones(64 * 2**20 // 8 * 4)  # 256 MiB, touched
        block.sum()
        __import__("time").sleep(0.05)
    del block
    assert busy.peak_gib - idle.peak_gib > 0.2


def test_steps_are_timed_without_the_memory_sampler_running():
    import threading

    from training.benchmark import _time_then_sample

    base = threading.active_count()
    seen = []
    seconds, memory = _time_then_sample(lambda: seen.append(threading.active_count()), repeats=3)
    # Three timed steps alone, then two with the sampler's thread beside them.
    assert seen == [base] * 3 + [base + 1] * 2
    assert seconds >= 0 and memory.peak_gib > 0


def test_sliding_window_mode_prints_the_ratio_and_writes_json(tmp_path, monkeypatch, capsys):
    import json

    from training import benchmark

    workload = dict(workload="synthetic 256x256", images=1, image_shape=[256, 256], tiles=36, batches=5,
                    megapixels=0.065536, bare_seconds=2.0, sliding_window_seconds=2.2, bare_tiles_per_second=18.0,
                    sliding_window_tiles_per_second=16.4, megapixels_per_second=0.0298, ratio_to_bare=1.1,
                    ratio_to_bare_cpu_time=1.05, bare_one_at_a_time_seconds=2.1, ratio_to_bare_one_at_a_time=1.05,
                    window_peak_rss_gib=0.5)
    specs = []

    def child(spec):
        specs.append(spec)
        return dict(implementation="medt-keras", model="gated", tile=64, batch=8, overlap=0.25, compile_seconds=1.0,
                    workloads=[workload], peak_rss_gib=0.9, device="cpu")

    monkeypatch.setattr(benchmark, "_run_child", child)
    assert benchmark.main(["--sliding-window", "--synthetic", "256", "--json", str(tmp_path / "s.json")]) == 0
    assert specs == [dict(kind="sliding", model_name="gated", tile=64, batch=8, overlap=0.25, synthetic=256,
                          repeats=5)]
    assert "synthetic 256x256" in capsys.readouterr().out
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["results"][0]["workloads"][0]["ratio_to_bare"] == 1.1


def test_loader_mode_times_each_loader_and_compares_with_the_training_rate(tmp_path, monkeypatch, capsys):
    import json

    from training import benchmark

    training = tmp_path / "train.json"
    training.write_text(json.dumps({"results": [
        dict(implementation="medt-keras", model="medt", size=128, batch=4, dtype="float32", rematerialize=False,
             train_images_per_second=4.0),
        dict(implementation="medt-keras", model="medt", size=128, batch=4, dtype="float32", rematerialize=True,
             train_images_per_second=3.0),
        dict(implementation="official PyTorch", model="medt", size=128, batch=4, train_images_per_second=1.0),
    ]}))
    specs = []

    def child(spec):
        specs.append(spec)
        return dict(loader=spec["loader"], workers=spec["workers"], startup_seconds=0.5, images_per_second=400.0,
                    worker_peak_rss_gib=None)

    monkeypatch.setattr(benchmark, "_run_child", child)
    assert benchmark.main(["--loader", "--loader-workers", "0", "2", "--training-json", str(training),
                           "--json", str(tmp_path / "l.json")]) == 0
    assert [(s["loader"], s["workers"]) for s in specs] == [("threads", 0), ("threads", 2), ("grain", 0), ("grain", 2)]
    assert specs[0]["config_name"] == "medt_hela" and specs[0]["batch"] == 4
    assert "100x" in capsys.readouterr().out  # 400 img/s over MedT's 4 img/s training step
    written = json.loads((tmp_path / "l.json").read_text())
    assert written["training_rates"]["images_per_second"] == {"medt": 4.0}
    assert [r["times_training_rate"] for r in written["results"]] == [{"medt": 100.0}] * 4
