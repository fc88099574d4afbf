"""Where a step's time goes: its FLOPs against the matmul peak, and an op-by-op profile from ``jax.profiler``.

``measure_train_profile`` compiles a model's training step (or inference
batch), counts its FLOPs, times it and traces a few steps; ``profile_ops``
turns the trace's events into exclusive time per XLA op, per source layer and
per kind of op, with ``hlo_instructions`` naming each op's opcode and source.
``medt-bench profile`` runs it alone; ``medt-bench compare`` runs it after the
comparison for ``--profile-models``.
"""

import json
import os
import re
import statistics
import time

from training.bench import ours, worker
from training.bench.records import environment, header, write_json
from training.bench.tables import profile_lines
from training.bench.timing import peak_gflops, timed_steps


def hlo_instructions(hlo_text):
    """``{name: (opcode, op_name)}`` of every instruction in an HLO module's text (``compiled.as_text()``)."""
    instructions = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*)", line)
        if not match:
            continue
        name, rest = match.groups()
        if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
            depth = 0
            for i, char in enumerate(rest):
                depth += char == "("
                depth -= char == ")"
                if depth == 0:
                    rest = rest[i + 1:].lstrip()
                    break
        else:
            rest = rest.split(" ", 1)[1] if " " in rest else ""
        opcode = re.match(r"([\w\-]+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', line)
        instructions[name] = (opcode.group(1) if opcode else "", op_name.group(1) if op_name else "")
    return instructions


def source_of(op_name, depth=2):
    """The model part an XLA op came from: the first ``depth`` layer names of its ``op_name``.

    ``jit(loss_fn)/transpose(jvp(stage2_block0))/height_attention/jit(_attention)/while`` ->
    ``stage2_block0/height_attention (backward)``: JAX's transformation wrappers
    dropped, ``transpose`` (the backward pass) marked.
    """
    if not op_name:
        return "(no source)"
    parts = op_name.split("/")
    layers = []
    for part in parts[1:-1]:  # the first names the jitted function, the last the primitive
        while True:
            unwrapped = re.sub(r"^[a-z_]+\((.*)\)$", r"\1", part)
            if unwrapped == part:
                break
            part = unwrapped
        if part and not part.startswith("_"):
            layers.append(part)
    source = "/".join(layers[:depth]) or parts[-1]
    return source + (" (backward)" if "transpose(" in op_name else "")


def _op_name(event):
    """The op an event is of: ``end: NAME`` (the runtime's bookkeeping after an op) counts as NAME."""
    return event["name"][len("end: "):] if event["name"].startswith("end: ") else event["name"]


def _xla_events(events, instructions):
    """``({thread: [op events]}, {runtime event: microseconds})`` of the complete events on XLA's threads."""
    threads = {e["tid"]: e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    by_thread, runtime = {}, {}
    for e in events:
        if e.get("ph") != "X" or not threads.get(e.get("tid"), "").startswith("tf_XLA"):
            continue
        name = _op_name(e)
        if instructions and name not in instructions:
            runtime[name] = runtime.get(name, 0.0) + float(e.get("dur", 0.0))  # the runtime's own events
            continue
        if name.startswith(("ThreadpoolListener", "ThunkExecutor")):
            continue
        by_thread.setdefault(e["tid"], []).append(e)
    return by_thread, runtime


def _op_times(by_thread):
    """``(exclusive, inclusive, calls)`` per op name: exclusive is an event less the events nested in it."""
    exclusive, inclusive, calls = {}, {}, {}
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack = []  # [end, name, child time, duration]

        def close(item):
            end, name, children, duration = item
            exclusive[name] = exclusive.get(name, 0.0) + duration - children

        for e in evs:
            name, duration = _op_name(e), float(e.get("dur", 0.0))
            while stack and e["ts"] >= stack[-1][0]:
                close(stack.pop())
            if stack:
                stack[-1][2] += duration
            inclusive[name] = inclusive.get(name, 0.0) + duration
            calls[name] = calls.get(name, 0) + 1
            stack.append([e["ts"] + duration, name, 0.0, duration])
        while stack:
            close(stack.pop())
    return exclusive, inclusive, calls


def profile_ops(events, instructions=None, top=15):
    """Where an XLA CPU program's time went, from the trace events of ``jax.profiler``.

    ``events``: the Chrome/Perfetto trace events (``traceEvents``) with the
    process's thread-name metadata; only XLA's threads (``tf_XLA...``) count.
    Each op's *exclusive* time (its event less the ops nested in it, so a
    loop counts its body's ops, not itself) is summed over threads and
    repeats; ``end: NAME`` events count as NAME's; events that name no
    instruction of ``instructions`` (the runtime's own: waiting for
    completion, the executor) are kept apart. Returns the total op time, the
    ``top`` ops with their opcode and source (``instructions`` as
    ``hlo_instructions`` returns them), the loops (``while`` ops: the blocked
    attention kernel's) by inclusive time and their total, and the time per
    source layer and per kind of op (the name without its number:
    ``ynn_fusion`` are XNNPACK's products and convolutions,
    ``transpose_copy_fusion`` layout changes).
    """
    instructions = instructions or {}
    by_thread, runtime = _xla_events(events, instructions)
    exclusive, inclusive, calls = _op_times(by_thread)
    total = sum(exclusive.values())

    def describe(name, microseconds):
        opcode, op_name = instructions.get(name, ("", ""))
        return {"op": name, "opcode": opcode, "source": source_of(op_name), "op_name": op_name[-200:],
                "ms": microseconds / 1e3, "share": microseconds / total if total else float("nan"),
                "events": calls[name]}

    def shares(totals):
        return [{"name": n, "ms": t / 1e3, "share": t / total if total else float("nan")}
                for n, t in sorted(totals.items(), key=lambda item: -item[1])[:top]]

    ranked = sorted(exclusive.items(), key=lambda item: -item[1])
    loops = sorted(((n, t) for n, t in inclusive.items() if instructions.get(n, ("",))[0] == "while"
                    or (not instructions and n.startswith("while"))), key=lambda item: -item[1])
    sources, kinds = {}, {}
    for name, microseconds in exclusive.items():
        source = source_of(instructions.get(name, ("", ""))[1])
        sources[source] = sources.get(source, 0.0) + microseconds
        kind = re.sub(r"\.\d+$", "", name)  # ynn_fusion.953 -> ynn_fusion (XNNPACK), copy.4 -> copy
        kinds[kind] = kinds.get(kind, 0.0) + microseconds
    return {
        "op_ms": total / 1e3,
        "runtime_events_ms": {name: t / 1e3 for name, t in sorted(runtime.items(), key=lambda item: -item[1])[:5]},
        "top_ops": [describe(n, t) for n, t in ranked[:top]],
        "loops": [dict(describe(n, t), exclusive_ms=exclusive.get(n, 0.0) / 1e3) for n, t in loops[:top]],
        "loops_ms": sum(t for _, t in loops) / 1e3,
        "by_source": [{"source": d.pop("name"), **d} for d in shares(sources)],
        "by_kind": [{"kind": d.pop("name"), **d} for d in shares(kinds)],
    }


def trace_events(step, steps):
    """``(events, wall seconds)``: the ``jax.profiler`` trace events of ``steps`` calls of ``step``."""
    import glob
    import gzip
    import shutil
    import tempfile

    import jax

    directory = tempfile.mkdtemp(prefix="medt-bench-trace-")
    try:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            wall = time.perf_counter()
            for _ in range(steps):
                step()
            seconds = time.perf_counter() - wall
        traces = sorted(glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)) or sorted(
            glob.glob(os.path.join(directory, "**", "*.json.gz"), recursive=True))
        with gzip.open(traces[-1], "rt") as f:
            trace = json.load(f)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return (trace["traceEvents"] if isinstance(trace, dict) else trace), seconds


def measure_train_profile(model_name, size, batch, repeats=5, profile_steps=2, top=15, workload="train"):
    """FLOPs, speed against the matrix-product peak, and an op-by-op profile of one training step.

    ``workload="infer"``: the same for one inference batch (the forward
    pass in inference mode) instead.

    The step is ``ours.step_function`` (forward and backward of the loss,
    as ``measure_keras`` counts FLOPs; Adam, a negligible share, left out),
    compiled as the model runs it on this device. XLA's cost analysis counts
    a loop's body once, so on CPU, where the blocked attention kernel walks
    over blocks with ``lax.map``, its count of the step misses most of the
    attention; the FLOPs of the same model built with
    ``attention="keras_ops"`` (the same math as whole-tensor operations, no
    loops) are the step's work. Both are returned. The peak is measured in
    this process, just before.
    """
    import jax
    from medt_keras.models.registry import get_spec

    peak = peak_gflops()
    x, y, _ = ours.random_inputs(size, batch)
    whole_tensor = get_spec(model_name).build(img_size=size, attention="keras_ops")
    whole_tensor_flops = ours.xla_flops(ours.lower_step(whole_tensor, x, y, workload).compile())
    model = get_spec(model_name).build(img_size=size, attention="auto")
    arguments = ours.step_arguments(model, x, y)
    start = time.perf_counter()
    compiled = jax.jit(ours.step_function(model, workload)).lower(*arguments).compile()  # as it runs
    compile_seconds = time.perf_counter() - start

    def step():
        jax.block_until_ready(compiled(*arguments))

    step()
    timed = timed_steps(step, repeats, warmup=1)
    seconds = statistics.median(timed["seconds"])
    events, profiled_seconds = trace_events(step, profile_steps)
    profile = profile_ops(events, hlo_instructions(compiled.as_text()), top=top)
    profile.update(steps=profile_steps, wall_ms=profiled_seconds * 1e3)
    return {
        "model": model_name, "workload": workload, "size": size, "batch": batch,
        "peak_gflops": peak,
        "compile_seconds": compile_seconds,
        "step_seconds": seconds,
        "step_seconds_runs": timed["seconds"],
        "step_cpu_seconds": statistics.median(timed["cpu_seconds"]),
        "step_flops": whole_tensor_flops,
        "step_flops_as_compiled": ours.xla_flops(compiled),
        "step_gflops_per_second": whole_tensor_flops / seconds / 1e9,
        "fraction_of_peak": whole_tensor_flops / seconds / 1e9 / peak,
        "profile": profile,
        "device": str(jax.devices()[0].device_kind),
    }


def add_arguments(parser):
    from training import devices

    parser.add_argument("--models", nargs="+", default=["medt"], type=ours.model_name,
                        help="model names or aliases (medt, logo, gated, axialunet, ...)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[128])
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--workload", choices=("train", "infer"), default="train",
                        help="the training step (forward + backward) or an inference batch")
    parser.add_argument("--repeats", type=int, default=5, help="steps timed")
    parser.add_argument("--profile-steps", type=int, default=2, help="steps traced")
    parser.add_argument("--top", "--profile-top", dest="top", type=int, default=15, help="ops listed")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    devices.add_argument(parser)


def run(args):
    """``medt-bench profile``: each model and size in a fresh process (this process's allocator), printed, saved."""
    if not worker.check_platform(args.require_accelerator):
        return 2
    record = header(args.command, environment=environment(), profiles=[])
    for model in args.models:
        for size in args.sizes:
            spec = dict(kind="train_profile", model_name=model, size=size, batch=args.batch, repeats=args.repeats,
                        profile_steps=args.profile_steps, top=args.top, workload=args.workload)
            try:
                result = worker.run_child(spec)
            except RuntimeError as error:
                print(f"profile {model} {size}: {str(error).splitlines()[0]}", flush=True)
                record["profiles"].append(dict(spec, error=str(error)[-3000:]))
                write_json(args.json, record)
                continue
            result["allocator"] = os.environ.get("LD_PRELOAD") or "glibc"
            record["profiles"].append(result)
            write_json(args.json, record)
            print("\n".join(profile_lines(result)), flush=True)
    return 0
