"""Piecewise attention forward kernel (PISA_SPEC section 3).

One program per (query block, batch, head). It runs flash attention over the query
block's selected key blocks (the exact path, reading their indices from a list), then a
small attention over every block's (mean key, value sum, length) with the selected
blocks masked out (the zeroth order), both in one online-softmax state, then adds the
global first-order term and writes the output once. The selected set is looked up by a
per-query-block bit row (one bit per key block), O(NT) per query block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pisa_jax._blocks import block_lengths, ceil_div, head_axis, num_blocks, token_axis
from pisa_jax._types import BlockStatistics, Selection
from pisa_jax.kernels._common import LOG2E, inference_only
from pisa_jax.kernels.pallas_triton._common import dot_precision, prepare, token_block_spec
from pisa_jax.kernels.pallas_triton.config import LaunchConfig, attention_config, unsupported


def _kernel(q_ref, k_ref, v_ref, idx_ref, skip_ref, kc_ref, vc_ref, len_ref, mom_ref, o_ref, *,
            block_size: int, num_selected: int, zeroth_chunk: int,
            num_chunks: int, num_tokens: int, scale: float, order: int, precision: dict,
            indices_in_registers: bool):
    q = q_ref[...]
    if indices_in_registers:
        # The whole (padded) index row is read once; each step picks its entry with a
        # select-and-sum, so no key load waits on a memory read of its own index.
        row = idx_ref[...]
        lanes = lax.broadcasted_iota(jnp.int32, row.shape, 0)
        index_at = lambda t: jnp.sum(jnp.where(lanes == t, row, 0))
    else:
        index_at = lambda t: idx_ref[t]
    d = q.shape[-1]
    # Logits live in the exp2 domain: exp(s x.k) = 2^(s log2(e) x.k).
    qk_scale = scale * LOG2E
    partial_last = num_tokens % block_size != 0

    def update(s, values, carry, weights=None):
        # `s` and `m` stay unscaled: the scale enters with the max subtraction, one fused
        # multiply-add per logit.
        acc, m, l, g = carry
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2((m - m_new) * qk_scale)
        p = jnp.exp2(s * qk_scale - (m_new * qk_scale)[:, None])
        mass = jnp.sum(p if weights is None else p * weights, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(values.dtype), values, **precision)
        g = g * alpha + (mass if weights is not None else 0.0)
        return acc, m_new, l * alpha + mass, g

    def exact_one(t, carry):   # one selected block: a contiguous slice of k and v
        start = pl.multiple_of(index_at(t) * block_size, block_size)
        sl = pl.ds(start, block_size)
        s = plgpu.dot(q, k_ref[sl, :], trans_b=True, **precision)
        if partial_last:   # padding keys of the last block must not enter the softmax
            cols = start + lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
            s = jnp.where(cols < num_tokens, s, -jnp.inf)
        return update(s, v_ref[sl, :], carry)

    carry = (jnp.zeros((block_size, d), jnp.float32),
             jnp.full((block_size,), -jnp.inf, jnp.float32),
             jnp.zeros((block_size,), jnp.float32),
             jnp.zeros((block_size,), jnp.float32))
    carry = lax.fori_loop(0, num_selected, exact_one, carry)

    if order >= 0:
        def zeroth(c, carry):
            first = pl.multiple_of(c * zeroth_chunk, zeroth_chunk)
            sl = pl.ds(first, zeroth_chunk)
            s = plgpu.dot(q, kc_ref[sl, :], trans_b=True, **precision)
            # Selected and padding blocks are skipped (the latter have length 0 too).
            blocks = first + lax.broadcasted_iota(jnp.int32, (zeroth_chunk,), 0)
            words = skip_ref[blocks // 32]
            skipped = (lax.shift_right_logical(words, blocks % 32) & 1) != 0
            s = jnp.where(skipped[None, :], -jnp.inf, s)
            return update(s, vc_ref[sl, :], carry, weights=len_ref[sl][None, :])

        carry = lax.fori_loop(0, num_chunks, zeroth, carry)
    acc, _, l, g = carry
    if order == 1:
        # x @ (H / T) with H / T in the input dtype: its rounding (2^-9 relative for bf16)
        # is below that of the bf16 output, a float32 D x D tile would not fit in registers,
        # and the mean moment stays in float16's range where the sum over T tokens may not.
        first = plgpu.dot(q, mom_ref[...], **precision)
        acc = acc + (g * scale)[:, None] * first
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


def _skip_bits(indices: jax.Array, nt: int, nt_pad: int) -> jax.Array:
    """`[B, H, NT, NT_pad / 32]` int32 words: bit `j % 32` of word `j // 32` is set where
    the zeroth order must skip key block `j` (selected, or padding beyond NT).

    Built by one scatter-add of single bits (the selected blocks of a row are distinct,
    so adding is OR-ing): 1 bit per block pair instead of a byte.
    """
    words = nt_pad // 32
    padding = np.zeros(words, np.uint32)
    for j in range(nt, nt_pad):
        padding[j // 32] |= np.uint32(1) << np.uint32(j % 32)
    row_bits = lambda w, b: jnp.asarray(padding.view(np.int32)).at[w].add(b)
    bits = jnp.left_shift(jnp.int32(1), indices % 32)
    return jax.vmap(jax.vmap(jax.vmap(row_bits)))(indices // 32, bits)


def _attention(q, k, v, indices, k_mean, v_sum, moment, *, block_size: int, scale: float,
               order: int, layout: str, interpret: bool, config: LaunchConfig):
    chunk = config.zeroth_chunk
    ta = token_axis(layout)
    b, t, h, d = q.shape[0], q.shape[ta], q.shape[head_axis(layout)], q.shape[-1]
    q, k, v = (prepare(x, block_size, layout) for x in (q, k, v))
    t_pad, d_pad = q.shape[ta], q.shape[-1]
    nt = num_blocks(t, block_size)
    step = max(chunk, 32)   # whole chunks and whole 32-bit words of the skip mask
    nt_pad = ceil_div(nt, step) * step
    num_selected = indices.shape[-1]

    def pad_blocks(x):   # [B, H, NT, D] -> [B, H, NT_pad, D_pad] in the dot dtype
        return jnp.pad(x, ((0, 0), (0, 0), (0, nt_pad - nt), (0, d_pad - d))).astype(q.dtype)

    lengths = jnp.zeros((nt_pad,), jnp.float32).at[:nt].set(block_lengths(t, block_size))
    skip = _skip_bits(indices, nt, nt_pad)
    if config.indices_in_registers:   # a power-of-two row for the kernel's vector load
        width = max(16, pl.next_power_of_2(num_selected))
        indices = jnp.pad(indices, ((0, 0), (0, 0), (0, 0), (0, width - num_selected)))
    mom = jnp.pad(moment / t, ((0, 0), (0, 0), (0, d_pad - d), (0, d_pad - d))).astype(q.dtype)

    grid = (nt, b, h)
    per_head = lambda i, bi, hi: (bi, hi, 0, 0)
    in_specs = [
        token_block_spec(layout, block_size, d_pad, lambda i, bi, hi: (bi, hi, i)),
        token_block_spec(layout, t_pad, d_pad, lambda i, bi, hi: (bi, hi, 0)),
        token_block_spec(layout, t_pad, d_pad, lambda i, bi, hi: (bi, hi, 0)),
        pl.BlockSpec((None, None, None, indices.shape[-1]), lambda i, bi, hi: (bi, hi, i, 0)),
        pl.BlockSpec((None, None, None, nt_pad // 32), lambda i, bi, hi: (bi, hi, i, 0)),
        pl.BlockSpec((None, None, nt_pad, d_pad), per_head),
        pl.BlockSpec((None, None, nt_pad, d_pad), per_head),
        pl.BlockSpec((nt_pad,), lambda i, bi, hi: (0,)),
        pl.BlockSpec((None, None, d_pad, d_pad), per_head),
    ]
    kernel = functools.partial(
        _kernel, block_size=block_size, num_selected=num_selected,
        zeroth_chunk=chunk, num_chunks=nt_pad // chunk,
        indices_in_registers=config.indices_in_registers, num_tokens=t, scale=scale, order=order,
        precision=dot_precision(q.dtype))
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=token_block_spec(layout, block_size, d_pad, lambda i, bi, hi: (bi, hi, i)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name="pisa_piecewise_attention",
    )(q, k, v, indices, skip, pad_blocks(k_mean), pad_blocks(v_sum), lengths, mom)
    if t_pad != t:
        out = lax.slice_in_dim(out, 0, t, axis=ta)
    return out[..., :d] if d_pad != d else out


def piecewise_attention(q, k, v, stats: BlockStatistics, selection: Selection, *, scale: float,
                        order: int, layout: str, interpret: bool,
                        config: LaunchConfig | None = None) -> jax.Array:
    """Kernel version of `pisa_jax.piecewise_attention` (arguments already checked)."""
    reason = unsupported(q.dtype, stats.block_size, q.shape[-1], interpret)
    if reason:   # the public API has checked this already; direct callers get it here
        raise ValueError(f"{reason}: use block_size=64, a half dtype, or "
                         "implementation='reference'")
    config = config or attention_config(q.shape[-1], stats.block_size, q.dtype)
    run = inference_only(functools.partial(
        _attention, block_size=stats.block_size, scale=scale, order=order, layout=layout,
        interpret=interpret, config=config))
    return run(q, k, v, selection.indices, stats.k_mean, stats.v_sum, stats.moment)
