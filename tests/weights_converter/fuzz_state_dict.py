"""A seeded fuzzer for ``weights_converter.read_state_dict``.

Starting from the shipped fixtures in all three formats (the official zip
``.pth``, the legacy ``.pth``, and ``.safetensors`` written from them), each
case applies one or more mutations: byte flips, truncation, rewritten
pickle integers (sizes, strides, offsets, element counts) with the zip
re-packed so its CRCs still hold, storage bytes changed under valid CRCs,
swapped, dropped or duplicated zip entries, edited safetensors headers. Every
outcome must be one of

* a state_dict equal, key by key and bit by bit, to what an independent
  reference decoder (the C unpickler and fancy indexing, run only on files
  the reader accepted) gives for that file;
* a ``CheckpointError``;

and each case must stay within a memory bound (``tracemalloc`` peak, numpy
included, at most the file's size plus ``--memory-bound-mb``) and a time
bound (CPU seconds of the read, ``--time-bound-s``; wall time is reported
too). Anything else is an escape.

    python -m tests.weights_converter.fuzz_state_dict --cases 20000 --seed 0 --jobs 2

prints the figure (cases, outcomes by kind, worst peak memory and time);
``--save DIR`` keeps every escaping file.
"""

import argparse
import collections
import io
import json
import os
import pickle
import pickletools
import random
import struct
import sys
import tempfile
import time
import tracemalloc
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
OFFICIAL_ZIP = os.path.join(FIXTURES, "official", "gated_img32_c3_k2_b2_s3_w0.03125_g2_l1-1-1-1.pth")
LEGACY = os.path.join(FIXTURES, "legacy_format_gated_tiny.pth")

OK_IDENTICAL, OK_CHANGED, REFUSED = "loaded, unchanged", "loaded, changed (= reference)", "CheckpointError"
ESCAPE, MISMATCH, OVER_MEMORY, OVER_TIME = "other exception", "loaded != reference", "over memory", "over time"


# Seeds ---------------------------------------------------------------------------------------------


def seed_files():
    """(name, suffix, bytes) of the files every case starts from."""
    from tests.weights_converter.torch_format import safetensors_bytes, torch_legacy_bytes, torch_zip_bytes
    from weights_converter import read_state_dict

    official = open(OFFICIAL_ZIP, "rb").read()
    legacy = open(LEGACY, "rb").read()
    tensors = read_state_dict(OFFICIAL_ZIP)
    small = dict(list(tensors.items())[:12])  # a few tensors: cheaper cases, more of them per second
    return [
        ("official-zip", ".pth", official),
        ("official-legacy", ".pth", legacy),
        ("small-zip", ".pth", torch_zip_bytes(small)),
        ("small-legacy", ".pth", torch_legacy_bytes(small)),
        ("safetensors", ".safetensors", safetensors_bytes(tensors)),
        ("small-safetensors", ".safetensors", safetensors_bytes(small)),
    ]


# Mutations -----------------------------------------------------------------------------------------

_INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"}


def _interesting(rng, value):
    value = value if isinstance(value, int) else 0
    return rng.choice([
        0, 1, -1, 2, 3, 7, 255, 256, 65535, 2**31 - 1, 2**31, -(2**31), 2**32, 2**40, 2**62, 2**63 - 1,
        2**63, -(2**63), 2**64, 10**30, value + 1, value - 1, value * 2, value // 2, -value,
        rng.randrange(0, 1 << 20), rng.randrange(-(1 << 20), 1 << 20),
    ])


def _encode_int(value):
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    encoded = pickle.encode_long(value)
    return b"\x8a" + bytes([len(encoded)]) + encoded


