"""``medt-bench compare``: ours against the official PyTorch code at its fastest, in interleaved runs.

For each model, size and allocator (glibc and, where ``ldconfig -p`` lists
them, tcmalloc and jemalloc, preloaded; ours under the same one) the official
code's settings (``torch.set_num_threads``, one inter-op thread,
channels-last or not, OpenMP's wait policy) are searched and the fastest per
workload kept; then each side, in a long-lived worker process compiled once
(``worker.Worker``), is timed in interleaved runs (ours, official, ours, ...)
so the machine's drift falls on both. Every ratio is printed with the
allocator and both sides' configuration. For the models of
``--profile-models`` (MedT) it then counts the training step's FLOPs,
reports them as a fraction of the measured matrix-product peak, and profiles
the step op by op (``op_profile``).
"""

import contextlib
import os
import statistics
import sys

from training.bench import ours, worker
from training.bench.allocators import ALLOCATORS, allocator_environment, installed_allocators, resolve_allocators
from training.bench.model_table import add_model_arguments, platform_and_peak
from training.bench.official import describe_official, official_builder, official_configs, official_environment
from training.bench.records import environment, header, write_json
from training.bench.tables import format_comparison_table, profile_lines
from training.bench.timing import machine_load, uptime

# The search abandons a configuration once its steps have run this many
# times as long as the fastest configuration's before it would have: on a
# loaded machine an OpenMP barrier whose partner thread is descheduled can
# make a multi-threaded PyTorch step 10x slower.
GIVE_UP_FACTOR = 3
WORKLOADS = ("train", "infer")
METHOD = ("Each side in one long-lived process per model, size and allocator, compiled once. The official "
          "code's configurations are searched first (median of --search-repeats steps after one warm-up), "
          "its fastest per workload kept; then --rounds rounds of ours, official, each timing --repeats "
          "steps after one warm-up, training then inference. A run's figure is its median step; a "
          "side's is the median of its runs. ratio = official seconds / ours (above 1: ours faster).")


def interleaved_order(sides, rounds):
    """``[(side, round), ...]``: each round runs every side once, in the given order (ours, official, ours, ...)."""
    return [(side, r) for r in range(rounds) for side in sides]


def fastest_config(search, workload):
    """The entry of ``search`` (each ``{"config", workload: {"median_seconds"}}``) fastest at ``workload``.

    Configurations whose timing was abandoned (``gave_up``: far slower than
    the best before them) are out.
    """
    timed = [entry for entry in search if workload in entry and not entry[workload].get("gave_up")]
    if not timed:
        raise ValueError(f"no configuration of the search timed {workload}")
    return min(timed, key=lambda entry: entry[workload]["median_seconds"])


def summarize_runs(runs):
    """Median over runs of each run's median step (seconds and CPU seconds), with every run kept."""
    seconds = [statistics.median(run["seconds"]) for run in runs]
    cpu = [statistics.median(run["cpu_seconds"]) for run in runs]
    return {
        "median_seconds": statistics.median(seconds),
        "median_cpu_seconds": statistics.median(cpu),
        "run_seconds": seconds,
        "run_cpu_seconds": cpu,
    }


def comparison_row(model, size, workload, allocator, ours, official, ours_config, official_config, batch):
    """One ratio with both sides' configuration; ``ours``/``official`` as ``summarize_runs`` returns them."""
    return {
        "model": model,
        "size": size,
        "workload": workload,
        "batch": batch,
        "allocator": allocator,
        "ours_config": ours_config,
        "official_config": official_config,
        "ours_seconds": ours["median_seconds"],
        "official_seconds": official["median_seconds"],
        "ours_run_seconds": ours["run_seconds"],
        "official_run_seconds": official["run_seconds"],
        "ours_images_per_second": batch / ours["median_seconds"],
        "official_images_per_second": batch / official["median_seconds"],
        "ratio": official["median_seconds"] / ours["median_seconds"],
        "ours_cpu_seconds": ours["median_cpu_seconds"],
        "official_cpu_seconds": official["median_cpu_seconds"],
        "cpu_time_ratio": official["median_cpu_seconds"] / ours["median_cpu_seconds"],
    }


