"""The Mosaic GPU attention kernel for block size 128 (PISA_SPEC section 3).

A CTA works on one (query block, head, batch) item at a time: one item per CTA, or, on
a persistent grid (below, the default), one CTA per multiprocessor walking several. A
128-row query block is more than one wgmma (64 rows) can take, so the CTA's two compute
warpgroups take 64 rows each, and both read the same key/value tiles: the selected blocks of their query block, then the block-mean keys
and values in chunks of 128 blocks. A third, producer warpgroup copies those tiles (the
tensor memory accelerator, `stages` slots of 128 keys and values) and refills a slot
once both compute warpgroups have released it. Each tile does twice the work of a
64-row query block for the same bytes, as in dense flash attention.

With `MosaicConfig.ping_pong` the compute warpgroups take turns on the tensor cores: one
runs its softmax while the other's products run, warpgroup 1 half a step behind. At head
dim 128 only 2 stages fit (3 would need 235 KB of shared memory with the barriers'
alignment; the device has 227 KB); at head dim 64, up to 5.

The math is the block-64 kernel's (`piecewise_attention`): one online softmax over the
exact and zeroth-order tiles, the zeroth order's logits shifted by `log2(len_j)`, the
global first order as one product at the end, one write.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pisa_jax._blocks import ceil_div
from pisa_jax.kernels._common import LOG2E, multiprocessor_count
from pisa_jax.kernels.pallas_mosaic_gpu.config import MosaicConfig
from pisa_jax.kernels.pallas_mosaic_gpu._softmax import (by_stream, finish, initial_carry,
                                                        key_product, softmax_step, tile_logits,
                                                        value_product, wait_for_values)

BLOCK = 128             # tokens per query / key block
ROWS = 64               # query rows per compute warpgroup (one wgmma)
GROUPS = BLOCK // ROWS  # compute warpgroups per CTA
INDEX_ROW = 32          # selected indices travel as [K / 32, 32]
# Registers per thread with two compute warpgroups and the producer (64K per SM).
_COMPUTE_REGISTERS, _PRODUCER_REGISTERS = 232, 40
# Without a MosaicConfig the compute warpgroups take turns and the grid is persistent: on
# the H200 the exact path ran 4-8% faster with turns, and 13-16% faster again with the
# persistent grid, at flux-2048 and seq-32k (benchmarks/RESULTS.md).
DEFAULT_PING_PONG = True
DEFAULT_PERSISTENT = True


def shared_memory_bytes(stages: int, head_dim: int, itemsize: int, num_selected: int,
                        padded_blocks: int, persistent: bool = False) -> int:
    """Shared memory one CTA asks for: query rows, the tile ring, index and mask rows
    (two of each on a persistent grid), the moment, and room for barriers and
    alignment."""
    tile = BLOCK * head_dim * itemsize
    rows = (1 + persistent) * (4 * ceil_div(num_selected, INDEX_ROW) * INDEX_ROW
                               + itemsize * padded_blocks)
    return (1 + 2 * stages) * tile + rows + head_dim * head_dim * itemsize + 4096


def resolve_config(config: MosaicConfig | None, head_dim: int, itemsize: int,
                   num_selected: int, padded_blocks: int, limit: int) -> MosaicConfig:
    """The given config, or the default: turns on a persistent grid, 2 stages; one query
    block per CTA where the persistent grid's second index and mask rows do not fit
    (past about 0.77M tokens at density 0.15)."""
    if config is not None:
        return config
    config = MosaicConfig(stages=2, ping_pong=DEFAULT_PING_PONG, persistent=DEFAULT_PERSISTENT)
    if config.persistent and shared_memory_bytes(config.stages, head_dim, itemsize,
                                                 num_selected, padded_blocks, True) > limit:
        config = MosaicConfig(stages=2, ping_pong=DEFAULT_PING_PONG, persistent=False)
    return config


def _kernel(q_ref, k_ref, v_ref, idx_ref, kc_ref, vm_ref, mask_ref, mom_ref, o_ref, *scratch,
            num_selected: int, num_chunks: int, nt: int, num_tokens: int, scale: float,
            order: int, layout: str, stages: int, ping_pong: bool,
            persistent: tuple[int, int, int, int] | None):
    (q_smem, k_smem, v_smem, idx_smem, mask_smem, mom_smem,
     k_ready, v_ready, k_free, v_free, q_bar, idx_bar, mask_bar, mom_bar, turn_bar,
     *item_bars) = scratch
    dtype = q_smem.dtype
    d = q_smem.shape[-1]
    if not persistent:   # one item per CTA, from the grid
        grid_item = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("blocks")
    wg = lax.axis_index("wg")
    total = num_selected + (num_chunks if order >= 0 else 0)
    qk_scale = scale * LOG2E

    if persistent:   # this CTA's items in turn: query block fastest, then head, batch
        heads, items, ctas, rounds = persistent
        idx_free, mom_free = item_bars
        cta = lax.axis_index("cta")

        def item(r):   # (batch, head, query block, row buffer, whether it exists)
            w = cta + r * ctas
            return w // (nt * heads), (w // nt) % heads, w % nt, lax.rem(r, 2), w < items

        def each_item(body):
            @pl.loop(0, rounds)
            def _(r):
                bi, hi, qb, buf, valid = item(r)
                pl.when(valid)(lambda: body(r, bi, hi, qb, buf))
    else:
        def each_item(body):
            body(0, *grid_item, 0)

    def streamed(r, t):   # tiles this CTA has streamed before tile t of its round r
        return t if isinstance(r, int) and r == 0 else r * total + t

    def rows_of(ref, buf):   # an index / mask row buffer (two with `persistent`)
        return ref.at[buf] if persistent else ref

    def turn():   # both compute warpgroups meet here (ping-pong only)
        plgpu.barrier_arrive(turn_bar)
        plgpu.barrier_wait(turn_bar)

    def tokens(ref, bi, hi, start, rows):   # `rows` tokens of (batch, head) from `start`
        if layout == "bthd":
            return ref.at[bi, pl.ds(start, rows), hi]
        return ref.at[bi, hi, pl.ds(start, rows)]

    def selected(idx, t):
        return idx[t // INDEX_ROW, t % INDEX_ROW]

    @pl.when(wg == GROUPS)
    def _producer():
        plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")

        def one_item(r, bi, hi, qb, buf):
            idx = rows_of(idx_smem, buf)
            if persistent:   # wait until item r - 2 no longer reads this row buffer
                pl.when(r >= 2)(lambda: plgpu.barrier_wait(idx_free.at[buf]))
            plgpu.copy_gmem_to_smem(idx_ref.at[bi, hi, qb], idx, idx_bar.at[buf])
            if order >= 0:
                plgpu.copy_gmem_to_smem(mask_ref.at[bi, hi, qb], rows_of(mask_smem, buf),
                                        mask_bar.at[buf])
            if order == 1 and not persistent:
                plgpu.copy_gmem_to_smem(mom_ref.at[bi, hi], mom_smem, mom_bar.at[0])
            plgpu.barrier_wait(idx_bar.at[buf])

            def copy(step, slot, exact_src, zeroth_src, dst, bar):
                def exact():
                    plgpu.copy_gmem_to_smem(
                        tokens(exact_src, bi, hi, selected(idx, step) * BLOCK, BLOCK),
                        dst.at[slot], bar.at[slot])

                def zeroth():
                    rows = pl.ds((step - num_selected) * BLOCK, BLOCK)
                    plgpu.copy_gmem_to_smem(zeroth_src.at[bi, hi, rows], dst.at[slot],
                                            bar.at[slot])

                by_stream(step, num_selected, order, exact, zeroth)

            def refill(t, first):   # tile t into its slot once the slot is released
                g = streamed(r, t)
                slot = lax.rem(g, stages)
                wait = (lambda bar: pl.when(g >= stages)(lambda: plgpu.barrier_wait(
                    bar.at[slot]))) if first else (lambda bar: plgpu.barrier_wait(bar.at[slot]))
                wait(k_free)
                copy(t, slot, k_ref, kc_ref, k_smem, k_ready)
                wait(v_free)
                copy(t, slot, v_ref, vm_ref, v_smem, v_ready)

            head = min(stages, total)
            if not persistent:
                for s in range(head):
                    copy(s, s, k_ref, kc_ref, k_smem, k_ready)
                    copy(s, s, v_ref, vm_ref, v_smem, v_ready)
            else:
                pl.loop(0, head)(lambda t: refill(t, first=True))
                if order == 1:   # the moment, once item r - 1 has used it
                    pl.when(r >= 1)(lambda: plgpu.barrier_wait(mom_free))
                    plgpu.copy_gmem_to_smem(mom_ref.at[bi, hi], mom_smem, mom_bar.at[0])
            pl.loop(head, total)(lambda t: refill(t, first=False))

        each_item(one_item)

    @pl.when(wg < GROUPS)
    def _compute():
        plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")
        qs = q_smem.at[wg]

        def one_item(r, bi, hi, qb, buf):
            idx, masks = rows_of(idx_smem, buf), rows_of(mask_smem, buf)
            if persistent:   # the last item's output has left the query rows' buffer
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.copy_gmem_to_smem(tokens(q_ref, bi, hi, qb * BLOCK + wg * ROWS, ROWS), qs,
                                    q_bar.at[wg])
            cols = plgpu.broadcasted_iota(jnp.int32, (ROWS, BLOCK), 1,
                                          layout=plgpu.Layout.WGMMA)

            def step(t, carry, zeroth: bool):
                slot = lax.rem(streamed(r, t), stages)
                plgpu.barrier_wait(k_ready.at[slot])

                # With ping-pong the other warpgroup's products start after ours are issued.
                z = key_product(qs, k_smem.at[slot], (ROWS, BLOCK),
                                turn if ping_pong else None) * qk_scale
                plgpu.barrier_arrive(k_free.at[slot])
                c = t - num_selected if zeroth else None   # the zeroth-order chunk
                z = tile_logits(z, cols, zeroth=zeroth, chunk=c,
                                mask_row=masks.at[c] if zeroth else None,
                                key_block=lambda: selected(idx, t), block=BLOCK, nt=nt,
                                num_tokens=num_tokens)
                p16, (acc, m_new, l, g) = softmax_step(z, carry, zeroth=zeroth, dtype=dtype)
                wait_for_values(v_ready.at[slot], turn_bar, ping_pong)
                acc = value_product(acc, p16, v_smem.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l, g

            carry = initial_carry(ROWS, d)
            plgpu.barrier_wait(idx_bar.at[buf])
            plgpu.barrier_wait(q_bar.at[wg])
            if ping_pong:   # warpgroup 1 starts half a step behind warpgroup 0
                pl.when(wg == 1)(turn)
            carry = lax.fori_loop(0, num_selected, functools.partial(step, zeroth=False),
                                  carry)
            if order >= 0:
                plgpu.barrier_wait(mask_bar.at[buf])
                carry = lax.fori_loop(num_selected, total, functools.partial(step, zeroth=True),
                                      carry)
            if ping_pong:
                pl.when(wg == 0)(turn)
            if persistent:   # done with this item's index and mask rows
                plgpu.barrier_arrive(idx_free.at[buf])
            finish(carry, qs, mom_smem, mom_bar, scale=scale, order=order)
            if persistent and order == 1:   # done with the moment
                plgpu.barrier_arrive(mom_free)
            plgpu.copy_smem_to_gmem(qs, tokens(o_ref, bi, hi, qb * BLOCK + wg * ROWS, ROWS))
            if not persistent:
                plgpu.wait_smem_to_gmem(0)

        each_item(one_item)
        if persistent:
            plgpu.wait_smem_to_gmem(0)


def attention_call(q, k, v, idx, kc, vm, mask, mom, *, num_selected: int, nt: int,
                   num_tokens: int, scale: float, order: int, layout: str, stages: int,
                   ping_pong: bool = False, persistent: bool = False):
    """Runs the kernel on prepared inputs: q, k, v padded to whole blocks and to head dim
    64 / 128; `idx` `[B, H, NT, K_pad / 32, 32]`; kc, vm `[B, H, NT_pad, D]` (NT_pad a
    multiple of 128); `mask` `[B, H, NT, NT_pad / 128, 128]`; `mom` `[B, H, D, D]` (or
    placeholders where the order does not use them)."""
    b, h, d, dtype = q.shape[0], idx.shape[1], q.shape[-1], q.dtype
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    items = nt * h * b
    ctas = min(items, multiprocessor_count())
    walk = (h, items, ctas, ceil_div(items, ctas)) if persistent else None
    kernel = functools.partial(
        _kernel, num_selected=num_selected, num_chunks=kc.shape[2] // BLOCK, nt=nt,
        num_tokens=num_tokens, scale=scale, order=order, layout=layout, stages=stages,
        ping_pong=ping_pong, persistent=walk)
    rows = (2,) if persistent else ()   # index and mask row buffers
    per_item = [plgpu.Barrier(num_arrivals=GROUPS, num_barriers=2),   # rows released
                plgpu.Barrier(num_arrivals=GROUPS)] if persistent else []   # moment used

    def entry(*refs):
        pl.run_scoped(
            lambda *scratch: kernel(*refs, *scratch),
            plgpu.SMEM((GROUPS, ROWS, d), dtype, transforms=swizzled),
            plgpu.SMEM((stages, BLOCK, d), dtype, transforms=swizzled),
            plgpu.SMEM((stages, BLOCK, d), dtype, transforms=swizzled),
            plgpu.SMEM(rows + idx.shape[-2:], jnp.int32),
            plgpu.SMEM(rows + mask.shape[-2:], dtype),
            plgpu.SMEM(mom.shape[-2:] if order == 1 else (8, 64), dtype,
                       transforms=swizzled),
            plgpu.Barrier(num_barriers=stages),                        # keys landed
            plgpu.Barrier(num_barriers=stages),                        # values landed
            plgpu.Barrier(num_arrivals=GROUPS, num_barriers=stages),   # keys released
            plgpu.Barrier(num_arrivals=GROUPS, num_barriers=stages),   # values released
            plgpu.Barrier(num_barriers=GROUPS),                        # query rows
            plgpu.Barrier(num_barriers=len(rows) + 1),                 # index row
            plgpu.Barrier(num_barriers=len(rows) + 1),                 # mask row
            plgpu.Barrier(num_barriers=1),                             # moment
            plgpu.Barrier(num_arrivals=GROUPS),                        # ping-pong turns
            *per_item,
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(ctas,) if persistent else (nt, h, b),
        grid_names=("cta",) if persistent else ("blocks", "heads", "batch"),
        num_threads=GROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, idx, kc, vm, mask, mom)