def rewrite_pickle_ints(rng, data, count):
    """``data`` with ``count`` of its integer opcodes replaced by interesting values."""
    try:
        ops = [(pos, arg) for op, arg, pos in pickletools.genops(data) if op.name in _INT_OPS]
    except Exception:
        return data
    if not ops:
        return data
    ends = {}
    positions = [pos for _, _, pos in pickletools.genops(data)] + [len(data)]
    for a, b in zip(positions, positions[1:]):
        ends[a] = b
    chosen = sorted(rng.sample(ops, min(count, len(ops))), reverse=True)
    for pos, arg in chosen:
        data = data[:pos] + _encode_int(_interesting(rng, arg)) + data[ends[pos]:]
    return data


def _pickle_end(blob, start):
    for _op, _arg, pos in pickletools.genops(blob[start:]):
        last = pos
    return start + last + 1


def flip_bytes(rng, blob, count, start=0, end=None):
    end = len(blob) if end is None else end
    if end <= start:
        return blob
    out = bytearray(blob)
    for _ in range(count):
        i = rng.randrange(start, end)
        out[i] = rng.choice([out[i] ^ (1 << rng.randrange(8)), rng.randrange(256), 0, 0xFF])
    return bytes(out)


def _zip_entries(blob):
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def _pack_zip(entries, compression):
    import warnings

    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w", compression=compression) as archive:
        warnings.simplefilter("ignore")  # duplicated entries are one of the mutations
        for name, data in entries:
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return out.getvalue()


def mutate_zip(rng, blob):
    entries = _zip_entries(blob)
    kind = rng.choice(["ints", "ints", "ints", "storage-bytes", "swap", "drop", "duplicate", "pickle-bytes",
                       "byteorder"])
    pkl = next(i for i, (name, _) in enumerate(entries) if name.endswith("data.pkl"))
    storages = [i for i, (name, _) in enumerate(entries) if "/data/" in name]
    if kind == "ints":
        name, data = entries[pkl]
        entries[pkl] = (name, rewrite_pickle_ints(rng, data, rng.choice([1, 1, 2, 3, 8])))
    elif kind == "pickle-bytes":
        name, data = entries[pkl]
        entries[pkl] = (name, flip_bytes(rng, data, rng.choice([1, 2, 4])))
    elif kind == "storage-bytes" and storages:
        i = rng.choice(storages)
        name, data = entries[i]
        entries[i] = (name, flip_bytes(rng, data, rng.choice([1, 4, 16])))
    elif kind == "swap":
        i, j = rng.sample(range(len(entries)), 2)
        (a, da), (b, db) = entries[i], entries[j]
        entries[i], entries[j] = (a, db), (b, da)
    elif kind == "drop":
        entries.pop(rng.randrange(len(entries)))
    elif kind == "duplicate":
        entries.append(entries[rng.randrange(len(entries))])
    elif kind == "byteorder":
        entries = [(n, rng.choice([b"big", b"", b"middle", b"little\n" * 4]) if n.endswith("byteorder") else d)
                   for n, d in entries]
    compression = rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
    return _pack_zip(entries, compression), "zip-" + kind


def mutate_legacy(rng, blob):
    # The object pickle is the fourth; the storages' sizes and bytes follow the fifth.
    starts = [0]
    for _ in range(5):
        starts.append(_pickle_end(blob, starts[-1]))
    obj_start, obj_end, tail = starts[3], starts[4], starts[5]
    kind = rng.choice(["ints", "ints", "ints", "storage-size", "storage-bytes", "pickle-bytes"])
    if kind == "ints":
        new = rewrite_pickle_ints(rng, blob[obj_start:obj_end], rng.choice([1, 1, 2, 3, 8]))
        return blob[:obj_start] + new + blob[obj_end:], "legacy-ints"
    if kind == "storage-size":
        position, out = tail, bytearray(blob)
        keys = pickle._Unpickler(io.BytesIO(blob[starts[4]:tail])).load()
        itemsizes = _legacy_itemsizes(blob[obj_start:obj_end])
        target = rng.randrange(len(keys))
        for index in range(target + 1):  # walk to the target storage's size field
            (numel,) = struct.unpack_from("<q", blob, position)
            if index == target:
                struct.pack_into("<q", out, position, max(-(2**63), min(2**63 - 1, _interesting(rng, numel))))
            position += 8 + numel * itemsizes[keys[index]]
        return bytes(out), "legacy-storage-size"
    if kind == "storage-bytes":
        return flip_bytes(rng, blob, rng.choice([1, 4, 16]), tail), "legacy-storage-bytes"
    return flip_bytes(rng, blob, rng.choice([1, 2, 4]), obj_start, obj_end), "legacy-pickle-bytes"


