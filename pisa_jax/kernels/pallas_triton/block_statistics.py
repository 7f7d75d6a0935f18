"""Block statistics kernel: one pass over q, k, v (PISA_SPEC section 1).

Each program owns one (batch, head) and a run of consecutive blocks. Per block it
writes the mean query, mean key, value sum and (optionally) `||H_j||_F`; the block's
`D x D` moment `H_j` lives only in registers and is added to the program's running
sum, so the per-block moments are never stored. The few per-program partial sums are
added up by XLA afterwards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pisa_jax._blocks import ceil_div, head_axis, num_blocks, token_axis
from pisa_jax._types import BlockStatistics
from pisa_jax.kernels._common import inference_only, multiprocessor_count
from pisa_jax.kernels.pallas_triton._common import dot_precision, prepare, token_block_spec
from pisa_jax.kernels.pallas_triton.config import LaunchConfig, statistics_config

# One program per multiprocessor (read from the device) where that keeps the runs short,
# and runs of at most 96 blocks beyond (measured on the H200, benchmarks/RESULTS.md).
_MAX_BLOCKS_PER_PROGRAM = 96
# A few blocks per program amortise writing its D x D partial moment.
_MIN_BLOCKS_PER_PROGRAM = 4


def default_blocks_per_program(num_blocks: int, batch_heads: int) -> int:
    """How many consecutive blocks one program reduces, by the rule above."""
    share = ceil_div(num_blocks * batch_heads, multiprocessor_count())
    return max(_MIN_BLOCKS_PER_PROGRAM, min(_MAX_BLOCKS_PER_PROGRAM, share))


def _kernel(q_ref, k_ref, v_ref, qm_ref, km_ref, vs_ref, norm_ref, part_ref, *,
            block_size: int, blocks_per_program: int, num_tokens: int, nt: int,
            with_norms: bool, precision: dict):
    first = pl.program_id(2) * blocks_per_program
    count = jnp.minimum(blocks_per_program, nt - first)
    d = q_ref.shape[-1]
    rows = lax.broadcasted_iota(jnp.int32, (block_size, 1), 0)

    def load(j):
        sl = pl.ds(pl.multiple_of(j * block_size, block_size), block_size)
        return q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]

    def reduce(j, q, k, v, moment):
        length = jnp.minimum(block_size, num_tokens - j * block_size)
        # Padding rows are zeros: sums are right, means divide by the true length.
        inv_len = 1.0 / length.astype(jnp.float32)
        k_mean = jnp.sum(k.astype(jnp.float32), axis=0) * inv_len
        qm_ref[pl.ds(j, 1), :] = (jnp.sum(q.astype(jnp.float32), axis=0) * inv_len)[None, :]
        km_ref[pl.ds(j, 1), :] = k_mean[None, :]
        vs_ref[pl.ds(j, 1), :] = jnp.sum(v.astype(jnp.float32), axis=0)[None, :]
        centred = jnp.where(rows < length, k.astype(jnp.float32) - k_mean[None, :], 0.0)
        h_j = plgpu.dot(centred.astype(v.dtype), v, trans_a=True, **precision)   # [D, D] f32
        if with_norms:
            norm_ref[pl.ds(j, 1)] = jnp.sqrt(jnp.sum(h_j * h_j))[None]
        return moment + h_j

    moment = lax.fori_loop(0, count, lambda i, m: reduce(first + i, *load(first + i), m),
                           jnp.zeros((d, d), jnp.float32))
    part_ref[...] = moment


def _statistics(q, k, v, *, block_size: int, with_norms: bool, layout: str, interpret: bool,
                config: LaunchConfig):
    ta = token_axis(layout)
    b, t, h, d = q.shape[0], q.shape[ta], q.shape[head_axis(layout)], q.shape[-1]
    q, k, v = (prepare(x, block_size, layout) for x in (q, k, v))
    t_pad, d_pad = q.shape[ta], q.shape[-1]
    nt = num_blocks(t, block_size)
    per_program = min(config.blocks_per_program or default_blocks_per_program(nt, b * h), nt)
    chunks = ceil_div(nt, per_program)

    whole = token_block_spec(layout, t_pad, d_pad, lambda bi, hi, c: (bi, hi, 0))
    rows_spec = pl.BlockSpec((None, None, nt, d_pad), lambda bi, hi, c: (bi, hi, 0, 0))
    f32 = jnp.float32
    out_shape = [
        jax.ShapeDtypeStruct((b, h, nt, d_pad), f32),        # q_mean
        jax.ShapeDtypeStruct((b, h, nt, d_pad), f32),        # k_mean
        jax.ShapeDtypeStruct((b, h, nt, d_pad), f32),        # v_sum
        jax.ShapeDtypeStruct((b, h, nt), f32),               # ||H_j||_F
        jax.ShapeDtypeStruct((b, h, chunks, d_pad, d_pad), f32),  # partial moments
    ]
    out_specs = [
        rows_spec, rows_spec, rows_spec,
        pl.BlockSpec((None, None, nt), lambda bi, hi, c: (bi, hi, 0)),
        pl.BlockSpec((None, None, None, d_pad, d_pad), lambda bi, hi, c: (bi, hi, c, 0, 0)),
    ]
    kernel = functools.partial(_kernel, block_size=block_size, blocks_per_program=per_program,
                               num_tokens=t, nt=nt, with_norms=with_norms,
                               precision=dot_precision(q.dtype))
    qm, km, vs, norms, parts = pl.pallas_call(
        kernel,
        grid=(b, h, chunks),
        in_specs=[whole, whole, whole],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name="pisa_block_statistics",
    )(q, k, v)
    moment = parts.sum(axis=2)
    return qm[..., :d], km[..., :d], vs[..., :d], moment[..., :d, :d], norms


def block_statistics(q, k, v, *, block_size: int, with_norms: bool, layout: str,
                     interpret: bool, config: LaunchConfig | None = None) -> BlockStatistics:
    """Kernel version of `pisa_jax.block_statistics` (arguments already checked)."""
    config = config or statistics_config(q.shape[-1], block_size, q.dtype)
    run = inference_only(functools.partial(
        _statistics, block_size=block_size, with_norms=with_norms, layout=layout,
        interpret=interpret, config=config))
    qm, km, vs, moment, norms = run(q, k, v)
    return BlockStatistics(q_mean=qm, k_mean=km, v_sum=vs, moment=moment,
                           moment_norms=norms if with_norms else None,
                           num_tokens=q.shape[token_axis(layout)],
                           block_size=block_size)
