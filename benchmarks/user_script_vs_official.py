"""The plain user script (``benchmarks/user_script.py``) against the official PyTorch code at its fastest.

Each round runs, one after the other (so the machine's drift falls on both):
  * ours: a FRESH ``python benchmarks/user_script.py`` process (build, compile,
    ``train_on_batch`` at batch 4, ``predict_on_batch`` at batch 8, ``fit`` on a
    PyDataset), exactly as a user would start it;
  * official: the same two workloads in the long-lived official worker that
    ``medt-bench compare`` uses (``training.bench.worker``), in a given PyTorch
    configuration. The official side has no ``fit``: our fit step is compared
    with its bare training step (its own training loop would add a DataLoader).
Both sides run under the same allocator (preloaded as ``medt-bench`` does).

The official configuration defaults to the one ``medt-bench compare``
recorded as fastest for the model in ``benchmarks/cpu-2core-128-official-best-native-kernel.json``
(allocator, then per workload threads / layout / OpenMP wait policy); each
``--allocator`` / ``--official-*`` option overrides it, for both workloads.
Without a record: tcmalloc, 2 threads, 1 inter-op thread, contiguous.

The table gives per workload ours (median over rounds of each round's median
step), the official code's (the same), and official / ours (above 1: ours faster).

Full measurement (MedT at 128, about 15-20 minutes on 2 cores):
  python benchmarks/user_script_vs_official.py --official PATH --json benchmarks/cpu-2core-128-user-script.json
Quick check: ``--model gated --size 64 --rounds 1 --steps 2 --fit-steps 2`` (MedT needs a multiple of 128).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

from training.bench.allocators import ALLOCATORS, allocator_environment, installed_allocators, resolve_allocators
from training.bench.official import describe_official, official_builder, official_environment
from training.bench.timing import machine_load, uptime
from training.bench.worker import Worker

HERE = os.path.dirname(os.path.abspath(__file__))
USER_SCRIPT = os.path.join(HERE, "user_script.py")
RECORD = os.path.join(HERE, "cpu-2core-128-official-best-native-kernel.json")
TRAIN_BATCH, INFER_BATCH, OFFICIAL_WARMUP = 4, 8, 2  # as the user script (its warm-up is 2 steps too)
FALLBACK_CONFIG = {"threads": 2, "interop_threads": 1, "channels_last": False, "omp_wait_policy": None}
# Our workload (a key of the user script's JSON) -> the official worker's workload it is compared with.
WORKLOADS = {"train_on_batch": "train", "predict_on_batch": "infer", "fit": "train"}


def recorded_best(path, model, size, allocator=None):
    """``(allocator, {"train": config, "infer": config}, size)`` that ``medt-bench compare`` found fastest, or None.

    The allocator is the one of the record's headline (the official code at its
    fastest, training row) unless given; the configurations are the search's
    best under that allocator, at ``size`` if the record has it.
    """
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    compared = [c for c in record.get("comparisons", []) if c.get("model") == model and "official_best" in c]
    compared.sort(key=lambda c: c["size"] != size)  # this size first, else whatever size it has
    if allocator is None:
        headline = [r for r in record.get("headline", []) if r["model"] == model and r["workload"] == "train"]
        headline.sort(key=lambda r: r["size"] != size)
        if not headline:
            return None
        allocator = headline[0]["allocator"].split(" ")[0]
    for comparison in compared:
        if comparison["allocator"] == allocator:
            return allocator, comparison["official_best"], comparison["size"]
    return None


def official_settings(args):
    """``(allocator, {"train": config, "infer": config}, source)`` from the record and the options."""
    found = recorded_best(args.record, args.model, args.size, args.allocator)
    if found is None:
        allocator = args.allocator or "tcmalloc"
        configs, source = {w: dict(FALLBACK_CONFIG) for w in ("train", "infer")}, "defaults"
    else:
        allocator, configs, size = found
        configs = {w: dict(c) for w, c in configs.items()}
        source = f"{os.path.relpath(args.record)}, size {size}"
    for config in configs.values():
        if args.official_threads is not None:
            config["threads"] = args.official_threads
        if args.official_layout is not None:
            config["channels_last"] = args.official_layout == "channels_last"
        if args.official_wait_policy is not None:
            config["omp_wait_policy"] = None if args.official_wait_policy == "default" else "PASSIVE"
        if config["threads"] == 1:
            config["omp_wait_policy"] = None  # as medt-bench: the policy only matters with 2+ threads
    return allocator, configs, source


def run_user_script(args, env, as_medt_train=False):
    command = [sys.executable, USER_SCRIPT, "--model", args.model, "--size", str(args.size),
               "--steps", str(args.steps), "--fit-steps", str(args.fit_steps)]
    command += ["--skip-fit"] if args.skip_fit else []
    command += ["--as-medt-train"] if as_medt_train else []
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", metavar="PATH", required=True, help="checkout of the official MedT code")
    parser.add_argument("--model", default="medt")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per workload and round, both sides")
    parser.add_argument("--fit-steps", type=int, default=8, help="steps of the user script's timed fit epoch")
    parser.add_argument("--skip-fit", action="store_true")
    parser.add_argument("--with-medt-train", action="store_true",
                        help="also time, each round, the training step compiled as medt-train compiles it")
    parser.add_argument("--allocator", choices=ALLOCATORS,
                        help="both sides' allocator (default: the record's, else tcmalloc)")
    parser.add_argument("--official-threads", type=int, help="torch.set_num_threads (default: the record's, else 2)")
    parser.add_argument("--official-layout", choices=("contiguous", "channels_last"),
                        help="the official model's memory format (default: the record's per workload, else contiguous)")
    parser.add_argument("--official-wait-policy", choices=("default", "passive"), help="OMP_WAIT_POLICY")
    parser.add_argument("--record", default=RECORD, help="medt-bench compare JSON to take the defaults from")
    parser.add_argument("--json", metavar="FILE", help="write every number here")
    return parser


def run_rounds(args, record, configs, env):
    """``--rounds`` rounds of ours (a fresh user script), then the official worker; every run into ``record``."""
    spec = dict(kind="official", checkout=args.official, official_builder=official_builder(args.model),
                size=args.size, batch=TRAIN_BATCH, infer_batch=INFER_BATCH,
                interop_threads=configs["train"]["interop_threads"])
    workers = {}  # OMP_WAIT_POLICY -> worker: OpenMP reads the policy once, when it starts
    try:
        for policy in dict.fromkeys(c["omp_wait_policy"] for c in configs.values()):
            workers[policy] = Worker(spec, official_environment(env, policy))
        record["official_worker"] = {str(p): w.info for p, w in workers.items()}
        for index in range(args.rounds):
            # Ours first, then the official code, in every round: each pair shares the machine's state.
            before = machine_load()
            ours = run_user_script(args, env)
            record["runs"].append(dict(side="ours", round=index, result=ours, load_before=before,
                                       load_after=machine_load()))
            print(f"round {index + 1} ours:     " + "  ".join(
                f"{name} {ours[name]['median']:.3f} s" for name in WORKLOADS if name in ours), flush=True)
            if args.with_medt_train:
                before = machine_load()
                as_train = run_user_script(args, env, as_medt_train=True)
                record["runs"].append(dict(side="medt-train", round=index, result=as_train, load_before=before,
                                           load_after=machine_load()))
                print(f"round {index + 1} as medt-train: train_on_batch {as_train['train_on_batch']['median']:.3f} s",
                      flush=True)
            for workload, config in configs.items():
                before = machine_load()
                timed = workers[config["omp_wait_policy"]].request(
                    op="time", workload=workload, repeats=args.steps, warmup=OFFICIAL_WARMUP, config=config)
                record["runs"].append(dict(side="official", round=index, workload=workload, result=timed,
                                           load_before=before, load_after=machine_load()))
                print(f"round {index + 1} official: {workload} {statistics.median(timed['seconds']):.3f} s", flush=True)
    finally:
        for worker in workers.values():
            worker.close()


def summarize(record):
    """Per workload, ours and the official code's median over rounds and their ratio (``record["rows"]``)."""
    rows = []
    for name, workload in WORKLOADS.items():
        mine = [r["result"][name] for r in record["runs"] if r["side"] == "ours" and name in r["result"]]
        theirs = [r["result"]["seconds"] for r in record["runs"]
                  if r["side"] == "official" and r["workload"] == workload]
        if not mine:
            continue
        ours_s = statistics.median(m["median"] for m in mine)
        official_s = statistics.median(statistics.median(s) for s in theirs)
        rows.append({"workload": name, "official_workload": workload, "ours_seconds": ours_s,
                     "ours_round_seconds": [m["median"] for m in mine], "ours_fastest": min(m["fastest"] for m in mine),
                     "official_seconds": official_s, "official_round_seconds": [statistics.median(s) for s in theirs],
                     "official_fastest": min(min(s) for s in theirs), "ratio": official_s / ours_s})
    as_train = [r["result"]["train_on_batch"]["median"] for r in record["runs"] if r["side"] == "medt-train"]
    if as_train:
        plain = next(row["ours_seconds"] for row in rows if row["workload"] == "train_on_batch")
        record["medt_train_step"] = dict(seconds=statistics.median(as_train), round_seconds=as_train,
                                         user_over_medt_train=plain / statistics.median(as_train))
    ours = [r["result"] for r in record["runs"] if r["side"] == "ours"][-1]
    record.update(rows=rows, load_at_end=machine_load(), uptime_at_end=uptime(),
                  versions={"ours": {k: ours.get(k) for k in ("keras", "jax", "backend", "device")},
                            "official": next(iter(record["official_worker"].values()))["implementation"]})