_ITEMSIZES = {"FloatStorage": 4, "DoubleStorage": 8, "LongStorage": 8, "IntStorage": 4, "HalfStorage": 2}


def _legacy_itemsizes(object_pickle):
    """Storage key -> item size, from an unmutated legacy object pickle."""
    sizes = {}

    class Recorder(pickle._Unpickler):  # not the C one: see _ReferenceUnpickler
        def find_class(self, module, name):
            if name == "OrderedDict":
                return collections.OrderedDict
            return name if name in _ITEMSIZES else (lambda *args: None)

        def persistent_load(self, pid):
            sizes[pid[2]] = _ITEMSIZES[pid[1]]

    Recorder(io.BytesIO(object_pickle)).load()
    return sizes


def mutate_safetensors(rng, blob):
    (length,) = struct.unpack_from("<Q", blob)
    header = json.loads(blob[8:8 + length])
    data = blob[8 + length:]
    kind = rng.choice(["offsets", "offsets", "shape", "dtype", "entry", "length", "data-bytes", "header-bytes"])
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    if kind == "offsets":
        offsets = header[key]["data_offsets"]
        i = rng.randrange(2)
        offsets[i] = rng.choice([_interesting(rng, offsets[i]), offsets[1 - i], float(offsets[i]), None, "0"])
    elif kind == "shape":
        shape = header[key]["shape"]
        if shape and rng.random() < 0.7:
            i = rng.randrange(len(shape))
            shape[i] = rng.choice([_interesting(rng, shape[i]), float(shape[i]), True, None])
        else:
            header[key]["shape"] = rng.choice([[], [0], shape + [1], [1] * 40, "4", None])
    elif kind == "dtype":
        header[key]["dtype"] = rng.choice(["F64", "F16", "BF16", "I8", "BOOL", "U8", "F8", "f32", 4, None])
    elif kind == "entry":
        header[key] = rng.choice([None, [], 1, "x", {}, {"dtype": "F32"}])
    elif kind == "data-bytes":
        data = flip_bytes(rng, data, rng.choice([1, 8]))
    encoded = json.dumps(header).encode()
    if kind == "header-bytes":
        encoded = flip_bytes(rng, encoded, rng.choice([1, 2, 4]))
    length = len(encoded)
    if kind == "length":
        length = rng.choice([0, 1, length - 1, length + 1, 2**32, 2**60, 2**64 - 1, rng.randrange(len(encoded) + len(data) + 9)])
    return struct.pack("<Q", length % 2**64) + encoded + data, "safetensors-" + kind


def mutate(rng, name, blob):
    """One mutated file from a seed, and the mutation's name."""
    roll = rng.random()
    if roll < 0.12:
        return flip_bytes(rng, blob, rng.choice([1, 2, 8, 32])), "flip-bytes"
    if roll < 0.2:
        return blob[: rng.randrange(len(blob))], "truncate"
    if "zip" in name:
        return mutate_zip(rng, blob)
    if "legacy" in name:
        return mutate_legacy(rng, blob)
    return mutate_safetensors(rng, blob)


# The reference decoder ------------------------------------------------------------------------------


class _Rebuild:
    def __init__(self, storage, offset, size, stride, *rest):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


_REFERENCE_DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8",
                     "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
                     "BoolStorage": "?"}


class _ReferenceUnpickler(pickle._Unpickler):
    # The pure-Python unpickler: the C one sizes its memo table by the largest
    # memo index in the file, and a flipped byte there costs it gigabytes
    # (the fuzzer found this in its own first reference decoder).

    def find_class(self, module, name):
        if name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _Rebuild
        if name.startswith("_rebuild_parameter"):
            return lambda data, *rest: data
        if name == "OrderedDict":
            return collections.OrderedDict
        return name  # a storage type, by name

    def persistent_load(self, pid):
        return pid


