"""The official MedT attention and BatchNorm written out in NumPy (NCHW).

An independent transcription of lib/models/axialnet.py's arithmetic, in
PyTorch's layout and order of operations (permute, view, channel
concatenation and interleaving as the official forward does them), used
as the reference for layer-level tests. Parameters use the official
shapes: ``qkv_weight (2*out, in)``, ``relative (2*gp, 2K-1)``, BatchNorm
parameters as dicts of flat per-channel arrays.
"""

import numpy as np


def batch_norm(x, params, training, channel_axis=1, eps=1e-5, momentum=0.1):
    """torch BatchNorm{1,2}d; returns (output, updated running stats)."""
    axes = tuple(a for a in range(x.ndim) if a != channel_axis)
    shape = [1] * x.ndim
    shape[channel_axis] = -1
    if training:
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)
        n = x.size / x.shape[channel_axis]
        running_mean = (1 - momentum) * params["running_mean"] + momentum * mean
        running_var = (1 - momentum) * params["running_var"] + momentum * var * n / (n - 1)
    else:
        mean, var = params["running_mean"], params["running_var"]
        running_mean, running_var = mean, var
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    y = y * params["weight"].reshape(shape) + params["bias"].reshape(shape)
    return y, {"running_mean": running_mean, "running_var": running_var}


def axial_attention(x, p, groups, width, training, gates=None, positional=True, stride=1):
    """AxialAttention / _dynamic (gates) / _wopos (positional=False) on NCHW ``x``."""
    if width:
        x = x.transpose(0, 2, 1, 3)
    else:
        x = x.transpose(0, 3, 1, 2)
    n, w, c, h = x.shape
    x = x.reshape(n * w, c, h)
    out_planes = p["qkv_weight"].shape[0] // 2
    gp = out_planes // groups
    qkv = np.einsum("oi,bil->bol", p["qkv_weight"], x)
    qkv, _ = batch_norm(qkv, p["bn_qkv"], training)
    qkv = qkv.reshape(n * w, groups, gp * 2, h)
    q, k, v = qkv[:, :, : gp // 2], qkv[:, :, gp // 2 : gp], qkv[:, :, gp:]
    qk = np.einsum("bgci,bgcj->bgij", q, k)
    if positional:
        kernel = h
        index = (np.arange(kernel)[:, None] - np.arange(kernel)[None, :] + kernel - 1).reshape(-1)
        emb = p["relative"][:, index].reshape(gp * 2, kernel, kernel)
        q_emb, k_emb, v_emb = emb[: gp // 2], emb[gp // 2 : gp], emb[gp:]
        qr = np.einsum("bgci,cij->bgij", q, q_emb)
        kr = np.einsum("bgci,cij->bgij", k, k_emb).transpose(0, 1, 3, 2)
        if gates is not None:
            qr, kr = qr * gates["f_qr"], kr * gates["f_kr"]
        sim = np.concatenate([qk, qr, kr], axis=1)
        sim, _ = batch_norm(sim, p["bn_similarity"], training)
        sim = sim.reshape(n * w, 3, groups, h, h).sum(axis=1)
    else:
        sim, _ = batch_norm(qk, p["bn_similarity"], training)
    sim = np.exp(sim - sim.max(axis=3, keepdims=True))
    sim = sim / sim.sum(axis=3, keepdims=True)
    sv = np.einsum("bgij,bgcj->bgci", sim, v)
    if positional:
        sve = np.einsum("bgij,cij->bgci", sim, v_emb)
        if gates is not None:
            sv, sve = sv * gates["f_sv"], sve * gates["f_sve"]
        stacked = np.concatenate([sv, sve], axis=-1).reshape(n * w, out_planes * 2, h)
        out, _ = batch_norm(stacked, p["bn_output"], training)
        out = out.reshape(n, w, out_planes, 2, h).sum(axis=-2)
    else:
        out, _ = batch_norm(sv.reshape(n * w, out_planes, h), p["bn_output"], training)
        out = out.reshape(n, w, out_planes, h)
    if width:
        out = out.transpose(0, 2, 1, 3)
    else:
        out = out.transpose(0, 2, 3, 1)
    if stride > 1:
        nn, cc, hh, ww = out.shape
        out = out.reshape(nn, cc, hh // stride, stride, ww // stride, stride).mean(axis=(3, 5))
    return out


def random_attention_params(rng, in_planes, out_planes, groups, kernel, positional=True):
    gp = out_planes // groups

    def bn(c):
        return {
            "weight": rng.uniform(0.5, 1.5, c),
            "bias": rng.normal(0, 0.2, c),
            "running_mean": rng.normal(0, 0.3, c),
            "running_var": rng.uniform(0.5, 2.0, c),
        }

    params = {
        "qkv_weight": rng.normal(0, np.sqrt(1 / in_planes), (2 * out_planes, in_planes)),
        "bn_qkv": bn(2 * out_planes),
        "bn_similarity": bn(3 * groups if positional else groups),
        "bn_output": bn(2 * out_planes if positional else out_planes),
    }
    if positional:
        params["relative"] = rng.normal(0, np.sqrt(1 / gp), (2 * gp, 2 * kernel - 1))
    return params
