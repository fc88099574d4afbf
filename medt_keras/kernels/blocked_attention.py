"""Axial attention for JAX on CPU, computed a block of lines at a time.

This is the one place where medt-keras leaves ``keras.ops`` for JAX itself:
``AxialAttention`` calls ``blocked_attention`` when Keras runs on JAX, JAX
on the CPU and the attention maps are larger than one block (see
``enabled``); everywhere else it uses its ``keras.ops`` form, against which
the tests check this kernel.

Why: written as whole-tensor operations, the attention of a 64-pixel axis
makes ``(batch, lines, heads, L, L)`` maps of 33 MiB (MedT at 128x128,
batch 4) that XLA writes to memory and reads back 10-15 times in a training
step (logits, softmax, two weighted sums, and their backward). Here a
``lax.map`` walks over blocks of lines small enough that a block's maps stay
in the CPU's cache from the logits to the weighted sums, and a hand-written
backward pass (``jax.custom_vjp``) recomputes each block's map from the
small inputs and the saved log-sum-exp of its rows instead of storing it,
as flash attention does. No map is ever written to memory, in the forward
or the backward pass.

The function computes, per line, with ``c`` query/key and ``cv`` value
channels per head::

    logits_ij = q_i . k_j + p_i . q_table[i, j] + r_j . k_table[j, i]
    a_ij = softmax_j(logits_ij)
    y_i = sum_j a_ij v_j,    y_position_i = sum_j a_ij v_table[i, j]

which is MedT's gated axial attention (eq. 3 of the paper) once the
BatchNorm scales and the gates are folded into ``q``, ``p`` and ``r``: the
BatchNorm shifts are constant along ``j`` and cancel in the softmax.
"""

import functools

import jax
import jax.numpy as jnp

# Elements of one block's (batch, lines, heads, L, L) map: 1 MiB in float32,
# which fits the L2 cache of any current CPU core with room for the
# operands. Measured on MedT's 64x64 global attention (batch 4, 8 heads),
# forward and backward of one layer: blocks of 2 lines 81 ms, 4 lines 65,
# 8 lines (this size) 56, 16 lines 60, 64 lines 104, unblocked 158; the
# whole-tensor form 148 ms.
BLOCK_ELEMENTS = 1 << 18

# Products over at most this many channels are written as broadcast
# elementwise products, which XLA fuses with their neighbours; more
# channels are contracted as a batched matrix product.
_BROADCAST_CHANNELS = 4

_enabled = True


def enabled(shape=None):
    """Whether ``AxialAttention`` uses this kernel for queries of ``shape``.

    Yes where JAX runs on the CPU, ``set_enabled`` has not turned it off
    and, given ``shape`` ``(batch, lines, heads, L, c)``, the layer's maps
    are larger than one block: maps that fit in cache whole gain nothing
    from blocking and would only pay for compiling the loops (two training
    tests of small models: 71 s with it, 62 s without).
    """
    if not _enabled or jax.default_backend() != "cpu":
        return False
    if shape is None:
        return True
    batch, lines, heads, length = shape[:4]
    return batch * lines * heads * length * length > BLOCK_ELEMENTS


def set_enabled(value):
    """Turns the kernel on or off for layers traced from now on; returns the previous setting.

    Off, ``AxialAttention`` computes with ``keras.ops`` (what it does on
    GPU and TPU); the tests use this to compare the two.
    """
    global _enabled
    previous, _enabled = _enabled, bool(value)
    return previous


