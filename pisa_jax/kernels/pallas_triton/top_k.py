"""Top-k selection kernel: the `k` largest entries of each score row, as column indices.

XLA's `lax.top_k` sorts every row (a segmented sort), which at 75k tokens and 40 heads
is most of the selection's time. Here each program holds a few whole rows in registers
and finds each row's k-th largest value by a bitwise search over the values' order-
preserving integer keys (32 counting passes, no sort), then writes the indices of the
entries above it, and of the entries equal to it by lowest column first until `k` are
taken. That is the same set as `lax.top_k`, whose ties also go to the lower index; the
indices come out in ascending column order instead of by score.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pisa_jax._blocks import ceil_div

# Score elements held per program (rows x padded row length). Fewer rows per program,
# more programs in flight: on the H200 the kernel took 33 / 64 / 890 us with 4096 elements
# and 51 / 101 / 1374 us with 16384 at flux-2048 / seq-32k / wan-720p (benchmarks/RESULTS.md).
_ELEMENTS_PER_PROGRAM = 4 * 1024
_INT_MIN = -(2 ** 31)


def _sortable(x: jax.Array) -> jax.Array:
    """int32 keys whose signed order is the float32 order of `x` (NaN excepted)."""
    bits = lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _kernel(s_ref, o_ref, *, k: int):
    keys = _sortable(s_ref[...])
    rows, width = keys.shape

    def bit(b, prefix):
        # Greedy on the unsigned order (key ^ INT_MIN), most significant bit first: keep
        # a bit where at least k keys are >= the candidate. Ends at the k-th largest key.
        candidate = prefix | jnp.left_shift(jnp.int32(1), 31 - b)
        count = jnp.sum((keys >= (candidate ^ _INT_MIN)[:, None]).astype(jnp.int32), axis=1)
        return jnp.where(count >= k, candidate, prefix)

    kth = lax.fori_loop(0, 32, bit, jnp.zeros((rows,), jnp.int32)) ^ _INT_MIN
    above = keys > kth[:, None]
    tied = keys == kth[:, None]
    room = k - jnp.sum(above.astype(jnp.int32), axis=1)
    take = above | (tied & (jnp.cumsum(tied.astype(jnp.int32), axis=1) <= room[:, None]))
    # Taken columns go to slots 0..k-1 in column order, the others after them: every
    # column has its own slot, so the store is a plain permutation with no masked lanes.
    taken_before = jnp.cumsum(take.astype(jnp.int32), axis=1)
    cols = lax.broadcasted_iota(jnp.int32, (rows, width), 1)
    slot = jnp.where(take, taken_before - 1, k + cols - taken_before)
    row_ids = lax.broadcasted_iota(jnp.int32, (rows, width), 0)
    o_ref[row_ids, slot] = cols


def top_k_indices(scores: jax.Array, k: int, *, interpret: bool) -> jax.Array:
    """`[..., N] -> [..., k]` int32 indices of each row's k largest scores, ascending.

    Rows must hold at least `k` entries that are not -inf or NaN (+inf is fine: forced
    blocks are ranked by it).
    """
    *lead, n = scores.shape
    if not 1 <= k <= n:
        raise ValueError(f"top_k_indices: expected 1 <= k <= {n} (row length); got k = {k}")
    width = max(16, pl.next_power_of_2(n))
    rows_per_program = max(1, _ELEMENTS_PER_PROGRAM // width)
    flat = scores.reshape(-1, n).astype(jnp.float32)
    m = flat.shape[0]
    rows_per_program = min(rows_per_program, max(1, pl.next_power_of_2(m)))
    m_pad = ceil_div(m, rows_per_program) * rows_per_program
    flat = jnp.pad(flat, ((0, m_pad - m), (0, width - n)), constant_values=-jnp.inf)
    out = pl.pallas_call(
        functools.partial(_kernel, k=k),
        grid=(m_pad // rows_per_program,),
        in_specs=[pl.BlockSpec((rows_per_program, width), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((rows_per_program, width), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((m_pad, width), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=8 if width >= 1024 else 4,
                                             num_stages=1),
        interpret=interpret,
        name="pisa_top_k",
    )(flat)
    return out[:m, :k].reshape(*lead, k)