def _gather(storage, offset, size, stride):
    index = np.full(size, offset, dtype=np.int64)
    for axis, (n, s) in enumerate(zip(size, stride)):
        shape = [1] * len(size)
        shape[axis] = n
        index = index + (np.arange(n, dtype=np.int64) * s).reshape(shape)
    return storage[index]


def _unwrap(obj):
    while not all(isinstance(v, _Rebuild) for v in obj.values()):
        obj = next(obj[k] for k in ("state_dict", "model_state_dict", "model") if isinstance(obj.get(k), dict))
    return obj


def reference_read(path):
    """A second decoder, for files ``read_state_dict`` accepted: same meaning, different code."""
    blob = open(path, "rb").read()
    tensors = collections.OrderedDict()
    if path.endswith(".safetensors"):
        (length,) = struct.unpack_from("<Q", blob)
        header = json.loads(blob[8:8 + length])
        names = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                 "U8": "u1", "BOOL": "?"}
        for key, info in header.items():
            if key != "__metadata__":
                begin, end = info["data_offsets"]
                raw = blob[8 + length + begin:8 + length + end]
                tensors[key] = np.frombuffer(raw, dtype=names[info["dtype"]]).reshape(info["shape"])
    else:
        storages = {}
        if blob[:2] == b"PK":
            with zipfile.ZipFile(io.BytesIO(blob)) as archive:
                pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                prefix = pkl[: -len("data.pkl")]
                order = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in archive.namelist() else "little"
                obj = _unwrap(_ReferenceUnpickler(io.BytesIO(archive.read(pkl))).load())
                for record in obj.values():
                    pid = record.storage
                    dtype = np.dtype(_REFERENCE_DTYPES[pid[1]])
                    dtype = dtype.newbyteorder("<" if order.strip() == "little" else ">")
                    storages[pid[2]] = np.frombuffer(archive.read(f"{prefix}data/{pid[2]}"), dtype=dtype)
        else:
            stream = io.BytesIO(blob)
            for _ in range(3):
                pickle._Unpickler(stream).load()
            obj = _unwrap(_ReferenceUnpickler(stream).load())
            keys = pickle._Unpickler(stream).load()
            dtypes = {r.storage[2]: np.dtype(_REFERENCE_DTYPES[r.storage[1]]) for r in obj.values()}
            for key in keys:
                (numel,) = struct.unpack("<q", stream.read(8))
                storages[key] = np.frombuffer(stream.read(numel * dtypes[key].itemsize), dtype=dtypes[key])
        for key, record in obj.items():
            pid = record.storage
            storage = storages[pid[2]]
            if len(pid) > 5 and pid[5] is not None:
                storage = storage[pid[5][1]:pid[5][1] + pid[5][2]]
            tensors[key] = _gather(storage, record.offset, record.size, record.stride)
    return collections.OrderedDict(
        (k[len("module."):] if k.startswith("module.") else k, v.astype(v.dtype.newbyteorder("="))) for k, v in tensors.items()
    )


def same_state_dicts(a, b):
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a
    )


# The run --------------------------------------------------------------------------------------------


