"""The maths of ``AxialAttention`` as pure functions of tensors, in ``keras.ops`` only.

No layer state lives here: the layer (``medt_keras/layers/axial_attention.py``)
owns the weights and BatchNorms and passes their values in. Everything is
``keras.ops`` so it runs on every Keras backend; the one JAX-only form of the
attention is ``medt_keras.kernels.blocked_attention``, checked against
``softmax_attention`` here.

Shapes: ``n`` batch, ``b`` lines (columns or rows), ``G`` heads, ``L`` the
attended length, ``c`` query/key channels per head, ``d`` value channels per
head. Queries, keys and values are laid out heads-first, ``(n, b, G, L, .)``,
so every product below is batched over its leading axes in the order of the
``(n, b, G, L, L)`` attention maps.

The attention, eq. 2 of the MedT paper with the gates of its eq. 3, with the
similarity BatchNorm's scales folded into the query and key (its shifts are
constant along the attended axis ``j`` and cancel in the softmax)::

    s_ij = q_i.k_j + q_position_i.q_table_ij + k_position_j.k_table_ji
    y_i = sum_j softmax_j(s_ij) v_j
    y_position_i = sum_j softmax_j(s_ij) v_table_ij
"""

import functools

from keras import ops

# Queries, keys and values have only 1-16 channels per head in MedT, so the
# logits are outer products in disguise. As einsums they become batched
# products of tiny matrices, which XLA's CPU backend ran slowly and, for the
# relative-table terms, wrapped in transposed copies of the whole map. In
# inference, up to this many channels, softmax_attention writes them as sums
# of broadcast elementwise products, one per channel, which XLA fuses with
# the scaling and the sum of the terms (timing in docs/performance.md).
# Training keeps the einsums: the backward pass of the broadcast form reduces
# the map over its leading axes for the table gradients, which cost more than
# it saved. The weighted sums over the map stay products in every mode.
BROADCAST_CHANNELS = 4


def swap_heads_and_positions(x):
    """``(n, b, L, G, c)`` <-> ``(n, b, G, L, c)``."""
    return ops.transpose(x, (0, 1, 3, 2, 4))


def relative_table(embedding, length, span):
    """``table[i, j] = embedding[i - j + span - 1]``: ``(2 span - 1, C)`` -> ``(L, L, C)``."""
    offsets = ops.arange(length)[:, None] - ops.arange(length)[None, :] + (span - 1)
    return ops.take(embedding, offsets, axis=0)


def softmax_attention(q, k, v, positional, broadcast):
    """Softmax attention along ``L`` in ``keras.ops``: ``(y,)`` or ``(y, y_position)``.

    ``q``, ``k`` ``(n, b, G, L, c)``, ``v`` ``(n, b, G, L, d)``, with the
    similarity scales already in ``q``; ``positional`` is ``None`` or
    ``(q_position, k_position, q_table, k_table, v_table)``, the scaled query
    and key of the positional terms ``(n, b, G, L, c)`` and the ``(L, L, .)``
    tables (see the module docstring for the equations). Each output is
    ``(n, b, G, L, d)``. ``broadcast``: write the logits over few channels
    as broadcast products (inference; see ``BROADCAST_CHANNELS``).

    The form for every backend, and the reference of the blocked kernel.
    """
    similarity = pairwise_products(q, k, broadcast)
    if positional is not None:
        q_position, k_position, q_table, k_table, v_table = positional
        similarity = similarity + positional_products(q_position, q_table, True, broadcast)
        # k_j . r^k at offset j - i: the key's own position indexes the table.
        similarity = similarity + positional_products(k_position, k_table, False, broadcast)
    # softmax, normalised after the weighted sums: dividing the small
    # (.., L, c) results instead of the (.., L, L) map saves a pass over it.
    # The maximum only keeps exp in range; any constant per row cancels, so
    # no gradient flows through it.
    similarity = similarity - ops.stop_gradient(ops.max(similarity, axis=-1, keepdims=True))
    weights = ops.exp(similarity)
    normalizer = 1.0 / ops.sum(weights, axis=-1, keepdims=True)
    outputs = [ops.einsum("nbgij,nbgjc->nbgic", weights, v) * normalizer]
    if positional is not None:
        outputs.append(ops.einsum("nbgij,ijc->nbgic", weights, v_table) * normalizer)
    return tuple(outputs)


def pairwise_products(q, k, broadcast):
    """``s[n, b, g, i, j] = sum_c q[n, b, g, i, c] k[n, b, g, j, c]``."""
    channels = q.shape[-1]
    if not broadcast or channels > BROADCAST_CHANNELS:
        return ops.einsum("nbgic,nbgjc->nbgij", q, k)
    return functools.reduce(
        ops.add, [q[..., :, None, c] * k[..., None, :, c] for c in range(channels)]
    )


def positional_products(x, table, query_side, broadcast):
    """Products with the relative table, ``(n, b, g, i, j)``.

    ``query_side``: ``s[.., i, j] = sum_c x[n, b, g, i, c] table[i, j, c]``
    (``q.r^q``); otherwise ``sum_c x[n, b, g, j, c] table[j, i, c]``
    (``k.r^k``, the key's position indexes the table).
    """
    channels = x.shape[-1]
    if not broadcast or channels > BROADCAST_CHANNELS:
        if query_side:
            return ops.einsum("nbgic,ijc->nbgij", x, table)
        return ops.einsum("nbgjc,jic->nbgij", x, table)
    if query_side:
        products = [x[..., :, None, c] * table[:, :, c] for c in range(channels)]
    else:
        products = [x[..., None, :, c] * ops.transpose(table[:, :, c]) for c in range(channels)]
    return functools.reduce(ops.add, products)


