"""Where a compiled program's bytes go (training/hlo_traffic.py), on HLO text written here."""

import pytest

from training import hlo_traffic

# A TPU-style module: a fusion over an array whose minor dimension (16) fills an eighth of the
# 128 lanes of its T(8,128) tiles, a reduction with its reducer, a collective, and bookkeeping.
MODULE = """HloModule m

%fused_computation.1 (p0: f32[8,64,64,16]) -> f32[8,64,64,16] {
  %p0 = f32[8,64,64,16]{3,2,1,0:T(8,128)} parameter(0)
  ROOT %e = f32[8,64,64,16]{3,2,1,0:T(8,128)} exponential(f32[8,64,64,16]{3,2,1,0:T(8,128)} %p0)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

ENTRY %main.5 (x: f32[8,64,64,16]) -> (f32[8,64,64,16], f32[]) {
  %x = f32[8,64,64,16]{3,2,1,0:T(8,128)} parameter(0)
  %fusion.1 = f32[8,64,64,16]{3,2,1,0:T(8,128)} fusion(f32[8,64,64,16]{3,2,1,0:T(8,128)} %x), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(train_step)/jit(main)/medt/axial_attention/exp" source_file="x.py"}
  %c = f32[] constant(0)
  %r = f32[]{:T(128)} reduce(f32[8,64,64,16]{3,2,1,0:T(8,128)} %fusion.1, f32[] %c), dimensions={0,1,2,3}, to_apply=%add
  %ar = f32[]{:T(128)} all-reduce(f32[]{:T(128)} %r), to_apply=%add
  ROOT %t = (f32[8,64,64,16]{3,2,1,0:T(8,128)}, f32[]) tuple(%fusion.1, %ar)
}
"""
ARRAY = 8 * 64 * 64 * 16 * 4


def test_tiles_pad_the_most_minor_dimensions():
    assert hlo_traffic.array_bytes("f32", "8,64,64,16", "{3,2,1,0:T(8,128)}") == ARRAY * 8
    assert hlo_traffic.array_bytes("f32", "8,64,64,16", "{3,2,1,0:T(8,128)}", padded=False) == ARRAY
    # The layout decides which dimensions are minor: here the 64s are, and nothing is padded.
    assert hlo_traffic.array_bytes("f32", "8,16,64,64", "{3,2,1,0:T(8,128)}") == ARRAY * 2
    assert hlo_traffic.array_bytes("f32", "8,16,64,64", "{2,3,1,0:T(8,128)}") == ARRAY * 2
    assert hlo_traffic.array_bytes("bf16", "128,256", "{1,0:T(8,128)(2,1)}") == 128 * 256 * 2
    assert hlo_traffic.array_bytes("f32", "3", "{0}") == 12 and hlo_traffic.array_bytes("f32", "", "{:T(128)}") == 4


def test_instructions_between_memory_are_counted_not_those_inside_fusions():
    rows = {row["name"]: row for row in hlo_traffic.instructions(MODULE)}
    assert sorted(rows) == ["ar", "fusion.1", "r"]  # no parameter, constant, tuple, fused or reducer instruction
    assert rows["fusion.1"]["bytes"] == 2 * 8 * ARRAY and rows["fusion.1"]["unpadded_bytes"] == 2 * ARRAY
    assert rows["fusion.1"]["kind"] == "kLoop" and rows["fusion.1"]["source"] == "medt/axial_attention/exp"
    assert rows["r"]["bytes"] == 8 * ARRAY + 8 and rows["ar"]["bytes"] == 8


def test_breakdown_groups_and_orders_by_bytes():
    report = hlo_traffic.breakdown(MODULE, top=2)
    assert report["bytes"] == 3 * 8 * ARRAY + 16 and report["instructions"] == 3
    assert list(report["by_op"]) == ["fusion:kLoop", "reduce"]  # the two largest
    assert report["by_source"]["exp"]["count"] == 1
    assert [row["name"] for row in report["top"]] == ["fusion.1", "r"]


def test_a_cpu_program_reads_at_its_plain_size():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    text = jax.jit(lambda a: jnp.exp(a) * 2.0).lower(jnp.ones((32, 16), jnp.float32)).compile().as_text()
    report = hlo_traffic.breakdown(text)
    assert report["bytes"] == report["unpadded_bytes"] == 2 * 32 * 16 * 4  # one fusion: read once, write once


def test_on_chip_arrays_and_asynchronous_moves():
    # A slice of a device-memory array into VMEM (S(1)) reads the slice once; the fusion that
    # then reads it from VMEM moves nothing through device memory; the "-done" halves move nothing.
    module = """ENTRY %main (x: f32[8,128]) -> f32[2,128] {
  %x = f32[8,128]{1,0:T(8,128)} parameter(0)
  %s = ((f32[8,128]{1,0:T(8,128)}), f32[2,128]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%x), slice={[0:2], [0:128]}
  %d = f32[2,128]{1,0:T(8,128)S(1)} slice-done(%s)
  %c = (f32[8,128]{1,0:T(8,128)S(1)}, f32[8,128]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%x)
  %cd = f32[8,128]{1,0:T(8,128)S(1)} copy-done(%c)
  ROOT %f = f32[2,128]{1,0:T(8,128)} fusion(%d), kind=kLoop, calls=%g
}
"""
    rows = {row["name"]: row for row in hlo_traffic.instructions(module)}
    assert sorted(rows) == ["c", "f", "s"]
    # The slice: 2 rows padded to the 8 of a tile, read from device memory, written on chip.
    assert rows["s"]["bytes"] == rows["s"]["on_chip_bytes"] == 8 * 128 * 4
    assert rows["s"]["unpadded_bytes"] == 2 * 128 * 4
    assert rows["c"]["bytes"] == rows["c"]["on_chip_bytes"] == 8 * 128 * 4
    # The fusion reads its operand on chip and writes its result to device memory.
    assert rows["f"]["bytes"] == rows["f"]["on_chip_bytes"] == 8 * 128 * 4