def run(cases, seed, memory_bound_mb=64, time_bound_s=2.0, save=None, progress=False, jobs=1):
    """Runs cases ``0..cases-1`` of ``seed``; returns a summary dict (see ``format_summary``).

    Case ``i`` draws its seed file and mutations from ``(seed, i)`` alone, so
    the figure does not depend on ``jobs`` (processes sharing the cases).
    """
    if jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            parts = pool.starmap(_run_cases, [(range(j, cases, jobs), seed, memory_bound_mb, time_bound_s, save,
                                               progress) for j in range(jobs)])
    else:
        parts = [_run_cases(range(cases), seed, memory_bound_mb, time_bound_s, save, progress)]
    summary = parts[0]
    for part in parts[1:]:
        for kind, count in part["outcomes"].items():
            summary["outcomes"][kind] = summary["outcomes"].get(kind, 0) + count
        for how, counts in part["by_mutation"].items():
            mine = summary["by_mutation"].setdefault(how, {})
            for kind, count in counts.items():
                mine[kind] = mine.get(kind, 0) + count
        for worst, where in (("worst_memory_bytes", "worst_memory_case"), ("worst_seconds", "worst_time_case")):
            if part[worst] > summary[worst]:
                summary[worst], summary[where] = part[worst], part[where]
        summary["worst_wall_seconds"] = max(summary["worst_wall_seconds"], part["worst_wall_seconds"])
        summary["escapes"] += part["escapes"]
        summary["seconds"] = max(summary["seconds"], part["seconds"])
    summary["cases"] = cases
    return summary


def _run_cases(case_numbers, seed, memory_bound_mb, time_bound_s, save, progress):
    from weights_converter import CheckpointError, read_state_dict

    seeds = seed_files()
    originals = {}
    outcomes, by_mutation = collections.Counter(), collections.defaultdict(collections.Counter)
    escapes = []
    worst_memory = (0, None)
    worst_time = (0.0, None)
    worst_wall = 0.0
    start_all = time.perf_counter()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as scratch:
        for name, suffix, blob in seeds:
            path = os.path.join(scratch, name + suffix)
            open(path, "wb").write(blob)
            originals[name] = read_state_dict(path)
        for case in case_numbers:
            rng = random.Random(f"{seed}-{case}")  # each case reproducible on its own
            name, suffix, blob = rng.choice(seeds)
            mutated, how = mutate(rng, name, blob)
            if rng.random() < 0.1:  # now and then, flipped bytes on top of the first mutation
                mutated, how = flip_bytes(rng, mutated, rng.choice([1, 2, 8])), how + "+flip-bytes"
            path = os.path.join(scratch, f"case{suffix}")
            with open(path, "wb") as handle:
                handle.write(mutated)
            tracemalloc.start()
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            # The reading thread's CPU time: other threads of the process may be busy.
            began, began_cpu = time.perf_counter(), time.thread_time()
            error = result = None
            try:
                result = read_state_dict(path)
            except CheckpointError as exc:
                outcome = REFUSED
                if "exhausted" in str(exc):  # a MemoryError (under RLIMIT_AS) or RecursionError inside the reader
                    outcome, error = OVER_MEMORY, str(exc)[-200:]
            except BaseException as exc:  # noqa: BLE001 - anything else is what we are looking for
                if isinstance(exc, KeyboardInterrupt):
                    raise
                outcome, error = ESCAPE, f"{type(exc).__name__}: {str(exc)[:200]}"
            seconds = time.perf_counter() - began
            cpu_seconds = time.thread_time() - began_cpu
            peak = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.stop()
            if result is not None:
                try:
                    reference = reference_read(path)
                except Exception as exc:  # noqa: BLE001
                    reference, error = None, f"reference decoder failed: {type(exc).__name__}: {exc}"[:300]
                if reference is not None and same_state_dicts(result, reference):
                    outcome = OK_IDENTICAL if same_state_dicts(result, originals[name]) else OK_CHANGED
                else:
                    outcome = MISMATCH
                result = reference = None
            if outcome not in (ESCAPE, MISMATCH, OVER_MEMORY):
                if peak > len(mutated) + memory_bound_mb * 2**20:
                    outcome, error = OVER_MEMORY, f"peak {peak} bytes for a file of {len(mutated)}"
                elif cpu_seconds > time_bound_s:
                    outcome, error = OVER_TIME, f"{cpu_seconds:.2f} s of CPU"
            outcomes[outcome] += 1
            by_mutation[how.split("+")[0]][outcome] += 1
            if peak > worst_memory[0]:
                worst_memory = (peak, f"case {case} ({name}, {how}, {len(mutated)} bytes)")
            if cpu_seconds > worst_time[0]:
                worst_time = (cpu_seconds, f"case {case} ({name}, {how})")
            worst_wall = max(worst_wall, seconds)
            if outcome in (ESCAPE, MISMATCH, OVER_MEMORY, OVER_TIME):
                escapes.append(dict(case=case, seed=name, mutation=how, outcome=outcome, detail=error))
                if save:
                    os.makedirs(save, exist_ok=True)
                    with open(os.path.join(save, f"case{case}-{name}-{how}{suffix}"), "wb") as handle:
                        handle.write(mutated)
            if progress and sum(outcomes.values()) % 1000 == 0:
                print(f"  [{case_numbers[0]}::{case_numbers.step if isinstance(case_numbers, range) else 1}] "
                      f"{sum(outcomes.values())} cases, {dict(outcomes)}, worst {worst_memory[0] / 2**20:.2f} MiB "
                      f"{worst_time[0] * 1000:.0f} ms CPU", file=sys.stderr, flush=True)
    return dict(
        cases=len(case_numbers), seed=seed, outcomes=dict(outcomes), by_mutation={k: dict(v) for k, v in by_mutation.items()},
        worst_memory_bytes=worst_memory[0], worst_memory_case=worst_memory[1], worst_seconds=worst_time[0],
        worst_time_case=worst_time[1], worst_wall_seconds=worst_wall, escapes=escapes, seconds=time.perf_counter() - start_all,
        memory_bound_mb=memory_bound_mb, time_bound_s=time_bound_s,
    )