def headline_rows(rows):
    """Per model, size and workload: the row where the official code was fastest (its best allocator).

    Ours is beside it, under the same allocator.
    """
    best = {}
    for row in rows:
        key = (row["model"], row["size"], row["workload"])
        if key not in best or row["official_seconds"] < best[key]["official_seconds"]:
            best[key] = row
    return list(best.values())


def _search(configs, official, search_repeats, log):
    """Each configuration timed once per workload, abandoned past ``GIVE_UP_FACTOR`` times the fastest before it."""
    search = []
    for config in configs:
        entry = {"config": config, "label": describe_official(config)}
        for workload in WORKLOADS:
            done = [e[workload]["median_seconds"] for e in search if not e[workload].get("gave_up")]
            limit = GIVE_UP_FACTOR * min(done) * (1 + search_repeats) if done else None
            try:
                timed = official(config).request(op="time", workload=workload, repeats=search_repeats,
                                                 warmup=1, config=config, give_up_after=limit)
            except RuntimeError as error:
                raise RuntimeError(f"official {entry['label']} {workload}: {error}") from None
            entry[workload] = dict(timed, median_seconds=statistics.median(timed["seconds"]),
                                   median_cpu_seconds=statistics.median(timed["cpu_seconds"]))
        log(f"  search {entry['label']:<72} train {entry['train']['median_seconds']:7.3f} s"
            f"{' (abandoned)' if entry['train'].get('gave_up') else ''}  infer "
            f"{entry['infer']['median_seconds']:7.3f} s{' (abandoned)' if entry['infer'].get('gave_up') else ''}",
            flush=True)
        search.append(entry)
    return search


def _interleaved_runs(ours, official, best, ours_configs, args, log):
    """``--rounds`` rounds of ours then the official code (in its fastest configuration), each workload in turn."""
    runs = []
    for side, index in interleaved_order(("ours", "official"), args.rounds):
        for workload in WORKLOADS:
            config = best[workload] if side == "official" else None
            timer = ours[workload] if side == "ours" else official(config)
            before = machine_load()
            timed = timer.request(op="time", workload=workload, repeats=args.repeats, warmup=1, config=config)
            after = machine_load()
            steal = (None if before["steal_seconds"] is None or after["steal_seconds"] is None
                     else after["steal_seconds"] - before["steal_seconds"])
            runs.append(dict(timed, side=side, round=index, workload=workload,
                             config=ours_configs[workload] if side == "ours" else describe_official(config),
                             load_average=after["load_average"], steal_seconds=steal))
            log(f"  round {index + 1} {side:<8} {workload:<5} median {statistics.median(timed['seconds']):.3f} s "
                f"(CPU {statistics.median(timed['cpu_seconds']):.3f} s, load {after['load_average'][0]:.1f})",
                flush=True)
    return runs


