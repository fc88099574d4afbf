"""``medt-bench suite accelerator``: budgeted, error-tolerant, saved after every item."""

import json
import math
import os
import subprocess
import sys

import pytest

from training.bench.accelerator_suite import Suite, fixture_paths, throughput_estimate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_GATED = os.path.join(REPO, "tests", "fixtures", "official", "gated_img32_c3_k2_b2_s3_w0.03125_g2_l1-1-1-1.pth")


def test_suite_records_errors_skips_over_budget_and_saves_after_every_item(tmp_path):
    path = tmp_path / "suite.json"
    suite = Suite(budget_s=60, json_path=str(path), command="test")
    seen_on_disk = []

    def second():
        # The first item is on disk before the second starts: a killed run keeps it.
        seen_on_disk.append([i["name"] for i in json.loads(path.read_text())["items"]])
        raise RuntimeError("impossible size")

    suite.run("throughput", "first", lambda: {"train_seconds": 1.0})
    suite.run("throughput", "second", second)
    suite.run("throughput", "third", lambda: {"x": 1}, estimate_s=1e6)
    suite.run("parity", "fourth", lambda: {"x": 2}, estimate_s=5, limit_s=1)
    suite.run("parity", "fifth", lambda: {"x": 3}, estimate_s=0.5, limit_s=1)

    report = json.loads(path.read_text())
    assert seen_on_disk == [["first"]]
    assert [i["status"] for i in report["items"]] == ["ok", "error", "skipped", "skipped", "ok"]
    assert report["items"][1]["error"] == "RuntimeError: impossible size"
    assert "over budget" in report["items"][2]["reason"]
    assert report["counts"] == {"ok": 2, "error": 1, "skipped": 2}
    assert all("device_memory" in i for i in report["items"] if i["status"] != "skipped")


def test_throughput_estimate_scales_the_measured_steps_with_batch_and_pixels():
    done = [dict(kind="throughput", status="ok", model="gated", size=32, batch=2, dtype="float32",
                 train_seconds=0.1, infer_seconds=0.05, compile_train_seconds=10.0, compile_infer_seconds=5.0,
                 seconds=16.0)]
    same = throughput_estimate(done, "gated", 32, 4, "float32", repeats=3)
    assert same == pytest.approx(15 + 4 * 0.15 * 2 + 2)
    larger = throughput_estimate(done, "gated", 64, 2, "float32", repeats=3)
    assert larger == pytest.approx(15 * 2 + 4 * 0.15 * 4 + 2)
    assert throughput_estimate(done, "medt", 32, 2, "float32", repeats=3) == 16.0  # the slowest so far
    assert throughput_estimate([], "medt", 32, 2, "float32", repeats=3) is None


def test_fixtures_are_found_from_the_given_root_tiny_first_then_full_size_medt_first(tmp_path):
    root = tmp_path / "checkout"
    for folder, names in ((root / "tests" / "fixtures" / "official", ["gated_img32.pth", "axialunet_img32.pth"]),
                          (tmp_path / "shared" / "fixtures" / "official" / "full", ["gated_img128.pth"]),
                          (root / "shared" / "fixtures" / "official" / "full",
                           ["medt_img128.pth", "gated_img128.pth"])):
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_bytes(b"")
    found = [os.path.relpath(p, tmp_path) for p in fixture_paths(None, str(root))]
    tiny = os.path.join("checkout", "tests", "fixtures", "official")
    assert found == [os.path.join(tiny, "axialunet_img32.pth"), os.path.join(tiny, "gated_img32.pth"),
                     os.path.join("checkout", "shared", "fixtures", "official", "full", "medt_img128.pth"),
                     os.path.join("shared", "fixtures", "official", "full", "gated_img128.pth")]
    assert fixture_paths(None, str(tmp_path / "elsewhere")) == []
    assert fixture_paths([str(root / "tests" / "fixtures" / "official")]) == fixture_paths(None, str(root))[:2]


@pytest.mark.slow
def test_the_whole_suite_on_this_device_with_tiny_settings(tmp_path):
    """Peak, parity of one shipped fixture, throughput of a tiny gated U-Net, a failing and a skipped item.

    About 2.5 min on a busy 2-core machine (the parity case and the
    Keras train step compile for about a minute each there).
    """
    out = tmp_path / "accelerator.json"
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=REPO)
    command = [
        sys.executable, "-m", "training.bench", "suite", "accelerator", "--budget-s", "600",
        # Size 3 cannot be built (not divisible by 32): its items must fail and the suite go on.
        "--models", "gated", "--sizes", "3", "32", "--batches", "2", "65536", "--dtypes", "float32",
        "--repeats", "2", "--fixtures", TINY_GATED, "--json", str(out),
        "--model-kwargs", json.dumps({"width_scale": 0.03125, "groups": 2, "blocks": [1, 1, 1, 1]}),
    ]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["finished"] and report["platform"]["backend"] and report["platform"]["devices"]
    assert report["platform"]["jax"] and report["platform"]["jaxlib"]
    items = {i["name"]: i for i in report["items"]}

    parity = [i for i in report["items"] if i["kind"] == "parity" and i["precision"] == "highest"]
    assert parity and parity[0]["status"] == "ok", parity
    for key in ("eval32", "eval64", "train64", "loss64", "grad64", "stats64"):
        assert math.isfinite(parity[0][key]) and parity[0][key] <= parity[0]["tolerances"][key]
    assert parity[0]["failures"] == []
    default = [i for i in report["items"] if i["kind"] == "parity" and i["precision"] == "default"]
    assert default[0]["status"] == "ok" and default[0]["within_tolerance"]

    assert items["gated 3x3 batch 2 float32"]["status"] == "error"
    assert "divisible" in items["gated 3x3 batch 2 float32"]["error"]
    measured = items["gated 32x32 batch 2 float32"]
    assert measured["status"] == "ok", measured
    assert measured["train_images_per_second"] > 0 and measured["infer_images_per_second"] > 0
    assert measured["compile_train_seconds"] > 0
    assert "device_memory" in measured  # null on CPU
    assert items["gated 32x32 batch 65536 float32"]["status"] == "skipped"
    assert "over budget" in items["gated 32x32 batch 65536 float32"]["reason"]
    assert items["official PyTorch"]["status"] == "skipped"
    # One console line per item.
    assert sum(line.startswith("[") for line in run.stdout.splitlines()) == len(report["items"])