def similarity_statistics(q, k, tables, gates, groups):
    """Batch mean and variance of the similarity terms, without building the maps.

    Each similarity term is a bilinear form of small tensors (``q_i.k_j``,
    ``G_Q q_i.r^q_ij``, ``G_K k_j.r^k_ji``), so its mean and mean square over
    ``(batch, lines, i, j)`` follow from sums and ``c x c`` outer products of
    ``q``, ``k`` and the tables, never from the ``(n, b, G, L, L)`` maps::

        sum_ij q_i.k_j = (sum_i q_i).(sum_j k_j)
        sum_ij (q_i.k_j)^2 = <sum_i q_i q_i^T, sum_j k_j k_j^T>   (Frobenius)

    and likewise for the table terms, whose table sums over the other
    position. The variance is ``E[t^2] - E[t]^2``, clamped at zero; the same
    as stacking the terms and normalising them, up to rounding.

    Args:
        q, k: ``(n, b, G, L, c)`` in the statistics' dtype.
        tables: ``None`` or ``(q_table, k_table)``, ``(L, L, c)``.
        gates: ``(None, G_Q, G_K)`` scalars, or ``None`` entries ungated.
        groups: BatchNorm batch groups; item ``i`` of the batch is in group
            ``i % groups``.

    Returns:
        ``(mean, variance, count)``: ``(groups, terms, G)`` each, and the
        number of elements per group behind them.
    """
    batch, lines, heads, length = ops.shape(q)[:4]
    count = (batch // groups) * lines * length * length

    def per_group(x):  # (n, b, G) -> (groups, G)
        return ops.sum(ops.reshape(x, (-1, groups, lines, heads)), axis=(0, 2))

    # Channels first, (n, b, G, c, L): every sum over positions below runs
    # over the minor axis, which XLA's CPU reductions vectorise, and so do
    # their gradients; with channels last, the (.., L, c, c) outer products
    # and their gradients reduced over short minor axes (MedT's local
    # 16-position layers took 13 ms per value and gradient against 3 ms).
    q, k = ops.swapaxes(q, 3, 4), ops.swapaxes(k, 3, 4)

    def gram(x):  # (..., c, L) -> (..., c, c): sum_i x_i x_i^T
        return ops.sum(x[..., :, None, :] * x[..., None, :, :], axis=-1)

    # Sums over (i, j) per (n, b, G) of each term and of its square.
    sums = [ops.sum(ops.sum(q, axis=-1) * ops.sum(k, axis=-1), axis=-1)]
    squares = [ops.sum(gram(q) * gram(k), axis=(-2, -1))]
    if tables is not None:
        # q.r^q: table rows are the query position i; k.r^k: the key position j.
        for x, table, gate in ((q, tables[0], gates[1]), (k, tables[1], gates[2])):
            scale = 1.0 if gate is None else gate
            table_sum = ops.transpose(ops.sum(table, axis=1))  # (c, L) against x's (.., c, L)
            table_outer = ops.transpose(ops.sum(table[..., :, None] * table[..., None, :], axis=1), (1, 2, 0))
            sums.append(scale * ops.sum(x * table_sum, axis=(-2, -1)))
            squares.append(
                scale * scale * ops.sum(x[..., :, None, :] * x[..., None, :, :] * table_outer, axis=(-3, -2, -1))
            )
    mean = ops.stack([per_group(t) for t in sums], axis=1) / count
    mean_square = ops.stack([per_group(t) for t in squares], axis=1) / count
    variance = ops.maximum(mean_square - ops.square(mean), 0.0)
    return mean, variance, count


def term_scales(scale, gates, batch, heads, dtype):
    """Per-term query scales: the BatchNorm's scale times the gate, one ``(batch, 1, G, 1, 1)`` each.

    ``scale`` is ``(groups, terms, G)`` (training: ``gamma / sqrt(var +
    eps)`` of each batch group, tiled over the batch so that item ``i`` gets
    group ``i % groups``) or ``(terms, G)`` (inference, the same for every
    item; then ``batch`` is 1).
    """
    if len(scale.shape) == 3:
        scale = ops.tile(scale, (batch // scale.shape[0], 1, 1))
    else:
        scale = scale[None]
    scales = []
    for t in range(scale.shape[1]):
        s = scale[:, t] if gates[t] is None else scale[:, t] * gates[t]
        scales.append(ops.reshape(ops.cast(s, dtype), (-1, 1, heads, 1, 1)))
    return scales


def folded_output_norm(terms, scale, shift, dtype):
    """``sum_t BN(stack(terms))[.., t]`` in inference, as one weighted sum.

    BatchNorm is affine in inference, ``BN(x) = scale x + shift``, so the
    stacked ``(n, b, L, F, terms)`` tensor is never built. Terms ``(n, b, L,
    F)``; ``scale`` and ``shift`` ``(F, terms)``, or ``(F,)`` for a single
    term. Returns ``(n, b, L, F)`` in ``dtype``.
    """
    if len(terms) > 1:
        scales = ops.unstack(ops.cast(scale, dtype), axis=-1)
        shift = ops.sum(shift, axis=-1)
    else:
        scales = [ops.cast(scale, dtype)]
    total = ops.cast(shift, dtype)
    for term, term_scale in zip(terms, scales):
        total = total + term * term_scale
    return total
