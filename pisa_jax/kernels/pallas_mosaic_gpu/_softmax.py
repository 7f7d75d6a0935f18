"""What both Mosaic GPU attention kernels (block 64 and block 128) do per tile of keys
and at the end, written once: the tile's two products, the turn-taking around them, the
logit adjustments of the zeroth order and of a partial last block, the online-softmax
update, and the first order plus normalisation.

Logits are in base 2 (`scale * log2(e)` folded in). `carry` is `(acc, m, l, g)`: the
`[rows, D]` accumulator, the running max, the softmax mass, and the zeroth order's share
of the mass (the first order's weight), each `[rows]`.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def initial_carry(rows: int, d: int) -> tuple:
    """Zero accumulator and mass, max at -inf, in the wgmma register layouts."""
    row = plgpu.Layout.WGMMA.reduce(1)
    return (plgpu.layout_cast(jnp.zeros((rows, d), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32), row),
            plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), row),
            plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), row))


def by_stream(step, num_selected: int, order: int, exact: Callable[[], None],
              zeroth: Callable[[], None]) -> None:
    """Runs `exact()` for a step among the first `num_selected` (the selected key blocks)
    and `zeroth()` beyond them (the zeroth-order chunks): a Python choice where `step` is
    known when tracing, none with order -1 (exact steps only), otherwise both guarded."""
    if isinstance(step, int):
        (exact if step < num_selected else zeroth)()
    elif order < 0:
        exact()
    else:
        pl.when(step < num_selected)(exact)
        pl.when(step >= num_selected)(zeroth)


def key_product(qs, k_tile, shape: tuple, after_issue: Callable[[], None] | None = None):
    """`qs k_tile^T` on wgmma into a float32 accumulator of `shape`; `after_issue` (the
    ping-pong turn) runs between issuing the product and reading it."""
    def qk(acc_ref):
        plgpu.wgmma(acc_ref, qs, k_tile.transpose((1, 0)))
        if after_issue is not None:
            after_issue()
        return acc_ref[...]

    return pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32))


def wait_for_values(v_ready, turn_bar, ping_pong: bool) -> None:
    """Waits for the tile's values; with ping-pong also for the other warpgroup to have
    issued its products (this one's softmax is done: it says so first)."""
    if ping_pong:
        plgpu.barrier_arrive(turn_bar)
        plgpu.barrier_wait(v_ready)
        plgpu.barrier_wait(turn_bar)
    else:
        plgpu.barrier_wait(v_ready)


def value_product(acc: jax.Array, p16: jax.Array, v_tile) -> jax.Array:
    """`acc + p16 v_tile` on wgmma."""
    def pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_tile)

    return pl.run_state(pv)(plgpu.ACC.init(acc))


def tile_logits(z: jax.Array, cols: jax.Array, *, zeroth: bool, chunk, mask_row,
                key_block: Callable[[], jax.Array], block: int, nt: int,
                num_tokens: int) -> jax.Array:
    """The logits `z` `[rows, block]` of one tile, adjusted.

    Zeroth-order tile `chunk` (block means of key blocks `chunk * block ...`): plus the
    additive mask row `mask_row` (a ref: -inf on selected and padding blocks) and
    `log2(len_j)`, the short last block weighing its own length. Exact tile of key block
    `key_block()` (called only when needed): the last block's padding keys at -inf.
    `cols` is the column index in the wgmma layout.
    """
    partial_last = num_tokens % block != 0
    if zeroth:
        bias = plgpu.load(mask_row, layout=plgpu.Layout.WGMMA.reduce(0))
        z = z + lax.broadcast_in_dim(bias.astype(jnp.float32), z.shape, [1])
        z = z + math.log2(block)
        if partial_last:
            last_len = num_tokens - (nt - 1) * block
            z = jnp.where(cols + chunk * block == nt - 1,
                          z + (math.log2(last_len) - math.log2(block)), z)
    elif partial_last:
        z = jnp.where(cols + key_block() * block < num_tokens, z, -jnp.inf)
    return z


def softmax_step(z: jax.Array, carry: tuple, *, zeroth: bool, dtype) -> tuple:
    """One tile's online-softmax update: `(p, carry)`, the probabilities `p` in `dtype`
    for the value product and the carry with the accumulator already rescaled."""
    acc, m, l, g = carry
    m_new = jnp.maximum(m, z.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(z - lax.broadcast_in_dim(m_new, z.shape, [0]))
    mass = p.sum(axis=1)
    l = l * alpha + mass
    g = g * alpha + mass if zeroth else g * alpha
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    return p.astype(dtype), (acc, m_new, l, g)


def finish(carry: tuple, qs, mom_smem, mom_bar, *, scale: float, order: int) -> None:
    """Adds the global first order `g * s * (q H / T)` (order 1), normalises by the mass,
    and stores the result into the query rows' buffer `qs`, ready to be copied out."""
    acc, _, l, g = carry
    rows, d = acc.shape
    if order == 1:
        plgpu.barrier_wait(mom_bar.at[0])

        def first_order(acc_ref):
            plgpu.wgmma(acc_ref, qs, mom_smem)
            return acc_ref[...]

        first = pl.run_scoped(first_order, plgpu.ACC((rows, d), jnp.float32))
        acc = acc + lax.broadcast_in_dim(g * scale, (rows, d), [0]) * first
    acc = acc / lax.broadcast_in_dim(l, (rows, d), [0])
    qs[...] = acc.astype(qs.dtype)
    plgpu.commit_smem()
