"""Exact single-head softmax attention taken a chunk of query rows at a time, for the
per-image / per-frame attention of the autoencoders' mid blocks (FLUX.1, Wan2.1), whose
full score matrix at high resolution would not fit next to the activations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Scores held at once by the mid-block attention (float32 elements): 2^26 = 256 MiB,
# small next to the decoder's full-resolution activations.
SCORE_BUDGET = 1 << 26


def check_chunk(attention_chunk) -> int | None:
    """`attention_chunk` (query rows per step of the mid-block attention) if it is a
    positive int or None; ValueError otherwise."""
    if attention_chunk is not None and (isinstance(attention_chunk, bool)
                                        or not isinstance(attention_chunk, int)
                                        or attention_chunk < 1):
        raise ValueError(f"attention_chunk must be a positive int or None; got "
                         f"{attention_chunk!r}")
    return attention_chunk


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int) -> jax.Array:
    """Single-head softmax attention `[B, T, C]` -> `[B, T, C]`, scale `C^-1/2`.

    Queries are taken `chunk` rows at a time (a sequential `lax.map`), so at most
    `B x chunk x T` scores exist at once; each row's softmax still sees every key at
    once, so the math is that of unchunked attention.
    Scores and softmax in float32, products accumulated in float32.
    """
    b, t, c = q.shape
    scale = c ** -0.5

    def rows(qc):
        s = jnp.einsum("bqc,bkc->bqk", qc, k, preferred_element_type=jnp.float32)
        p = jax.nn.softmax(s * scale, axis=-1)
        o = jnp.einsum("bqk,bkc->bqc", p.astype(v.dtype), v,
                       preferred_element_type=jnp.float32)
        return o.astype(q.dtype)

    if chunk >= t:
        return rows(q)
    n = -(-t // chunk)
    qp = jnp.pad(q, ((0, 0), (0, n * chunk - t), (0, 0)))     # padded rows are dropped
    out = jax.lax.map(rows, qp.reshape(b, n, chunk, c).swapaxes(0, 1))
    return out.swapaxes(0, 1).reshape(b, n * chunk, c)[:, :t]


def default_chunk(batch: int, positions: int) -> int:
    """Query rows per step so that `batch x chunk x positions` scores fit SCORE_BUDGET."""
    return max(1, min(positions, SCORE_BUDGET // max(1, batch * positions)))
