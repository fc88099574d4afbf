"""Where a compiled program's memory traffic goes, read from its optimised HLO text.

XLA's cost analysis gives one number for a program's bytes accessed. This
module splits an estimate of it by instruction: every instruction that
runs between memory (a fusion, a convolution, a copy, a collective; not the
instructions inside a fusion, which stay on chip) reads its operands and
writes its result, each counted at its size in memory. On TPUs that size
includes the padding of the array's tiled layout: ``f32[8,64,64,16]{...:T(8,128)}``
is stored in tiles of 8 x 128 over its two most minor dimensions, so a
minor dimension of 16 takes 128 lanes (8 times its bytes). The breakdown
reports both sizes, so padding shows as the gap between them.

It is an estimate: loops are counted once (as XLA's cost analysis counts
them), an in-place update is counted as a whole read and write, and
operands a fusion reads only in part are counted whole. Its total is shown
beside the compiler's own.
"""

import re

ITEM_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
              "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
              "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(ITEM_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+) = (?P<shape>.*?) (?P<op>[a-z][\w\-]*)\((?P<rest>.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
# Instructions that move no data of their own (views, bookkeeping) or whose bodies are counted instead.
_NO_TRAFFIC = {"parameter", "tuple", "get-tuple-element", "constant", "bitcast", "after-all", "partition-id",
               "replica-id", "while", "conditional", "call", "add-dependency", "opt-barrier", "domain"}