def format_summary(summary):
    lines = [f"{summary['cases']} cases, seed {summary['seed']}, {summary['seconds']:.0f} s"]
    kinds = [OK_IDENTICAL, OK_CHANGED, REFUSED, ESCAPE, MISMATCH, OVER_MEMORY, OVER_TIME]
    for kind in kinds:
        lines.append(f"  {kind:<32} {summary['outcomes'].get(kind, 0):>7}")
    lines.append(f"  worst peak memory above the file   {summary['worst_memory_bytes'] / 2**20:.2f} MiB "
                 f"(bound: file size + {summary['memory_bound_mb']} MiB)  [{summary['worst_memory_case']}]")
    lines.append(f"  worst CPU time                     {summary['worst_seconds'] * 1000:.0f} ms "
                 f"(bound: {summary['time_bound_s']} s)  [{summary['worst_time_case']}]")
    lines.append(f"  worst wall time                    {summary['worst_wall_seconds'] * 1000:.0f} ms "
                 "(on a shared machine: includes time waiting for a core)")
    lines.append("  by mutation (" + ", ".join(f"{i}: {k}" for i, k in enumerate(kinds[:3])) + "):")
    for how, counts in sorted(summary["by_mutation"].items()):
        lines.append(f"    {how:<26}" + "".join(f"{counts.get(k, 0):>7}" for k in kinds[:3])
                     + ("  escapes: " + str({k: v for k, v in counts.items() if k not in kinds[:3]})
                        if set(counts) - set(kinds[:3]) else ""))
    for escape in summary["escapes"][:20]:
        lines.append(f"  ESCAPE {escape}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-bound-mb", type=float, default=64)
    parser.add_argument("--time-bound-s", type=float, default=2.0)
    parser.add_argument("--save", help="folder for escaping files")
    parser.add_argument("--jobs", type=int, default=1, help="processes sharing the cases (same figure)")
    parser.add_argument("--address-space-gb", type=float, default=8,
                        help="RLIMIT_AS per process: a runaway allocation is a MemoryError, not an OOM kill")
    args = parser.parse_args(argv)
    import resource

    limit = int(args.address_space_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    summary = run(args.cases, args.seed, args.memory_bound_mb, args.time_bound_s, args.save, progress=True,
                  jobs=args.jobs)
    print(format_summary(summary))
    return 1 if summary["escapes"] else 0


if __name__ == "__main__":
    sys.exit(main())
