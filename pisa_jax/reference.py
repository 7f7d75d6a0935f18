"""Reference implementation of PISA in plain `jax.numpy`: the oracle for every kernel.

Written for clarity, not speed: it forms the full `[T, T]` logits. Inputs are in the
`[B, H, T, D]` layout; arithmetic is float32 (float64 for float64 inputs). The public
entry points in `pisa_jax.api` validate arguments and handle layouts.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array, lax

from pisa_jax._blocks import block_lengths, num_blocks
from pisa_jax._types import BlockStatistics, Selection


# Full float32 products: on GPUs XLA would otherwise use tf32 for float32 matmuls.
_EXACT = lax.Precision.HIGHEST


def _einsum(spec, *xs):
    return jnp.einsum(spec, *xs, precision=_EXACT)


def compute_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def block_statistics(q: Array, k: Array, v: Array, *, block_size: int,
                     with_norms: bool) -> BlockStatistics:
    """PISA_SPEC section 1, by blocks of the padded sequence (padding masked out)."""
    b, h, t, d = q.shape
    ct = compute_dtype(q.dtype)
    nt = num_blocks(t, block_size)
    pad = ((0, 0), (0, 0), (0, nt * block_size - t), (0, 0))

    def blocks(x):
        return jnp.pad(x.astype(ct), pad).reshape(b, h, nt, block_size, d)

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    lengths = jnp.asarray(block_lengths(t, block_size), ct)[:, None]
    valid = (jnp.arange(nt * block_size) < t).reshape(nt, block_size, 1)

    q_mean = qb.sum(3) / lengths
    k_mean = kb.sum(3) / lengths
    v_sum = vb.sum(3)
    centred = jnp.where(valid, kb - k_mean[:, :, :, None, :], 0)
    per_block = _einsum("bhnsd,bhnse->bhnde", centred, vb)
    norms = jnp.sqrt(jnp.sum(per_block**2, axis=(-2, -1))) if with_norms else None
    return BlockStatistics(q_mean=q_mean, k_mean=k_mean, v_sum=v_sum,
                           moment=per_block.sum(2), moment_norms=norms,
                           num_tokens=t, block_size=block_size)


def piecewise_attention(q: Array, k: Array, v: Array, stats: BlockStatistics,
                        selection: Selection, *, scale: float, order: int) -> Array:
    """PISA_SPEC section 3 for every query at once; returns `[B, H, T, D]` in q's dtype.

    order 1: exact + zeroth order + global first order; 0: exact + zeroth order;
    -1: exact path only (keep-or-drop).
    """
    t = q.shape[2]
    ct = compute_dtype(q.dtype)
    qf, kf, vf = (x.astype(ct) for x in (q, k, v))
    block_of = jnp.arange(t) // stats.block_size
    chosen = selection.mask()[:, :, block_of, :]             # [B, H, T(query), NT]
    chosen_tokens = chosen[..., block_of]                    # [B, H, T, T]

    a = scale * _einsum("bhtd,bhnd->bhtn", qf, kf)
    a = jnp.where(chosen_tokens, a, -jnp.inf)
    m = a.max(-1)
    if order >= 0:
        bl = scale * _einsum("bhtd,bhjd->bhtj", qf, stats.k_mean.astype(ct))
        bl = jnp.where(chosen, -jnp.inf, bl)
        m = jnp.maximum(m, bl.max(-1))
    ea = jnp.exp(a - m[..., None])
    num = _einsum("bhtn,bhnd->bhtd", ea, vf)
    den = ea.sum(-1)
    if order >= 0:
        eb = jnp.exp(bl - m[..., None])
        g = jnp.sum(eb * jnp.asarray(block_lengths(t, stats.block_size), ct), axis=-1)
        num = num + _einsum("bhtj,bhjd->bhtd", eb, stats.v_sum.astype(ct))
        den = den + g
        if order == 1:
            first = scale * _einsum("bhtd,bhde->bhte", qf, stats.moment.astype(ct))
            num = num + (g / t)[..., None] * first
    return (num / den[..., None]).astype(q.dtype)


def dense_attention(q: Array, k: Array, v: Array, *, scale: float) -> Array:
    """softmax(s q k^T) v over `[B, H, T, D]` inputs, in float32 (float64 for float64)."""
    ct = compute_dtype(q.dtype)
    logits = scale * _einsum("bhtd,bhnd->bhtn", q.astype(ct), k.astype(ct))
    weights = jnp.exp(logits - logits.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    return _einsum("bhtn,bhnd->bhtd", weights, v.astype(ct)).astype(q.dtype)