def array_bytes(dtype, dims, layout=None, padded=True):
    """Bytes of one array; with ``padded``, as stored in its layout's first tile (``T(8,128)``)."""
    sizes = [int(d) for d in dims.split(",") if d] if isinstance(dims, str) else list(dims)
    if padded and layout:
        minor_to_major = re.match(r"\{([\d,]*)", layout)
        tile = re.search(r"T\(([\d,]+)\)", layout)
        if minor_to_major and tile and minor_to_major.group(1):
            order = [int(d) for d in minor_to_major.group(1).split(",")]
            tile_sizes = [int(t) for t in tile.group(1).split(",")]
            # The tile covers the most minor dimensions: its last entry the most minor one.
            for dimension, step in zip(order, reversed(tile_sizes)):
                sizes[dimension] = -(-sizes[dimension] // step) * step
    count = 1
    for size in sizes:
        count *= size
    return count * ITEM_BYTES[dtype]


def _in_hbm(layout):
    # A layout's memory space S(n), n >= 1, is on chip (a TPU's VMEM, SMEM, ...); none is device memory.
    space = re.search(r"S\((\d+)\)", layout or "")
    return not space or space.group(1) == "0"


def _async_start_traffic(arrays):
    """An asynchronous copy or slice: the moved array once per end of it in device memory.

    Its result holds the source (echoed), the destination and a context
    scalar; the destination is the smaller of the two arrays (a slice) or
    equal (a copy), and it is read at one end and written at the other.
    Returns ``(device-memory bytes, plain bytes of the same, on-chip bytes)``.
    """
    arrays = sorted((a for a in arrays if a[1]), key=lambda a: array_bytes(*a, padded=False))
    if len(arrays) < 2:
        return 0, 0, 0
    destination, source = arrays[0], arrays[-1]
    ends = int(_in_hbm(source[2])) + int(_in_hbm(destination[2]))
    moved, plain = array_bytes(*destination), array_bytes(*destination, padded=False)
    return moved * ends, plain * ends, moved * (2 - ends)


def _traffic(op, shape, operands, shapes):
    """``(device-memory bytes, plain bytes of the same, on-chip bytes)`` an instruction reads and writes."""
    arrays = _ARRAY.findall(shape)
    if op.endswith("-start") and op not in ("all-reduce-start", "all-gather-start", "collective-permute-start"):
        return _async_start_traffic(arrays)
    # Newer XLA prints only the operands' names; older prints their shapes too.
    if _ARRAY.search(operands):
        arrays += _ARRAY.findall(operands)
    else:
        for name in re.findall(r"%([\w.\-]+)", operands):
            arrays += _ARRAY.findall(shapes.get(name, ""))
    in_hbm = [a for a in arrays if _in_hbm(a[2])]
    return (sum(array_bytes(*a) for a in in_hbm), sum(array_bytes(*a, padded=False) for a in in_hbm),
            sum(array_bytes(*a) for a in arrays if not _in_hbm(a[2])))


def _operands(rest):
    """The operand list of an instruction's text after its opening parenthesis."""
    depth = 1
    for index, character in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(character, 0)
        if depth == 0:
            return rest[:index], rest[index + 1:]
    return rest, ""


def _fused_computations(lines):
    """Names of computations whose instructions never touch memory on their own: fusion bodies, reducers."""
    called = set()
    for line in lines:
        for key in ("calls", "to_apply"):
            for match in re.finditer(rf"\b{key}=%?([\w.\-]+)", line):
                if key == "to_apply" or " fusion(" in line:
                    called.add(match.group(1))
    return called


def _source(attributes):
    """The instruction's ``op_name``, shortened to what names the model's code (layers and primitive)."""
    match = re.search(r'op_name="([^"]*)"', attributes)
    if not match:
        return ""
    parts = [p for p in match.group(1).split("/") if p and not p.startswith(("jit(", "jvp(", "pjit"))]
    return "/".join(parts[-4:])


def instructions(hlo_text):
    """One dict per instruction that moves data.

    ``bytes``: what it reads and writes in device memory, at the padded size
    of each array's layout; ``unpadded_bytes``: the same at the arrays' plain
    sizes; ``on_chip_bytes``: what it reads and writes in on-chip memory
    spaces (``S(1)``: a TPU's VMEM), not counted in ``bytes``. Also ``name``,
    ``op``, ``kind`` (of a fusion), ``shape`` and ``source`` (``op_name``).
    """
    lines = hlo_text.splitlines()
    fused = _fused_computations(lines)
    parsed, shapes, computation = [], {}, None
    for line in lines:
        header = _COMPUTATION.match(line)
        if header and " = " not in line.split("{")[0]:
            computation = header.group("name")
            continue
        match = _INSTRUCTION.match(line)
        if match:
            shapes[match.group("name")] = match.group("shape")
            if computation not in fused:
                parsed.append(match)
    rows = []
    for match in parsed:
        op = match.group("op")
        if op in _NO_TRAFFIC or op.endswith("-done"):
            continue
        operands, attributes = _operands(match.group("rest"))
        kind = re.search(r"kind=(\w+)", attributes)
        hbm, plain, on_chip = _traffic(op, match.group("shape"), operands, shapes)
        rows.append(dict(
            name=match.group("name"), op=op, kind=kind.group(1) if kind else "", bytes=hbm,
            unpadded_bytes=plain, on_chip_bytes=on_chip, shape=match.group("shape"), source=_source(attributes),
        ))
    return rows


def breakdown(hlo_text, top=20):
    """The traffic estimate of a program: totals, by operation and by source, and the ``top`` instructions."""
    rows = instructions(hlo_text)
    total = sum(r["bytes"] for r in rows)

    def grouped(key):
        groups = {}
        for row in rows:
            group = groups.setdefault(key(row), dict(bytes=0, unpadded_bytes=0, count=0))
            group["bytes"] += row["bytes"]
            group["unpadded_bytes"] += row["unpadded_bytes"]
            group["count"] += 1
        return dict(sorted(groups.items(), key=lambda item: -item[1]["bytes"])[:top])

    return dict(
        bytes=total,
        unpadded_bytes=sum(r["unpadded_bytes"] for r in rows),
        on_chip_bytes=sum(r["on_chip_bytes"] for r in rows),
        instructions=len(rows),
        by_op=grouped(lambda r: f"{r['op']}:{r['kind']}" if r["kind"] else r["op"]),
        by_source=grouped(lambda r: r["source"].rsplit("/", 1)[-1] if r["source"] else "(none)"),
        top=sorted(rows, key=lambda r: -r["bytes"])[:top],
    )