def compare_with_official(model, size, args, allocator, env, description, log=print):
    """Search the official code's fastest settings under one allocator, then time both sides interleaved.

    The search times each configuration once (``--search-repeats`` steps
    after a warm-up); one that runs past ``GIVE_UP_FACTOR`` times the
    fastest before it is abandoned. Returns the record of this (model,
    size, allocator): every configuration the search tried, every
    interleaved run, and the two comparison rows (training, inference).
    """
    configs = official_configs(args.official_threads, args.official_channels_last, args.official_interop_threads,
                               args.official_wait_policies)
    common = dict(model_name=model, size=size, batch=args.batch, infer_batch=args.infer_batch)
    record = {"model": model, "size": size, "allocator": allocator, "allocator_setting": description,
              "batch": args.batch, "infer_batch": args.infer_batch, "load_at_start": machine_load()}
    official_spec = dict(kind="official", checkout=args.official, official_builder=official_builder(model),
                         size=size, batch=args.batch, infer_batch=args.infer_batch,
                         interop_threads=configs[0]["interop_threads"])
    with contextlib.ExitStack() as stack:
        # One process per workload: each keeps its own peak memory and compiles only its program.
        ours = {workload: stack.enter_context(worker.Worker(
            dict(common, kind="keras", workload=workload, rematerialize=args.rematerialize == "on", dtype=args.dtype),
            env)) for workload in WORKLOADS}
        officials = {}  # OMP_WAIT_POLICY -> worker: the policy is read when OpenMP starts

        def official(config):
            policy = config.get("omp_wait_policy")
            if policy not in officials:
                officials[policy] = stack.enter_context(worker.Worker(official_spec,
                                                                      official_environment(env, policy)))
            return officials[policy]

        record["ours"] = {workload: timer.info for workload, timer in ours.items()}
        ours_configs = {workload: timer.info["config"] for workload, timer in ours.items()}
        compile_seconds = sum(timer.info["compile_seconds"] for timer in ours.values())
        log(f"{model} {size} {allocator}: ours compiled in {compile_seconds:.0f} s; searching "
            f"{len(configs)} official configurations", flush=True)
        record["official_search"] = search = _search(configs, official, args.search_repeats, log)
        record["official"] = {str(policy): timer.info for policy, timer in officials.items()}
        record["official_best"] = best = {workload: fastest_config(search, workload)["config"]
                                          for workload in WORKLOADS}
        record["runs"] = runs = _interleaved_runs(ours, official, best, ours_configs, args, log)
        if args.step_memory:
            record["ours_step_peak_rss_gib"] = ours["train"].request(op="memory", workload="train")["step_peak_rss_gib"]
            record["official_step_peak_rss_gib"] = official(best["train"]).request(
                op="memory", workload="train", config=best["train"])["step_peak_rss_gib"]
    record["comparison"] = [
        comparison_row(model, size, workload, description,
                       summarize_runs([r for r in runs if r["side"] == "ours" and r["workload"] == workload]),
                       summarize_runs([r for r in runs if r["side"] == "official" and r["workload"] == workload]),
                       ours_configs[workload], describe_official(best[workload]),
                       args.batch if workload == "train" else args.infer_batch)
        for workload in WORKLOADS]
    record["load_at_end"] = machine_load()
    return record


def add_arguments(parser):
    add_model_arguments(parser, rematerialize=("off", "on"))
    parser.add_argument("--official", metavar="PATH", required=True,
                        help="checkout of the official MedT repository (with PyTorch installed; lib/ is enough)")
    parser.add_argument("--allocators", nargs="+", default=["auto"], metavar="NAME",
                        help="allocators both sides run under, each pair in its own processes: auto (glibc and each "
                             "of tcmalloc, jemalloc that ldconfig -p lists) or any of " + ", ".join(ALLOCATORS))
    parser.add_argument("--official-threads", nargs="+", type=int, default=sorted({1, os.cpu_count() or 1}),
                        help="PyTorch intra-op thread counts to search (torch.set_num_threads)")
    parser.add_argument("--official-interop-threads", type=int, default=1,
                        help="PyTorch's inter-op threads (torch.set_num_interop_threads)")
    parser.add_argument("--official-layouts", nargs="+", choices=("contiguous", "channels_last"),
                        default=["contiguous", "channels_last"], help="memory formats to search")
    parser.add_argument("--official-wait-policies", nargs="+", choices=("default", "passive"),
                        default=["default", "passive"],
                        help="OpenMP wait policies (OMP_WAIT_POLICY) to search with more than one thread")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved runs per side (ours, official, ours, ...); each times --repeats steps")
    parser.add_argument("--search-repeats", type=int, default=3, help="steps timed per configuration in the search")
    parser.add_argument("--step-memory", action="store_true",
                        help="also sample both sides' resident memory over two training steps")
    parser.add_argument("--profile-models", nargs="*", type=ours.model_name, default=None,
                        help="models whose training step gets a FLOP count and an op profile "
                             "(default: medt, if measured)")
    parser.add_argument("--profile-top", type=int, default=15, help="ops listed in the profile")