def print_summary(record):
    print(f"\n{'workload':<17} {'ours s':>8} {'fastest':>8} {'official s':>10} {'fastest':>8} {'official/ours':>13}")
    for row in record["rows"]:
        print(f"{row['workload']:<17} {row['ours_seconds']:>8.3f} {row['ours_fastest']:>8.3f} "
              f"{row['official_seconds']:>10.3f} {row['official_fastest']:>8.3f} {row['ratio']:>12.2f}x")
    print("(seconds per step: median over rounds of each round's median; fit is compared with the official "
          "training step)")
    if "medt_train_step" in record:
        step = record["medt_train_step"]
        print(f"training step compiled as medt-train: {step['seconds']:.3f} s; the user's / medt-train's: "
              f"{step['user_over_medt_train']:.3f}")
    loads = [r["load_after"]["load_average"][0] for r in record["runs"] if r["load_after"]["load_average"]]
    steal = [record[k]["steal_seconds"] for k in ("load_at_start", "load_at_end")]
    print(f"machine load (1 min) {min(loads):.1f}-{max(loads):.1f} over the runs"
          + (f", steal {steal[1] - steal[0]:.1f} s" if None not in steal else "") + f"; {record['uptime_at_end']}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    allocator, configs, source = official_settings(args)
    found = installed_allocators()
    resolve_allocators([allocator], found)  # raises if the allocator's library is not installed
    env, allocator_setting = allocator_environment(allocator, found, os.environ)
    record = {
        "command": " ".join([os.path.relpath(__file__)] + sys.argv[1:]), "machine": platform.platform(),
        "cpus": os.cpu_count(), "model": args.model, "size": args.size, "train_batch": TRAIN_BATCH,
        "infer_batch": INFER_BATCH, "steps": args.steps, "fit_steps": args.fit_steps, "rounds": args.rounds,
        "allocator": allocator_setting, "official_configs": configs, "official_configs_from": source,
        "official_labels": {w: describe_official(c) for w, c in configs.items()},
        "uptime_at_start": uptime(), "load_at_start": machine_load(), "runs": [],
    }
    print(f"{args.model} {args.size}: allocator {allocator_setting}; official (from {source}): "
          + "; ".join(f"{w} {label}" for w, label in record["official_labels"].items()), flush=True)
    run_rounds(args, record, configs, env)
    summarize(record)
    print_summary(record)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