def blocked_attention(q, k, v, positional=None):
    """Softmax attention along the last-but-one axis, a block of lines at a time.

    Args:
        q: queries for ``q . k``, ``(batch, lines, heads, L, c)``.
        k: keys, ``(batch, lines, heads, L, c)``.
        v: values, ``(batch, lines, heads, L, cv)``.
        positional: ``None`` (no positional terms) or ``(p, r, q_table,
            k_table, v_table)``: queries ``p`` for ``p . q_table`` and keys
            ``r`` for ``r . k_table``, ``(batch, lines, heads, L, c)``;
            ``q_table`` and ``k_table`` ``(L, L, c)``, ``v_table``
            ``(L, L, cv)``, indexed ``[query position, key position]`` for
            ``q_table`` and ``v_table`` and ``[key position, query
            position]`` for ``k_table``.

    Returns:
        ``(y,)`` without positional terms, ``(y, y_position)`` with them,
        each ``(batch, lines, heads, L, cv)`` in the dtype of ``q``.
        Computed in float32 at least (softmax in bfloat16 loses too much).
    """
    return _compiled_attention(q, k, v, positional, _lines_per_block(q.shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, positional, size):
    return _attention_forward(q, k, v, positional, size)[0]


# Compiled once per shape when called outside a traced function (a layer
# called eagerly); inside one it is inlined like any jitted function.
_compiled_attention = jax.jit(_attention, static_argnums=(4,))


def _work_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _lines_per_block(shape):
    batch, lines, heads, length = shape[:4]
    per_line = batch * heads * length * length
    target = max(1, BLOCK_ELEMENTS // per_line)
    # The largest divisor of the line count within the target, so that all
    # blocks have one shape.
    return max(d for d in range(1, min(target, lines) + 1) if lines % d == 0)


def _to_blocks(x, size):
    # (batch, lines, ...) -> (blocks, batch, size, ...): the loop runs over
    # blocks of lines; batch stays a batch axis of every operation inside,
    # so a batch sharded over devices stays sharded.
    batch, lines = x.shape[:2]
    x = jnp.reshape(x, (batch, lines // size, size) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1)


def _from_blocks(x):
    x = jnp.swapaxes(x, 0, 1)
    return jnp.reshape(x, (x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _rows(x, dtype):
    # A block's (batch, lines, heads, L, c) as (rows, L, c) in the working
    # dtype: one batch axis for every product (a unit axis, as with one line
    # per block, made XLA's CPU reductions several times slower).
    return jnp.reshape(x, (-1,) + x.shape[-2:]).astype(dtype)


def _rows_times_columns(a, b):
    # s[..., i, j] = sum_c a[..., i, c] b[..., j, c]
    if a.shape[-1] > _BROADCAST_CHANNELS:
        return jnp.einsum("ric,rjc->rij", a, b)
    return functools.reduce(
        jnp.add, [a[..., :, None, c] * b[..., None, :, c] for c in range(a.shape[-1])]
    )


def _rows_times_table(a, table):
    # s[..., i, j] = sum_c a[..., i, c] table[i, j, c]
    return functools.reduce(jnp.add, [a[..., :, None, c] * table[:, :, c] for c in range(a.shape[-1])])


def _columns_times_table(a, table):
    # s[..., i, j] = sum_c a[..., j, c] table[i, j, c]
    return functools.reduce(jnp.add, [a[..., None, :, c] * table[:, :, c] for c in range(a.shape[-1])])


def _map_times_table(s, table, axis):
    # y[..., x, c] = sum_over_axis s[..., i, j] table[i, j, c]; axis -1 sums j
    # (x = i), axis -2 sums i (x = j).
    return jnp.stack([jnp.sum(s * table[:, :, c], axis=axis) for c in range(table.shape[-1])], axis=-1)


def _logits(q, k, positional_block, tables):
    s = _rows_times_columns(q, k)
    if positional_block is not None:
        p, r = positional_block
        q_table, k_table_t, _ = tables
        s = s + _rows_times_table(p, q_table) + _columns_times_table(r, k_table_t)
    return s


def _split(positional, dtype):
    # Per-line inputs and shared tables, the tables in the working dtype; the
    # key table is transposed once to [query position, key position] like
    # the other two.
    if positional is None:
        return None, None
    p, r, q_table, k_table, v_table = positional
    tables = (q_table, jnp.swapaxes(k_table, 0, 1), v_table)
    return (p, r), tuple(t.astype(dtype) for t in tables)


def _attention_forward(q, k, v, positional, size):
    dtype = q.dtype
    work = _work_dtype(dtype)
    per_line, tables = _split(positional, work)

    def block(args):
        shape = args[2].shape
        q, k, v, per_line = jax.tree.map(lambda t: _rows(t, work), args)
        s = _logits(q, k, per_line, tables)
        row_max = jnp.max(s, axis=-1, keepdims=True)
        weights = jnp.exp(s - row_max)
        row_sum = jnp.sum(weights, axis=-1, keepdims=True)
        outputs = [jnp.einsum("rij,rjc->ric", weights, v) / row_sum]
        if tables is not None:
            outputs.append(_map_times_table(weights, tables[2], -1) / row_sum)
        log_sum_exp = (row_max + jnp.log(row_sum))[..., 0]
        return tuple(jnp.reshape(y, shape) for y in outputs), jnp.reshape(log_sum_exp, shape[:-1])

    blocks = (q, k, v, per_line)
    outputs, log_sum_exp = jax.lax.map(block, jax.tree.map(lambda t: _to_blocks(t, size), blocks))
    outputs = tuple(_from_blocks(y) for y in outputs)
    residuals = (q, k, v, positional, outputs, _from_blocks(log_sum_exp))
    return tuple(y.astype(dtype) for y in outputs), residuals


def _attention_backward(size, residuals, cotangents):
    q, k, v, positional, outputs, log_sum_exp = residuals
    work = outputs[0].dtype
    per_line, tables = _split(positional, work)

    def block(table_grads, args):
        shapes = jax.tree.map(lambda t: t.shape, args[:4])
        q, k, v, per_line, outputs, cotangents = jax.tree.map(
            lambda t: _rows(t, work), args[:5] + args[6:]
        )
        log_sum_exp = jnp.reshape(args[5], (-1, args[5].shape[-1]))
        weights = jnp.exp(_logits(q, k, per_line, tables) - log_sum_exp[..., None])
        # Softmax backward: d logits_ij = a_ij (d a_ij - sum_j' a_ij' d a_ij'),
        # and sum_j' a_ij' d a_ij' = sum_c dy_ic y_ic over both outputs.
        row_dot = sum(jnp.sum(dy * y, axis=-1) for dy, y in zip(cotangents, outputs))
        d_weights = _rows_times_columns(cotangents[0], v)
        if tables is not None:
            d_weights = d_weights + _rows_times_table(cotangents[1], tables[2])
        d_logits = weights * (d_weights - row_dot[..., None])
        dq = jnp.einsum("rij,rjc->ric", d_logits, k)
        dk = jnp.einsum("rij,ric->rjc", d_logits, q)
        dv = jnp.einsum("rij,ric->rjc", weights, cotangents[0])
        if tables is None:
            return table_grads, jax.tree.map(jnp.reshape, (dq, dk, dv, None), shapes)
        p, r = per_line
        q_table, k_table_t, _ = tables
        dp = _map_times_table(d_logits, q_table, -1)
        dr = _map_times_table(d_logits, k_table_t, -2)
        # Tables are shared by all lines: their gradients add up over blocks.
        d_q_table, d_k_table_t, d_v_table = table_grads
        d_q_table = d_q_table + jnp.einsum("rij,ric->ijc", d_logits, p)
        d_k_table_t = d_k_table_t + jnp.einsum("rij,rjc->ijc", d_logits, r)
        d_v_table = d_v_table + jnp.einsum("rij,ric->ijc", weights, cotangents[1])
        grads = jax.tree.map(jnp.reshape, (dq, dk, dv, (dp, dr)), shapes)
        return (d_q_table, d_k_table_t, d_v_table), grads

    table_grads = () if tables is None else tuple(jnp.zeros(t.shape, work) for t in tables)
    blocks = (q, k, v, per_line, outputs, log_sum_exp, cotangents)
    table_grads, grads = jax.lax.scan(block, table_grads, jax.tree.map(lambda t: _to_blocks(t, size), blocks))
    dq, dk, dv, d_per_line = jax.tree.map(_from_blocks, grads)
    dq, dk, dv = dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
    if positional is None:
        return dq, dk, dv, None
    p, r, q_table, k_table, v_table = positional
    d_q_table, d_k_table_t, d_v_table = table_grads
    d_positional = (
        d_per_line[0].astype(p.dtype),
        d_per_line[1].astype(r.dtype),
        d_q_table.astype(q_table.dtype),
        jnp.swapaxes(d_k_table_t, 0, 1).astype(k_table.dtype),
        d_v_table.astype(v_table.dtype),
    )
    return dq, dk, dv, d_positional


_attention.defvjp(_attention_forward, _attention_backward)