def _compare_all(args, allocators, found, record):
    """Every model, size and allocator compared; returns the comparison rows."""
    rows = []
    for model in args.models:
        for size in args.sizes:
            for allocator in allocators:
                env, description = allocator_environment(allocator, found, os.environ)
                try:
                    result = compare_with_official(model, size, args, allocator, env, description)
                except RuntimeError as error:
                    print(f"{model} {size} {allocator}: {str(error).splitlines()[0]}", flush=True)
                    record["comparisons"].append(dict(model=model, size=size, allocator=allocator,
                                                      error=str(error)[-3000:]))
                    write_json(args.json, record)
                    continue
                record["comparisons"].append(result)
                rows.extend(result["comparison"])
                write_json(args.json, record)
                print("\n".join(format_comparison_table(result["comparison"])), flush=True)
    return rows


def _profile_all(args, rows, found, peak, record):
    """``--profile-models``' training steps profiled, each under the allocator where our training was fastest."""
    for model in args.profile_models:
        for size in args.sizes:
            timed = [r for r in rows if r["model"] == model and r["size"] == size and r["workload"] == "train"]
            fastest = min(timed, key=lambda r: r["ours_seconds"]) if timed else None
            allocator = fastest["allocator"].split(" ")[0] if fastest else "glibc"
            env, description = allocator_environment(allocator, found, os.environ)
            spec = dict(kind="train_profile", model_name=model, size=size, batch=args.batch, top=args.profile_top)
            try:
                result = worker.run_child(spec, env=env)
            except RuntimeError as error:
                print(f"profile {model} {size}: {str(error).splitlines()[0]}", flush=True)
                record["train_profiles"].append(dict(spec, error=str(error)[-3000:]))
                write_json(args.json, record)
                continue
            result["allocator"] = description
            if fastest:
                # The same FLOPs over the whole train_on_batch step (Adam and Keras' overhead included) of
                # the interleaved runs, against the peak measured at the start of this run: the child's
                # own peak and step time are measured together, minutes later, under other load.
                result["train_on_batch_seconds"] = fastest["ours_seconds"]
                result["run_peak_gflops"] = peak
                achieved = result["step_flops"] / fastest["ours_seconds"] / 1e9
                result["fraction_of_run_peak_train_on_batch"] = achieved / peak
            record["train_profiles"].append(result)
            write_json(args.json, record)
            print("\n".join(profile_lines(result)), flush=True)


def run(args):
    """Per model, size and allocator the official code's fastest settings searched, then both sides timed in
    interleaved runs; then the FLOP fraction of peak and a profile."""
    if args.profile_models is None:
        args.profile_models = ["medt"] if "medt" in args.models else []
    args.official_channels_last = [layout == "channels_last" for layout in args.official_layouts]
    args.official_wait_policies = [None if p == "default" else p.upper() for p in args.official_wait_policies]
    found = installed_allocators()
    try:
        allocators = resolve_allocators(args.allocators, found)
    except ValueError as error:
        print(f"medt-bench: error: {error}", file=sys.stderr)
        return 2
    peak = platform_and_peak(args)
    if peak is None:
        return 2
    record = header(
        args.command, peak_gflops=peak, environment=environment(), uptime_at_start=uptime(),
        load_at_start=machine_load(), allocators_found=found,
        official_configs=official_configs(args.official_threads, args.official_channels_last,
                                          args.official_interop_threads, args.official_wait_policies),
        method=METHOD, comparisons=[], train_profiles=[])
    rows = _compare_all(args, allocators, found, record)
    record["rows"] = rows
    record["headline"] = headline_rows(rows)
    write_json(args.json, record)
    print("\nEvery ratio (official seconds / ours; each allocator's pair interleaved in one run):")
    print("\n".join(format_comparison_table(rows)))
    print("\nThe official code at its fastest (allocator and settings), ours under the same allocator:")
    print("\n".join(format_comparison_table(record["headline"])))
    _profile_all(args, rows, found, peak, record)
    record["uptime_at_end"] = uptime()
    record["load_at_end"] = machine_load()
    write_json(args.json, record)
    return 0
