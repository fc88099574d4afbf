"""Axial attention for JAX on CPU, computed a block of lines at a time.

Here medt-keras leaves ``keras.ops`` for JAX itself:
``AxialAttention(attention="blocked")`` calls ``blocked_attention`` on any
JAX platform, and its default ``attention="auto"`` does on the CPU where
the native kernel cannot run and the maps are large enough
(``dispatch``); the tests check this kernel against the ``keras.ops``
form.

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
In inference (no gradient), each row of the softmax is shifted by an upper
bound of its maximum computed from the small per-line inputs
(``_row_bound``) instead of by the maximum, which spares a pass over every
map; where a bound is too loose the layer is computed again exactly.

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
# operands; the fastest of the sizes measured (docs/performance.md).
BLOCK_ELEMENTS = 1 << 18

# Products that build a map (logits, their gradient) from at most this many
# channels are written as broadcast elementwise products, which XLA fuses
# with their neighbours; more channels are contracted as a batched matrix
# product.
_BROADCAST_CHANNELS = 4

# Products that reduce a map against per-line vectors (the outputs, dq, dk,
# dv) do the same for a single channel only: from two channels on, one
# batched matrix product beat one broadcast reduction per channel
# (docs/performance.md).
_MAP_BROADCAST_CHANNELS = 1


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
    # Inference (no gradient): each row shifted by a bound of its maximum.
    return _attention_forward(q, k, v, positional, size, bounded_shift=True)[0]


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


def _channels(x):
    # (..., c) -> c arrays (...): the kernel keeps every channel in its own
    # array, so that inside a block each channel is a contiguous (rows, L)
    # slice. Channels interleaved in one array (channels last, or a channel
    # axis sliced inside the loop) stop XLA's CPU loops over the maps from
    # vectorising (the backward logits of a 2-channel layer took several
    # times those of a 1-channel one).
    return tuple(x[..., c] for c in range(x.shape[-1]))


def _stack_channels(blocks):
    # c arrays (blocks, batch, size, heads, L) -> (batch, lines, heads, L, c)
    return jnp.stack([_from_blocks(x) for x in blocks], axis=-1)


def _rows(x, dtype):
    # A block's (batch, lines, heads, L) as (rows, L) in the working dtype:
    # one batch axis for every product (a unit axis, as with one line per
    # block, made XLA's CPU reductions several times slower).
    return jnp.reshape(x, (-1, x.shape[-1])).astype(dtype)


def _total(terms):
    return functools.reduce(jnp.add, terms)


def _rows_times_columns(a, b):
    # s[r, i, j] = sum_c a_c[r, i] b_c[r, j]
    if len(a) > _BROADCAST_CHANNELS:
        return jnp.einsum("cri,crj->rij", jnp.stack(a), jnp.stack(b))
    return _total([a_c[:, :, None] * b_c[:, None, :] for a_c, b_c in zip(a, b)])


def _rows_times_table(a, table):
    # s[r, i, j] = sum_c a_c[r, i] table_c[i, j]
    return _total([a_c[:, :, None] * t_c for a_c, t_c in zip(a, table)])


def _columns_times_table(a, table):
    # s[r, i, j] = sum_c a_c[r, j] table_c[i, j]
    return _total([a_c[:, None, :] * t_c for a_c, t_c in zip(a, table)])


def _map_times_table(s, table, axis):
    # y_c[r, x] = sum_over_axis s[r, i, j] table_c[i, j]; axis -1 sums j
    # (x = i), axis -2 sums i (x = j).
    return tuple(jnp.sum(s * t_c, axis=axis) for t_c in table)


def _map_times_columns(s, x):
    # y_c[r, i] = sum_j s[r, i, j] x_c[r, j]
    if len(x) > _MAP_BROADCAST_CHANNELS:
        return tuple(jnp.einsum("rij,crj->cri", s, jnp.stack(x)))
    return tuple(jnp.sum(s * x_c[:, None, :], axis=-1) for x_c in x)


def _map_times_rows(s, x):
    # y_c[r, j] = sum_i s[r, i, j] x_c[r, i]
    if len(x) > _MAP_BROADCAST_CHANNELS:
        return tuple(jnp.einsum("rij,cri->crj", s, jnp.stack(x)))
    return tuple(jnp.sum(s * x_c[:, :, None], axis=-2) for x_c in x)


def _table_gradient(s, x, axis):
    # g_c[i, j] = sum_r s[r, i, j] x_c[r, i] (axis -1: x indexes queries)
    # or x_c[r, j] (axis -2: x indexes keys).
    spec = "rij,cri->cij" if axis == -1 else "rij,crj->cij"
    return jnp.einsum(spec, s, jnp.stack(x))


def _logits(q, k, positional_block, tables):
    s = _rows_times_columns(q, k)
    if positional_block is not None:
        p, r = positional_block
        q_table, k_table_t, _ = tables
        s = s + _rows_times_table(p, q_table) + _columns_times_table(r, k_table_t)
    return s


def _split(positional):
    # Per-line inputs and shared tables as one array per channel; the key
    # table is transposed once to [query position, key position] like the
    # others.
    if positional is None:
        return None, None
    p, r, q_table, k_table, v_table = positional
    tables = (_channels(q_table), _channels(jnp.swapaxes(k_table, 0, 1)), _channels(v_table))
    return (_channels(p), _channels(r)), tables


def _range_product_max(a, low, high):
    # max of a * x over x in [low, high] (either sign of a)
    return jnp.maximum(a * low, a * high)


def _row_bound(q, k, per_line, table_ranges):
    """An upper bound of ``max_j logits_ij`` from per-line extremes, ``(batch, lines, heads, L)``.

    Each term of the logits is bounded on its own: ``q_i k_j`` by the range
    of ``k`` over the row (exact for one channel), ``p_i q_table[i, j]`` by
    the range of the table's row ``i``, ``r_j k_table[j, i]`` by the
    corners of both ranges. The sum of the bounds is at least the largest
    logit. It costs one pass over the small per-line inputs, for all lines
    at once, not a pass over the maps.
    """
    terms = [_range_product_max(q_c, jnp.min(k_c, -1, keepdims=True), jnp.max(k_c, -1, keepdims=True))
             for q_c, k_c in zip(q, k)]
    if per_line is not None:
        p, r = per_line
        (q_low, q_high), (k_low, k_high) = table_ranges
        terms += [_range_product_max(p_c, lo, hi) for p_c, lo, hi in zip(p, q_low, q_high)]
        for r_c, lo, hi in zip(r, k_low, k_high):
            r_low, r_high = jnp.min(r_c, -1, keepdims=True), jnp.max(r_c, -1, keepdims=True)
            terms.append(jnp.maximum(_range_product_max(r_low, lo, hi), _range_product_max(r_high, lo, hi)))
    return _total(terms)


def _table_ranges(tables):
    # Per query position i, the range over key positions j of every channel
    # of the query and key tables (both indexed [i, j]).
    if tables is None:
        return None
    return tuple((tuple(jnp.min(t, -1) for t in table), tuple(jnp.max(t, -1) for t in table))
                 for table in tables[:2])


def _smallest_row_sum(dtype):
    # Shifted by the bound instead of the row's maximum, a row's largest
    # weight is exp(-(bound - max)) instead of 1. With the row's sum above
    # this, the largest weight is above it divided by the row length, and
    # every weight within the dtype's rounding of it is still a normal
    # number (float32: above 1e-30 against a smallest normal of 1e-38;
    # float64: 1e-220 against 1e-308), so the weights that matter keep full
    # precision. Below it the layer is computed again with the exact maxima.
    return jnp.asarray(1e-20 if jnp.finfo(dtype).bits <= 32 else 1e-200, dtype)


def _attention_forward(q, k, v, positional, size, bounded_shift=False):
    dtype = q.dtype
    work = _work_dtype(dtype)
    q, k, v = _channels(q), _channels(k), _channels(v)
    per_line, tables = _split(positional)
    work_tables = jax.tree.map(lambda t: t.astype(work), tables)

    def block(args, exact):
        shape = args[2][0].shape
        q, k, v, per_line = jax.tree.map(lambda t: _rows(t, work), args[:4])
        s = _logits(q, k, per_line, work_tables)
        shift = jnp.max(s, axis=-1) if exact else _rows(args[4], work)
        weights = jnp.exp(s - shift[..., None])
        row_sum = jnp.sum(weights, axis=-1)
        outputs = [_map_times_columns(weights, v)]
        if tables is not None:
            outputs.append(_map_times_table(weights, work_tables[2], -1))
        outputs = jax.tree.map(lambda y: jnp.reshape(y / row_sum, shape), tuple(outputs))
        return outputs, jnp.reshape(shift + jnp.log(row_sum), shape)

    def loop(per_line_inputs, exact):
        blocks = jax.tree.map(lambda t: _to_blocks(t, size), per_line_inputs)
        outputs, log_sum_exp = jax.lax.map(functools.partial(block, exact=exact), blocks)
        return jax.tree.map(_from_blocks, outputs), _from_blocks(log_sum_exp)

    # Softmax is shift-invariant along j. In inference, shifting each row
    # by an upper bound of its maximum, computed from the small per-line
    # inputs, instead of by the maximum itself spares a pass over every map
    # to find it (MedT inference 12%, the gated U-Net's 16% faster); exp
    # stays at most 1. Where a bound is so loose that a row's sum falls
    # below `_smallest_row_sum` (its weights would lose precision), the
    # layer is computed again with the exact maxima: one cheap check per
    # call, outside the loop. Training keeps the exact maxima: with the
    # bound, MedT's training step was 6% slower.
    if not bounded_shift:
        outputs, log_sum_exp = loop((q, k, v, per_line), exact=True)
    else:
        bound = _row_bound(*jax.tree.map(lambda t: t.astype(work), (q, k, per_line)), _table_ranges(work_tables))
        bounded = loop((q, k, v, per_line, bound), exact=False)
        # log_sum_exp - bound is the log of each row's sum.
        precise = jnp.all(bounded[1] - bound >= jnp.log(_smallest_row_sum(work)))
        outputs, log_sum_exp = jax.lax.cond(
            precise, lambda: bounded, lambda: loop((q, k, v, per_line), exact=True)
        )
    residuals = (q, k, v, per_line, tables, outputs, log_sum_exp)
    return tuple(jnp.stack(y, axis=-1).astype(dtype) for y in outputs), residuals


def _attention_backward(size, residuals, cotangents):
    q, k, v, per_line, tables, outputs, log_sum_exp = residuals
    work = log_sum_exp.dtype
    work_tables = jax.tree.map(lambda t: t.astype(work), tables)
    cotangents = tuple(_channels(dy) for dy in cotangents)

    def block(table_grads, args):
        shapes = jax.tree.map(lambda t: t.shape, args[:4])
        q, k, v, per_line, outputs, cotangents = jax.tree.map(lambda t: _rows(t, work), args[:5] + args[6:])
        log_sum_exp = _rows(args[5], work)
        weights = jnp.exp(_logits(q, k, per_line, work_tables) - log_sum_exp[..., None])
        # Softmax backward: d logits_ij = a_ij (d a_ij - sum_j' a_ij' d a_ij'),
        # and sum_j' a_ij' d a_ij' = sum_c dy_ci y_ci over both outputs.
        row_dot = _total([dy_c * y_c for dy, y in zip(cotangents, outputs) for dy_c, y_c in zip(dy, y)])
        d_weights = _rows_times_columns(cotangents[0], v)
        if tables is not None:
            d_weights = d_weights + _rows_times_table(cotangents[1], work_tables[2])
        d_logits = weights * (d_weights - row_dot[..., None])
        dq = _map_times_columns(d_logits, k)
        dk = _map_times_rows(d_logits, q)
        dv = _map_times_rows(weights, cotangents[0])
        if tables is None:
            return table_grads, jax.tree.map(jnp.reshape, (dq, dk, dv, None), shapes)
        p, r = per_line
        q_table, k_table_t, _ = work_tables
        dp = _map_times_table(d_logits, q_table, -1)
        dr = _map_times_table(d_logits, k_table_t, -2)
        # Tables are shared by all lines: their gradients add up over blocks.
        d_q_table, d_k_table_t, d_v_table = table_grads
        d_q_table = d_q_table + _table_gradient(d_logits, p, -1)
        d_k_table_t = d_k_table_t + _table_gradient(d_logits, r, -2)
        d_v_table = d_v_table + _table_gradient(weights, cotangents[1], -1)
        grads = jax.tree.map(jnp.reshape, (dq, dk, dv, (dp, dr)), shapes)
        return (d_q_table, d_k_table_t, d_v_table), grads

    table_grads = () if tables is None else tuple(jnp.zeros((len(t),) + t[0].shape, work) for t in tables)
    blocks = (q, k, v, per_line, outputs, log_sum_exp, cotangents)
    table_grads, grads = jax.lax.scan(block, table_grads, jax.tree.map(lambda t: _to_blocks(t, size), blocks))
    dq, dk, dv = (_stack_channels(g) for g in grads[:3])
    d_per_line = None if grads[3] is None else tuple(_stack_channels(g) for g in grads[3])
    dq, dk, dv = dq.astype(q[0].dtype), dk.astype(k[0].dtype), dv.astype(v[0].dtype)
    if tables is None:
        return dq, dk, dv, None
    d_q_table, d_k_table_t, d_v_table = table_grads
    d_positional = (
        d_per_line[0].astype(per_line[0][0].dtype),
        d_per_line[1].astype(per_line[1][0].dtype),
        jnp.moveaxis(d_q_table, 0, -1).astype(tables[0][0].dtype),
        jnp.transpose(d_k_table_t, (2, 1, 0)).astype(tables[1][0].dtype),
        jnp.moveaxis(d_v_table, 0, -1).astype(tables[2][0].dtype),
    )
    return dq, dk, dv, d_positional


_attention.defvjp(_attention_forward, _attention_backward)
