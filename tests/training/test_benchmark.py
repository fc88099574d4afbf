import numpy as np
import pytest

from training.bench import allocators, comparison, official, op_profile, ours, tables, worker
from training.bench.cli import main
from training.bench.timing import RssSampler, time_then_sample, timed_steps


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_step_memory_sampler_sees_memory_held_inside_the_block():
    with RssSampler() as idle:
        pass
    with RssSampler() as busy:
        block = np.ones(64 * 2**20 // 8 * 4)  # 256 MiB, touched
        block.sum()
        __import__("time").sleep(0.05)
    del block
    assert busy.peak_gib - idle.peak_gib > 0.2


def test_steps_are_timed_without_the_memory_sampler_running():
    import threading

    base = threading.active_count()
    seen = []
    seconds, memory = time_then_sample(lambda: seen.append(threading.active_count()), repeats=3)
    # Three timed steps alone, then two with the sampler's thread beside them.
    assert seen == [base] * 3 + [base + 1] * 2
    assert seconds >= 0 and memory.peak_gib > 0


def test_sliding_window_mode_prints_the_ratio_and_writes_json(tmp_path, monkeypatch, capsys):
    import json

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

    monkeypatch.setattr(worker, "run_child", child)
    assert main(["--sliding-window", "--synthetic", "256", "--json", str(tmp_path / "s.json")]) == 0
    assert specs == [dict(kind="sliding", model_name="gated", tile=64, batch=8, overlap=0.25, synthetic=256,
                          repeats=5)]
    assert "synthetic 256x256" in capsys.readouterr().out
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["results"][0]["workloads"][0]["ratio_to_bare"] == 1.1


# --- medt-bench --official: the pure parts of the interleaved comparison (nothing timed) ---

LDCONFIG = """4 libs found in cache `/etc/ld.so.cache'
	libtcmalloc_minimal_debug.so.4 (libc6,x86-64) => /lib/x86_64-linux-gnu/libtcmalloc_minimal_debug.so.4
	libtcmalloc_minimal.so.4 (libc6) => /lib32/libtcmalloc_minimal.so.4
	libtcmalloc_minimal.so.4 (libc6,x86-64) => /lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
	libjemalloc.so.2 (libc6,x86-64) => /lib/x86_64-linux-gnu/libjemalloc.so.2
"""


def test_allocators_are_found_in_ldconfig_and_set_in_the_childs_environment():
    found = allocators.find_allocator_libraries(LDCONFIG)
    # The 64-bit library, not the debug variant nor the 32-bit one.
    assert found == {"tcmalloc": "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                     "jemalloc": "/lib/x86_64-linux-gnu/libjemalloc.so.2"}
    assert allocators.find_allocator_libraries("") == {}
    assert allocators.resolve_allocators(["auto"], found) == ["glibc", "tcmalloc", "jemalloc"]
    assert allocators.resolve_allocators(["auto"], {}) == ["glibc"]
    assert allocators.resolve_allocators(["glibc", "jemalloc-default", "glibc"], found) == ["glibc", "jemalloc-default"]
    with pytest.raises(ValueError, match="no libtcmalloc"):
        allocators.resolve_allocators(["tcmalloc"], {})
    with pytest.raises(ValueError, match="unknown allocator"):
        allocators.resolve_allocators(["mimalloc"], found)

    base = {"PATH": "/bin", "LD_PRELOAD": "/x.so", "MALLOC_CONF": "y", "GLIBC_TUNABLES": "z"}
    env, described = allocators.allocator_environment("glibc", found, base)
    assert env == {"PATH": "/bin"} and described == "glibc"
    env, described = allocators.allocator_environment("tcmalloc", found, base)
    assert env == {"PATH": "/bin", "LD_PRELOAD": found["tcmalloc"]}
    assert described == f"tcmalloc (LD_PRELOAD={found['tcmalloc']})"
    env, _ = allocators.allocator_environment("jemalloc", found, base)
    assert env["LD_PRELOAD"] == found["jemalloc"] and env["MALLOC_CONF"] == allocators.JEMALLOC_CONF
    env, _ = allocators.allocator_environment("jemalloc-default", found, base)
    assert "MALLOC_CONF" not in env
    env, _ = allocators.allocator_environment("glibc-thp", found, base)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_official_configurations_are_every_thread_count_by_layout_and_described():
    configs = official.official_configs([1, 2, 2], [False, True])
    assert configs == [
        {"threads": 1, "interop_threads": 1, "channels_last": False, "omp_wait_policy": None},
        {"threads": 1, "interop_threads": 1, "channels_last": True, "omp_wait_policy": None},
        {"threads": 2, "interop_threads": 1, "channels_last": False, "omp_wait_policy": None},
        {"threads": 2, "interop_threads": 1, "channels_last": True, "omp_wait_policy": None},
    ]
    assert official.describe_official(configs[1]) == "PyTorch 1 thread, interop 1, channels_last"
    assert official.describe_official(configs[2]) == "PyTorch 2 threads, interop 1, NCHW (contiguous)"
    assert official.official_configs([2], [True], interop_threads=2) == [
        {"threads": 2, "interop_threads": 2, "channels_last": True, "omp_wait_policy": None}]
    # A wait policy matters only where threads wait for each other: not with one thread.
    configs = official.official_configs([1, 2], [False], wait_policies=[None, "PASSIVE"])
    assert [(c["threads"], c["omp_wait_policy"]) for c in configs] == [(1, None), (2, None), (2, "PASSIVE")]
    assert official.describe_official(configs[2]) == (
        "PyTorch 2 threads, interop 1, NCHW (contiguous), OMP_WAIT_POLICY=PASSIVE")


def test_timed_steps_give_up_after_their_time_limit():
    calls = []

    def step():
        calls.append(1)
        __import__("time").sleep(0.02)

    result = timed_steps(step, repeats=5, warmup=1, give_up_after=0.001)
    assert len(calls) == 2 and len(result["seconds"]) == 1 and result["gave_up"] is True
    result = timed_steps(step, repeats=2, warmup=0)
    assert len(result["seconds"]) == 2 and "gave_up" not in result


def test_runs_interleave_and_the_table_names_both_configurations():
    assert comparison.interleaved_order(("ours", "official"), 3) == [
        ("ours", 0), ("official", 0), ("ours", 1), ("official", 1), ("ours", 2), ("official", 2)]
    search = [{"config": "a", "train": {"median_seconds": 3.0}, "infer": {"median_seconds": 1.0}},
              {"config": "b", "train": {"median_seconds": 2.0}, "infer": {"median_seconds": 1.5}}]
    assert comparison.fastest_config(search, "train")["config"] == "b"
    assert comparison.fastest_config(search, "infer")["config"] == "a"
    with pytest.raises(ValueError):
        comparison.fastest_config([], "train")
    abandoned = {"config": "c", "train": {"median_seconds": 1.0, "gave_up": True}}
    assert comparison.fastest_config(search + [abandoned], "train")["config"] == "b"

    ours = comparison.summarize_runs([{"seconds": [1.0, 1.2, 5.0], "cpu_seconds": [2.0, 2.0, 2.0]},
                                     {"seconds": [1.1], "cpu_seconds": [2.2]},
                                     {"seconds": [0.9, 1.0], "cpu_seconds": [1.8, 1.8]}])
    assert ours["run_seconds"] == [1.2, 1.1, 0.95] and ours["median_seconds"] == 1.1
    assert ours["median_cpu_seconds"] == 2.0
    official = comparison.summarize_runs([{"seconds": [3.3], "cpu_seconds": [3.0]}] * 3)
    row = comparison.comparison_row("medt", 128, "train", "tcmalloc (LD_PRELOAD=/t.so)", ours, official,
                                   "medt-keras float32", "PyTorch 1 thread, interop 1, channels_last", 4)
    assert row["ratio"] == pytest.approx(3.0) and row["cpu_time_ratio"] == pytest.approx(1.5)
    assert row["ours_images_per_second"] == pytest.approx(4 / 1.1)
    lines = tables.format_comparison_table([row])
    assert "3.00x" in lines[1] and "1.50x" in lines[1] and "tcmalloc" in lines[1]
    assert "medt-keras float32 | PyTorch 1 thread, interop 1, channels_last" in lines[1]
    slower = dict(row, allocator="glibc", official_seconds=5.0)
    assert comparison.headline_rows([slower, row]) == [row]


def test_the_comparison_alternates_sides_and_times_the_official_in_its_fastest_configuration(monkeypatch):
    import argparse

    requests = []
    started = []

    class FakeWorker:
        def __init__(self, spec, env):
            started.append((spec["kind"], env.get("OMP_WAIT_POLICY"), spec.get("workload")))
            self.kind = spec["kind"]
            keras = {"config": "ours-config", "compile_seconds": 1.0}
            self.info = dict(keras, config=f"ours-{spec['workload']}") if self.kind == "keras" else {
                "implementation": "official"}

        def request(self, **request):
            requests.append((self.kind, request.get("workload"), request.get("config")))
            limits.append(request.get("give_up_after"))
            config = request.get("config") or {}
            fast = config.get("threads") == 1 and config.get("channels_last")
            seconds = 1.0 if self.kind == "keras" else (2.0 if fast else 4.0)
            return {"seconds": [seconds] * request["repeats"], "cpu_seconds": [seconds] * request["repeats"]}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    limits = []
    monkeypatch.setattr(worker, "Worker", FakeWorker)
    monkeypatch.setattr(comparison, "official_builder", lambda model: "MedT")
    args = argparse.Namespace(official_threads=[1, 2], official_channels_last=[False, True], official_interop_threads=1,
                              official_wait_policies=[None, "PASSIVE"],
                              rematerialize="off", dtype="float32", batch=4, infer_batch=8, official="/o",
                              search_repeats=2, rounds=3, repeats=2, step_memory=False)
    record = comparison.compare_with_official("medt", 128, args, "glibc", {"OMP_WAIT_POLICY": "ACTIVE"}, "glibc",
                                             log=lambda *a, **k: None)
    # 1 thread x 2 layouts, 2 threads x 2 wait policies x 2 layouts; one official worker per wait policy.
    search, timed = requests[:12], requests[12:]
    assert [kind for kind, _, _ in search] == ["official"] * 12
    # Ours: one worker per workload (each under its command's compiler setting).
    assert started == [("keras", "ACTIVE", "train"), ("keras", "ACTIVE", "infer"), ("official", None, None),
                       ("official", "PASSIVE", None)]
    # The first configuration has no limit; the next may run 3x the fastest so far, warm-up included.
    assert limits[:4] == [None, None, 3 * 4.0 * 3, 3 * 4.0 * 3] and limits[4] == 3 * 2.0 * 3
    best = {"threads": 1, "interop_threads": 1, "channels_last": True, "omp_wait_policy": None}
    assert record["official_best"] == {"train": best, "infer": best}
    assert timed == [("keras", "train", None), ("keras", "infer", None),
                     ("official", "train", best), ("official", "infer", best)] * 3
    train, infer = record["comparison"]
    assert train["ratio"] == 2.0 and infer["ratio"] == 2.0
    assert train["official_config"] == "PyTorch 1 thread, interop 1, channels_last"
    assert train["ours_config"] == "ours-train" and infer["ours_config"] == "ours-infer"
    assert train["ours_run_seconds"] == [1.0] * 3
    assert [run["side"] for run in record["runs"]] == ["ours", "ours", "official", "official"] * 3


def test_a_worker_answers_requests_until_quit(monkeypatch, capsys):
    import io
    import json

    class FakeTimer:
        def __init__(self, **spec):
            self.info = {"spec": spec}
            self.calls = []

        def train(self, config):
            pass

    monkeypatch.setitem(worker.TIMERS, "keras", FakeTimer)
    monkeypatch.setattr("sys.stdin", io.StringIO(
        json.dumps({"op": "time", "workload": "train", "repeats": 3, "warmup": 0}) + "\n" + '{"op": "quit"}\n'))
    assert worker.serve_worker({"kind": "keras", "size": 8}) == 0
    replies = [json.loads(line[len(worker.REPLY):]) for line in capsys.readouterr().out.splitlines()
               if line.startswith(worker.REPLY)]
    assert replies[0] == {"spec": {"size": 8}, "ready": True}
    assert len(replies[1]["seconds"]) == 3 and len(replies[1]["cpu_seconds"]) == 3
    assert replies[2]["peak_rss_gib"] > 0


HLO = """HloModule jit_loss_fn, is_scheduled=true

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  ROOT %fusion.3 = (s32[], f32[4]{0}) fusion(%p), calls=%f3, metadata={op_name="jit(f)/transpose(jvp(b0))/attn/mul"}
}

ENTRY %main (a: f32[4,4]) -> f32[4] {
  %dot.1 = f32[4,4]{1,0} dot(%a, %a), lhs_contracting_dims={1}, metadata={op_name="jit(f)/jvp(stem_conv1)/dot_general"}
  %while.2 = (s32[], f32[4]{0}) while(%t), metadata={op_name="jit(f)/transpose(jvp(b0))/attn/jit(_attention)/while"}
  ROOT %copy.4 = f32[4]{0} copy(%x)
}
"""


def test_profile_sums_exclusive_op_time_per_op_and_source():
    instructions = op_profile.hlo_instructions(HLO)
    assert instructions["dot.1"] == ("dot", "jit(f)/jvp(stem_conv1)/dot_general")
    assert instructions["while.2"][0] == "while" and instructions["fusion.3"][0] == "fusion"
    assert instructions["copy.4"] == ("copy", "")
    assert op_profile.source_of(instructions["while.2"][1]) == "b0/attn (backward)"
    assert op_profile.source_of(instructions["dot.1"][1]) == "stem_conv1"

    meta = [{"ph": "M", "name": "thread_name", "tid": 1, "args": {"name": "tf_XLAEigen/1"}},
            {"ph": "M", "name": "thread_name", "tid": 2, "args": {"name": "python"}}]
    events = meta + [
        {"ph": "X", "tid": 1, "ts": 0, "dur": 100, "name": "ThunkExecutor::Execute"},
        {"ph": "X", "tid": 1, "ts": 0, "dur": 30, "name": "dot.1"},
        {"ph": "X", "tid": 1, "ts": 30, "dur": 2, "name": "end: dot.1"},
        {"ph": "X", "tid": 1, "ts": 40, "dur": 50, "name": "while.2"},  # a loop: 40 of its 50 us in its body
        {"ph": "X", "tid": 1, "ts": 41, "dur": 20, "name": "fusion.3"},
        {"ph": "X", "tid": 1, "ts": 62, "dur": 20, "name": "fusion.3"},
        {"ph": "X", "tid": 1, "ts": 95, "dur": 3, "name": "copy.4"},
        {"ph": "X", "tid": 2, "ts": 0, "dur": 1000, "name": "dot.1"},  # not an XLA thread
    ]
    profile = op_profile.profile_ops(events, instructions, top=2)
    assert profile["op_ms"] == pytest.approx(0.085)  # 32 + 10 + 40 + 3 us
    assert [op["op"] for op in profile["top_ops"]] == ["fusion.3", "dot.1"]
    assert profile["top_ops"][0]["ms"] == pytest.approx(0.040) and profile["top_ops"][0]["events"] == 2
    assert profile["top_ops"][1]["ms"] == pytest.approx(0.032) and profile["top_ops"][1]["opcode"] == "dot"
    assert profile["loops"][0]["op"] == "while.2" and profile["loops"][0]["ms"] == pytest.approx(0.050)
    assert profile["loops"][0]["exclusive_ms"] == pytest.approx(0.010)
    assert profile["by_source"][0] == {"source": "b0/attn (backward)",
                                       "ms": pytest.approx(0.050), "share": pytest.approx(50 / 85)}
    assert profile["runtime_events_ms"] == {"ThunkExecutor::Execute": pytest.approx(0.1)}
    assert profile["loops_ms"] == pytest.approx(0.050)
    assert profile["by_kind"][0] == {"kind": "fusion", "ms": pytest.approx(0.040), "share": pytest.approx(40 / 85)}


def test_official_mode_prints_every_ratio_and_writes_json(tmp_path, monkeypatch, capsys):
    import json

    def row(allocator, workload, official_seconds):
        ours = {"median_seconds": 1.0, "median_cpu_seconds": 1.5, "run_seconds": [1.0] * 3,
                "run_cpu_seconds": [1.5] * 3}
        official = dict(ours, median_seconds=official_seconds, run_seconds=[official_seconds] * 3)
        return comparison.comparison_row("gated", 64, workload, allocator, ours, official, "ours-config",
                                        "official-config", 2)

    compared = []

    def compare(model, size, args, allocator, env, description, log=print):
        compared.append((model, size, allocator, env.get("LD_PRELOAD")))
        seconds = {"glibc": 4.0, "tcmalloc": 2.5}[allocator]
        return {"allocator": allocator, "comparison": [row(description, "train", seconds),
                                                      row(description, "infer", seconds / 2)]}

    children = []

    def child(spec, env=None):
        children.append((spec["kind"], None if env is None else env.get("LD_PRELOAD")))
        if spec["kind"] == "platform":
            return ["0.0", "cpu", 1, 1, 1]
        if spec["kind"] == "peak":
            return 100.0
        return {"model": "gated", "size": 64, "batch": 2, "peak_gflops": 100.0, "step_seconds": 0.5,
                "step_flops": 10e9, "step_flops_as_compiled": 5e9, "step_gflops_per_second": 20.0,
                "fraction_of_peak": 0.2, "profile": {"steps": 2, "op_ms": 900.0, "wall_ms": 1000.0,
                                                     "top_ops": [], "by_source": []}}

    monkeypatch.setattr(comparison, "compare_with_official", compare)
    monkeypatch.setattr(worker, "run_child", child)
    monkeypatch.setattr(comparison, "installed_allocators", lambda: {"tcmalloc": "/t.so"})
    out = tmp_path / "o.json"
    assert main(["--models", "gated", "--sizes", "64", "--official", "/o", "--profile-models", "gated",
                           "--json", str(out)]) == 0
    assert compared == [("gated", 64, "glibc", None), ("gated", 64, "tcmalloc", "/t.so")]
    # The profile runs under the allocator where our training was fastest (a tie: the first, glibc).
    assert children[-1] == ("train_profile", None)
    printed = capsys.readouterr().out
    assert "4.00x" in printed and "2.50x" in printed and "ours-config | official-config" in printed
    written = json.loads(out.read_text())
    assert len(written["rows"]) == 4 and written["load_at_start"]["load_average"] is not None
    assert [r["allocator"] for r in written["headline"]] == ["tcmalloc (LD_PRELOAD=/t.so)"] * 2
    # 10 GFLOP over our train_on_batch step of 1 s, against the run's peak of 100 GFLOP/s.
    assert written["train_profiles"][0]["fraction_of_run_peak_train_on_batch"] == pytest.approx(0.1)
    assert "10.0% of the peak at the start of the run" in printed


def test_separate_keeps_the_fresh_process_comparison(monkeypatch, capsys):
    kinds = []

    def child(spec, env=None):
        kinds.append((spec["kind"], spec.get("workload")))
        if spec["kind"] == "platform":
            return ["0.0", "cpu", 1, 1, 1]
        if spec["kind"] == "peak":
            return 100.0
        if spec["kind"] == "official":
            return dict(implementation="official PyTorch", train_seconds=2.0, infer_seconds=1.0,
                        train_images_per_second=2.0, infer_images_per_second=8.0, train_step_peak_rss_gib=1.0,
                        peak_rss_gib=1.5)
        # Ours: one process per workload, each reporting only its own figures and flags.
        if spec["workload"] == "train":
            return dict(implementation="medt-keras", compile_seconds=3.0, peak_rss_gib=1.5, train_seconds=1.0,
                        train_images_per_second=4.0, train_flops_per_image=1e9, train_step_peak_rss_gib=0.5,
                        xla_flags={"train": "training flags"})
        return dict(implementation="medt-keras", compile_seconds=1.0, peak_rss_gib=0.7, infer_seconds=0.25,
                    infer_images_per_second=32.0, infer_flops_per_image=1e9, xla_flags={"infer": "import flags"})

    monkeypatch.setattr(worker, "run_child", child)
    monkeypatch.setattr(comparison, "compare_with_official", lambda *a, **k: pytest.fail("not the interleaved mode"))
    assert main(["--models", "gated", "--official", "/o", "--separate"]) == 0
    assert kinds == [("platform", None), ("peak", None), ("keras", "train"), ("keras", "infer"), ("official", None)]
    out = capsys.readouterr().out
    assert "2.00x" in out and "4.00x" in out  # training 2.0 / 1.0 s, inference 1.0 / 0.25 s
    merged = ours.measure_keras_per_workload(child, dict(kind="keras"))
    assert merged["compile_seconds"] == 4.0 and merged["peak_rss_gib"] == 1.5
    assert merged["xla_flags"] == {"train": "training flags", "infer": "import flags"}
    assert merged["train_seconds"] == 1.0 and merged["infer_seconds"] == 0.25
    # Interleaved runs time one variant of ours: --rematerialize both needs --separate (models).
    with pytest.raises(SystemExit) as refused:
        main(["--models", "gated", "--official", "/o", "--rematerialize", "both"])
    assert refused.value.code == 2


def test_loader_mode_times_each_loader_and_compares_with_the_training_rate(tmp_path, monkeypatch, capsys):
    import json

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

    monkeypatch.setattr(worker, "run_child", child)
    assert main(["--loader", "--loader-workers", "0", "2", "--training-json", str(training),
                           "--json", str(tmp_path / "l.json")]) == 0
    assert [(s["loader"], s["workers"]) for s in specs] == [("threads", 0), ("threads", 2), ("grain", 0), ("grain", 2)]
    assert specs[0]["config_name"] == "medt_hela" and specs[0]["batch"] == 4
    assert "100x" in capsys.readouterr().out  # 400 img/s over MedT's 4 img/s training step
    written = json.loads((tmp_path / "l.json").read_text())
    assert written["training_rates"]["images_per_second"] == {"medt": 4.0}
    assert [r["times_training_rate"] for r in written["results"]] == [{"medt": 100.0}] * 4


def test_loader_mode_refuses_a_missing_training_json_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(worker, "run_child", lambda spec: pytest.fail("nothing is measured"))
    missing = tmp_path / "none.json"
    assert main(["loader", "--training-json", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_flops_are_counted_with_the_native_kernel_turned_off():
    import keras
    from medt_keras.kernels import native_attention

    seen = []

    class Probe(keras.layers.Layer):
        def call(self, x):
            seen.append(native_attention.turned_off_reason())  # while the step is traced
            return x

    model = keras.Sequential([keras.Input((4, 4, 3)), Probe(), keras.layers.Dense(2)])
    seen.clear()  # the model's build traced it too
    x, y, x_infer = ours.random_inputs(4, 2, 3)
    assert x.shape == (2, 4, 4, 3) and y.shape == (2, 4, 4) and x_infer.shape == (3, 4, 4, 3)
    assert ours.xla_flops(ours.lower_step(model, x, y, "train")) > 0
    assert ours.xla_flops(ours.lower_step(model, x_infer, None, "infer")) > 0
    assert len(seen) == 2 and None not in seen
    assert "turned_off()" not in str(native_attention.turned_off_reason())  # only while counting


# --- the command line: subcommands, and the old flag forms mapped onto them (parsed only, nothing measured) ---

@pytest.mark.parametrize("old,subcommand,values", [
    ([], "models", {"models": ["medt", "gated"]}),
    (["--models", "medt", "gated", "--sizes", "128", "--rematerialize", "both"], "models",
     {"models": ["medt", "gated"], "rematerialize": "both"}),
    (["--suite", "models", "--models", "logo"], "models", {"models": ["logo"]}),
    (["--models", "medt", "--official", "PATH", "--separate", "--json", "o.json"], "models",
     {"official": "PATH", "json": "o.json"}),
    (["--models", "medt", "gated", "--sizes", "128", "--repeats", "2", "--rounds", "3", "--search-repeats", "1",
      "--official", "PATH", "--json", "o.json"], "compare",
     {"official": "PATH", "rounds": 3, "search_repeats": 1, "repeats": 2}),
    (["--official=PATH", "--allocators", "glibc", "--profile-models", "gated"], "compare",
     {"official": "PATH", "allocators": ["glibc"], "profile_models": ["gated"]}),
    (["--sliding-window", "--repeats", "3", "--json", "s.json", "--sliding-model", "medt", "--infer-batch", "4"],
     "sliding-window", {"repeats": 3, "json": "s.json", "model": "medt", "batch": 4}),
    (["--loader", "--loader-workers", "0", "2", "--loader-config", "gated_hela", "--loader-epochs", "2",
      "--loader-img-size", "64", "--training-json", "t.json"], "loader",
     {"workers": [0, 2], "config": "gated_hela", "epochs": 2, "img_size": 64, "training_json": "t.json"}),
    (["--suite", "accelerator", "--budget-s", "600", "--models", "gated"], "suite accelerator",
     {"budget_s": 600.0, "models": ["gated"]}),
    (["--require-accelerator"], "models", {"require_accelerator": True}),
])
def test_old_flag_forms_reach_their_subcommand(old, subcommand, values):
    from training.bench import accelerator_suite, cli, loader, model_table, sliding_window

    modules = {"models": model_table, "compare": comparison, "sliding-window": sliding_window, "loader": loader,
               "suite accelerator": accelerator_suite}
    translated = cli.translate_legacy(old)
    assert translated[:len(subcommand.split())] == subcommand.split()
    args = cli.build_parser().parse_args(translated)
    assert args.run is modules[subcommand].run
    assert {key: getattr(args, key) for key in values} == values
    # The new form is left as it is.
    assert cli.translate_legacy(translated) == translated


def test_old_compile_for_and_internal_forms_reach_their_commands(monkeypatch):
    from training import compile_for

    called = []
    monkeypatch.setattr(compile_for, "main", lambda argv: called.append(("compile-for", argv)) or 0)
    monkeypatch.setattr(worker, "main", lambda argv: called.append(("worker", argv)) or 0)
    assert main(["--compile-for", "tpu:v5e:2x2", "--config", "medt_hela", "--batch-per-chip", "8"]) == 0
    assert main(["compile-for", "tpu:v5e:2x2", "--json", "o.json"]) == 0
    assert main(["--child", '{"kind": "peak"}']) == 0 and main(["--worker", '{"kind": "keras"}']) == 0
    assert called == [("compile-for", ["tpu:v5e:2x2", "--config", "medt_hela", "--batch-per-chip", "8"]),
                      ("compile-for", ["tpu:v5e:2x2", "--json", "o.json"]),
                      ("worker", ["child", '{"kind": "peak"}']), ("worker", ["serve", '{"kind": "keras"}'])]


@pytest.mark.parametrize("argv", [["--help"], ["models", "--help"], ["compare", "--help"], ["profile", "--help"],
                                  ["sliding-window", "--help"], ["loader", "--help"], ["suite", "--help"],
                                  ["suite", "accelerator", "--help"], ["--suite", "accelerator", "--help"],
                                  ["compile-for", "--help"]])
def test_help_of_medt_bench_and_each_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: medt-bench")
    if argv == ["--help"]:
        for name in ("models", "compare", "profile", "sliding-window", "loader", "suite", "compile-for"):
            assert name in out


def test_python_m_runs_the_command_under_both_module_names():
    import subprocess
    import sys

    for module in ("training.bench", "training.benchmark"):
        run = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "sliding-window" in run.stdout, run.stderr[-2000:]
