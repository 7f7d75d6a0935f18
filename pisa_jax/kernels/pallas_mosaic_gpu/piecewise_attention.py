"""Piecewise attention forward kernel on Pallas Mosaic GPU (Hopper, PISA_SPEC section 3).

One CTA per (pair of query blocks, head, batch). Each of its two compute warpgroups owns
one query block and streams its own tiles through shared memory: first the key/value
blocks of its selection (the exact path; the tensor memory accelerator copies block
`indices[t]`, several stages in flight), then the block-mean keys and values of every
key block in chunks of `block_size` (the zeroth order; selected and padding blocks are
masked by a precomputed additive row). Both feed one online softmax; the global first
order `(G / T) s x H` is one more matrix product at the end, and the output is written
once. Products run on wgmma with float32 accumulators.

The zeroth order is folded into the same form as the exact path: the logit of block `j`
gets `log2(len_j)` added, so its weight `exp(b_j) len_j` multiplies the block-mean value
`vc_j / len_j`; this keeps every weight <= 1 after the max subtraction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pisa_jax._blocks import (block_lengths, ceil_div, head_axis, num_blocks, pad_tokens,
                             token_axis)
from pisa_jax._types import BlockStatistics, Selection
from pisa_jax.kernels._common import LOG2E, inference_only, shared_memory_per_block
from pisa_jax.kernels.pallas_mosaic_gpu import wide_blocks
from pisa_jax.kernels.pallas_mosaic_gpu._softmax import (by_stream, finish, initial_carry,
                                                        key_product, softmax_step, tile_logits,
                                                        value_product, wait_for_values)
from pisa_jax.kernels.pallas_mosaic_gpu.config import MosaicConfig, default_config, unsupported

# Index rows travel as [K / 32, 32] and mask rows as [NT / 64, 64]: a copy box may not be
# longer than 256 along any axis, and each warpgroup's row starts 128-byte aligned.
_INDEX_ROW = 32
_MASK_ROW = 64


def _kernel(q_ref, k_ref, v_ref, idx_ref, kc_ref, vm_ref, mask_ref, mom_ref, o_ref, *scratch,
            block_size: int, num_selected: int, num_chunks: int, nt: int, num_tokens: int,
            scale: float, order: int, layout: str, stages: int, groups: int, ping_pong: bool):
    (q_smem, k_smem, v_smem, idx_smem, mask_smem, mom_smem,
     k_bar, v_bar, q_bar, idx_bar, mask_bar, mom_bar, turn_bar) = scratch
    bs = block_size
    dtype = q_smem.dtype
    d = q_smem.shape[-1]
    bi, hi = lax.axis_index("batch"), lax.axis_index("heads")
    wg = lax.axis_index("wg")
    block = lax.axis_index("qpair") * groups + wg
    # With ping-pong both warpgroups must run every step (they meet at a barrier twice per
    # step): a warpgroup past the last query block recomputes it and writes nothing.
    qb = jnp.minimum(block, nt - 1) if ping_pong else block
    total = num_selected + (num_chunks if order >= 0 else 0)
    qk_scale = scale * LOG2E

    def tokens(ref, start):   # the [bs, D] slab of (batch, head) from token `start`
        if layout == "bthd":
            return ref.at[bi, pl.ds(start, bs), hi]
        return ref.at[bi, hi, pl.ds(start, bs)]

    if order == 1:   # one copy of H / T per CTA, read by both warpgroups at the end
        @pl.when(wg == 0)
        def _():
            plgpu.copy_gmem_to_smem(mom_ref.at[bi, hi], mom_smem, mom_bar.at[0])

    def turn():   # both warpgroups meet here (ping-pong only)
        plgpu.barrier_arrive(turn_bar)
        plgpu.barrier_wait(turn_bar)

    def compute():
        qs, ks, vs = q_smem.at[wg], k_smem.at[wg], v_smem.at[wg]
        idx_row = idx_smem.at[wg]
        slot_bar = lambda ref, slot: ref.at[wg * stages + slot]
        plgpu.copy_gmem_to_smem(idx_ref.at[bi, hi, qb], idx_row, idx_bar.at[wg])
        plgpu.copy_gmem_to_smem(tokens(q_ref, qb * bs), qs, q_bar.at[wg])
        if order >= 0:
            plgpu.copy_gmem_to_smem(mask_ref.at[bi, hi, qb], mask_smem.at[wg], mask_bar.at[wg])
        plgpu.barrier_wait(idx_bar.at[wg])

        def selected(t):
            return idx_row[t // _INDEX_ROW, t % _INDEX_ROW]

        def issue(step, slot):
            def exact():
                start = selected(step) * bs
                plgpu.copy_gmem_to_smem(tokens(k_ref, start), ks.at[slot], slot_bar(k_bar, slot))
                plgpu.copy_gmem_to_smem(tokens(v_ref, start), vs.at[slot], slot_bar(v_bar, slot))

            def zeroth():
                rows = pl.ds((step - num_selected) * bs, bs)
                plgpu.copy_gmem_to_smem(kc_ref.at[bi, hi, rows], ks.at[slot], slot_bar(k_bar, slot))
                plgpu.copy_gmem_to_smem(vm_ref.at[bi, hi, rows], vs.at[slot], slot_bar(v_bar, slot))

            by_stream(step, num_selected, order, exact, zeroth)

        for s in range(min(stages, total)):
            issue(s, s)

        cols = plgpu.broadcasted_iota(jnp.int32, (bs, bs), 1, layout=plgpu.Layout.WGMMA)

        def step(t, carry, zeroth: bool):
            slot = lax.rem(t, stages)
            plgpu.barrier_wait(slot_bar(k_bar, slot))

            # With ping-pong the other warpgroup's products start after ours are issued.
            z = key_product(qs, ks.at[slot], (bs, bs), turn if ping_pong else None) * qk_scale
            c = t - num_selected if zeroth else None   # the zeroth-order chunk
            z = tile_logits(z, cols, zeroth=zeroth, chunk=c,
                            mask_row=mask_smem.at[wg, c] if zeroth else None,
                            key_block=lambda: selected(t), block=bs, nt=nt,
                            num_tokens=num_tokens)
            p16, (acc, m_new, l, g) = softmax_step(z, carry, zeroth=zeroth, dtype=dtype)
            wait_for_values(slot_bar(v_bar, slot), turn_bar, ping_pong)
            acc = value_product(acc, p16, vs.at[slot])
            # The slot's tiles have been read: refill it with the tiles `stages` steps on.
            nxt = t + stages
            pl.when(nxt < total)(lambda: issue(nxt, slot))
            return acc, m_new, l, g

        carry = initial_carry(bs, d)
        plgpu.barrier_wait(q_bar.at[wg])
        if ping_pong:   # warpgroup 1 starts half a step behind warpgroup 0
            pl.when(wg == 1)(turn)
        carry = lax.fori_loop(0, num_selected, functools.partial(step, zeroth=False), carry)
        if order >= 0:
            plgpu.barrier_wait(mask_bar.at[wg])
            carry = lax.fori_loop(num_selected, total, functools.partial(step, zeroth=True),
                                  carry)
        if ping_pong:
            pl.when(wg == 0)(turn)
        finish(carry, qs, mom_smem, mom_bar, scale=scale, order=order)

        @pl.when(block < nt)
        def _():
            plgpu.copy_smem_to_gmem(qs, tokens(o_ref, qb * bs))
            plgpu.wait_smem_to_gmem(0)

    if ping_pong:
        compute()
    else:
        pl.when(block < nt)(compute)


def _zeroth_mask(indices: jax.Array, nt: int, nt_pad: int, dtype, row: int) -> jax.Array:
    """`[B, H, NT, NT_pad / row, row]`: 0 where the zeroth order takes key block `j`, -inf
    where it must skip it (selected for the exact path, or padding beyond NT)."""
    b, h = indices.shape[:2]
    keep = jnp.zeros((b, h, nt, nt_pad), dtype).at[..., nt:].set(-jnp.inf)
    mask = jnp.put_along_axis(keep, indices, jnp.asarray(-jnp.inf, dtype), axis=-1,
                              inplace=False)
    return mask.reshape(b, h, nt, nt_pad // row, row)


def _head_dim(d: int) -> int:
    return 64 if d <= 64 else 128


# Jitted so that every call with the same shapes and options reuses one trace: the call
# sites of a model's attention layers then lower to one Mosaic GPU kernel, compiled once.
# Traced afresh at each call site, each was lowered and compiled on its own: 0.5 s + 1.2 s
# per layer on an H200, about 100 s of a FLUX.1 forward's compile time.
@functools.partial(jax.jit, static_argnames=("block_size", "scale", "order", "layout", "config"))
def _attention(q, k, v, indices, k_mean, v_sum, moment, *, block_size: int, scale: float,
               order: int, layout: str, config: MosaicConfig | None):
    ta = token_axis(layout)
    b, t, h, d = q.shape[0], q.shape[ta], q.shape[head_axis(layout)], q.shape[-1]
    dtype = q.dtype
    d_pad = _head_dim(d)
    nt = num_blocks(t, block_size)
    row = block_size   # mask values per zeroth-order chunk: one chunk per tile
    nt_pad = ceil_div(nt, row) * row
    num_selected = indices.shape[-1]
    k_pad = ceil_div(num_selected, _INDEX_ROW) * _INDEX_ROW
    itemsize = jnp.dtype(dtype).itemsize
    limit = shared_memory_per_block()
    if block_size == wide_blocks.BLOCK:   # its own kernel: one query block at a time
        config = wide_blocks.resolve_config(config, d_pad, itemsize, num_selected, nt_pad,
                                            limit)
        stages = config.stages
        smem = wide_blocks.shared_memory_bytes(stages, d_pad, itemsize, num_selected, nt_pad,
                                               config.persistent)
        way_out = "fewer stages, persistent=False"
    else:
        config = config or default_config(block_size, d_pad, itemsize, k_pad, nt_pad)
        stages, groups = config.stages, config.query_blocks_per_cta
        smem = config.shared_memory_bytes(block_size, d_pad, itemsize, k_pad, nt_pad)
        way_out = "fewer stages, one query block per CTA"
    if smem > limit:
        raise ValueError(f"{config} needs about {smem} bytes of shared memory at block size "
                         f"{block_size}, head dim {d_pad}, {num_selected} selected and {nt} "
                         f"key blocks; the device has {limit}: use {way_out} or "
                         f"implementation='triton'")

    def prepare(x):   # zero padding is exact: padded keys are masked, padded channels add 0
        x = pad_tokens(x, block_size, layout)
        return jnp.pad(x, [(0, 0)] * 3 + [(0, d_pad - d)]) if d_pad != d else x

    q, k, v = prepare(q), prepare(k), prepare(v)
    idx = jnp.pad(indices, ((0, 0), (0, 0), (0, 0), (0, k_pad - num_selected)))
    idx = idx.reshape(b, h, nt, k_pad // _INDEX_ROW, _INDEX_ROW)
    if order >= 0:
        lengths = jnp.asarray(block_lengths(t, block_size), jnp.float32)[:, None]
        blocks = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, nt_pad - nt),
                                       (0, d_pad - d))).astype(dtype)
        kc, vm = blocks(k_mean), blocks(v_sum / lengths)
        mask = _zeroth_mask(indices, nt, nt_pad, dtype, row)
    else:   # the zeroth order is not run: small placeholders keep one kernel signature
        kc = vm = jnp.zeros((1, 1, block_size, d_pad), dtype)
        mask = jnp.zeros((1, 1, 1, 1, row), dtype)
    if order == 1:
        mom = jnp.pad(moment / t, ((0, 0), (0, 0), (0, d_pad - d), (0, d_pad - d))).astype(dtype)
    else:
        mom = jnp.zeros((1, 1, d_pad, d_pad), dtype)

    if block_size == wide_blocks.BLOCK:
        out = wide_blocks.attention_call(
            q, k, v, idx, kc, vm, mask, mom, num_selected=num_selected, nt=nt, num_tokens=t,
            scale=scale, order=order, layout=layout, stages=stages,
            ping_pong=config.ping_pong, persistent=config.persistent)
    else:
        out = _call(q, k, v, idx, kc, vm, mask, mom, block_size=block_size,
                    num_selected=num_selected, nt=nt, nt_pad=nt_pad, t=t, scale=scale,
                    order=order, layout=layout, stages=stages, groups=groups,
                    ping_pong=config.ping_pong and groups == 2)
    if out.shape[ta] != t:
        out = lax.slice_in_dim(out, 0, t, axis=ta)
    return out[..., :d] if d_pad != d else out


def _call(q, k, v, idx, kc, vm, mask, mom, *, block_size, num_selected, nt, nt_pad, t,
          scale, order, layout, stages, groups, ping_pong):
    """The block-64 kernel on prepared inputs (see `_attention`)."""
    b, h, d_pad, dtype = q.shape[0], idx.shape[1], q.shape[-1], q.dtype
    k_pad = idx.shape[-2] * idx.shape[-1]
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = functools.partial(
        _kernel, block_size=block_size, num_selected=num_selected,
        num_chunks=nt_pad // block_size, nt=nt, num_tokens=t, scale=scale, order=order,
        layout=layout, stages=stages, groups=groups, ping_pong=ping_pong)

    def entry(*refs):
        pl.run_scoped(
            lambda *scratch: kernel(*refs, *scratch),
            plgpu.SMEM((groups, block_size, d_pad), dtype, transforms=swizzled),
            plgpu.SMEM((groups, stages, block_size, d_pad), dtype, transforms=swizzled),
            plgpu.SMEM((groups, stages, block_size, d_pad), dtype, transforms=swizzled),
            plgpu.SMEM((groups, k_pad // _INDEX_ROW, _INDEX_ROW), jnp.int32),
            plgpu.SMEM((groups, nt_pad // _MASK_ROW if order >= 0 else 1, _MASK_ROW), dtype),
            plgpu.SMEM((d_pad, d_pad) if order == 1 else (8, 64), dtype, transforms=swizzled),
            plgpu.Barrier(num_barriers=groups * stages),
            plgpu.Barrier(num_barriers=groups * stages),
            plgpu.Barrier(num_barriers=groups),
            plgpu.Barrier(num_barriers=groups),
            plgpu.Barrier(num_barriers=groups),
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_arrivals=groups),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(ceil_div(nt, groups), h, b),
        grid_names=("qpair", "heads", "batch"),
        num_threads=groups,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, idx, kc, vm, mask, mom)


def piecewise_attention(q, k, v, stats: BlockStatistics, selection: Selection, *, scale: float,
                        order: int, layout: str, interpret: bool = False,
                        config: MosaicConfig | None = None) -> jax.Array:
    """Mosaic GPU version of `pisa_jax.piecewise_attention` (arguments already checked).

    The same contract as the Triton kernel's wrapper: q, k, v `[B, T, H, D]` ("bthd") or
    `[B, H, T, D]` ("bhtd") in bfloat16 or float16, any T; statistics and selection as
    the public API makes them. Needs a Hopper GPU (sm_90a). There is no interpret mode:
    Pallas' Mosaic GPU interpreter (jax 0.11) cannot run wgmma accumulators.

    Raises:
      ValueError for interpret=True, or a dtype, block size or head dim the kernel does
      not take.
    """
    if interpret:
        raise ValueError("the Mosaic GPU attention kernel has no interpret mode; use "
                         "implementation='triton' (interpret=True) or 'reference' off the GPU")
    reason = unsupported(q.dtype, stats.block_size, q.shape[-1])
    if reason:   # the public API has checked this already; direct callers get it here
        raise ValueError(f"{reason}: use implementation='triton'")
    if stats.block_size == wide_blocks.BLOCK and config is not None and \
            config.query_blocks_per_cta != 2:
        raise ValueError(f"at block size {wide_blocks.BLOCK} one query block takes both compute "
                         f"warpgroups of a CTA, so MosaicConfig takes only `stages`, "
                         f"`ping_pong` and `persistent` there; got {config}")
    if stats.block_size != wide_blocks.BLOCK and config is not None and config.persistent:
        raise ValueError(f"MosaicConfig.persistent is a block size {wide_blocks.BLOCK} option; "
                         f"got block size {stats.block_size}")
    run = inference_only(functools.partial(
        _attention, block_size=stats.block_size, scale=scale, order=order, layout=layout,
        config=config))
    return run(q, k, v, selection.indices, stats.k_mean, stats.v_sum, stats.moment)
