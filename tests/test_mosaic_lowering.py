"""The Mosaic GPU attention kernel traced and lowered for CUDA on any machine.

Running the kernel needs a Hopper GPU (tests/test_kernels_mosaic_gpu.py, `-m gpu`), but
Pallas lowers it to its Mosaic GPU module without one. Lowering runs the kernel body:
its shapes, layouts, barriers and loops are checked here on every change, before any
GPU run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

import pisa_jax as pj
from pisa_jax.kernels.pallas_mosaic_gpu import MosaicConfig
from pisa_jax.kernels.pallas_mosaic_gpu import piecewise_attention as mosaic_attention

KERNEL_CALL = "stablehlo.custom_call @mosaic_gpu_v2"


def _lowered(t, h, d, dtype, layout, order, config=None, block_size=64):
    shape = (1, t, h, d) if layout == "bthd" else (1, h, t, d)
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype)
               for key in jax.random.split(jax.random.PRNGKey(t + d), 3))
    stats = pj.block_statistics(q, k, v, block_size=block_size, with_norms=True,
                                layout=layout, implementation="reference")
    sel = pj.select_blocks(stats, density=0.15, use_bias=True, implementation="reference")
    fn = jax.jit(functools.partial(mosaic_attention, scale=d ** -0.5, order=order,
                                   layout=layout, config=config))
    traced = fn.trace(q, k, v, stats, sel)
    return traced, traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("t,h,d,dtype,layout,order", [
    (941, 2, 64, jnp.bfloat16, "bthd", 1),       # partial last block, odd block count
    (1024, 1, 128, jnp.float16, "bhtd", 0),      # whole blocks, zeroth order only
    (1000, 2, 96, jnp.bfloat16, "bthd", -1),     # head dim padded to 128, exact path only
])
def test_kernel_lowers_to_one_mosaic_call(t, h, d, dtype, layout, order):
    traced, text = _lowered(t, h, d, dtype, layout, order)
    out = traced.out_info
    assert out.shape == ((1, t, h, d) if layout == "bthd" else (1, h, t, d))
    assert out.dtype == dtype
    assert text.count(KERNEL_CALL) == 1


@pytest.mark.parametrize("config", [
    MosaicConfig(stages=1, query_blocks_per_cta=1),
    MosaicConfig(stages=4, query_blocks_per_cta=2),
    MosaicConfig(stages=2, query_blocks_per_cta=2, ping_pong=True),
])
def test_every_launch_config_lowers(config):
    _, text = _lowered(941, 1, 64, jnp.bfloat16, "bthd", 1, config)
    assert text.count(KERNEL_CALL) == 1


def test_configs_differ_in_the_lowered_kernel():
    # The launch config reaches the kernel: a check that lowering is not a no-op.
    texts = {c: _lowered(941, 1, 64, jnp.bfloat16, "bthd", 1, c)[1]
             for c in (MosaicConfig(stages=2), MosaicConfig(stages=3))}
    assert len(set(texts.values())) == 2


@pytest.mark.parametrize("t,d,layout,order", [
    (941, 64, "bthd", 1),      # partial last block
    (1024, 128, "bhtd", 0),
    (1000, 96, "bthd", -1),
])
def test_block_128_kernel_lowers(t, d, layout, order):
    traced, text = _lowered(t, 2, d, jnp.bfloat16, layout, order, block_size=128)
    assert traced.out_info.shape == ((1, t, 2, d) if layout == "bthd" else (1, 2, t, d))
    assert text.count(KERNEL_CALL) == 1


@pytest.mark.parametrize("block_size", [64, 128])
def test_layers_with_one_shape_share_one_kernel(block_size):
    # Three attention layers of one shape (as in a model): one Mosaic module in the
    # lowered program, called three times, so it is compiled once; a fourth call with
    # another order is a second kernel.
    t, h, d = 700, 2, 64
    keys = jax.random.split(jax.random.PRNGKey(block_size), 4)
    qkv = [jax.random.normal(key, (3, 1, t, h, d), jnp.float32).astype(jnp.bfloat16)
           for key in keys]

    def layers(qkv):
        outs = []
        for i, x in enumerate(qkv):
            q, k, v = x
            stats = pj.block_statistics(q, k, v, block_size=block_size, with_norms=True,
                                        implementation="reference")
            sel = pj.select_blocks(stats, density=0.3, implementation="reference")
            outs.append(mosaic_attention(q, k, v, stats, sel, scale=d ** -0.5,
                                         order=1 if i < 3 else 0, layout="bthd"))
        return outs

    text = jax.jit(layers).trace(qkv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count(KERNEL_CALL) == 2


@pytest.mark.parametrize("config,d,order", [
    (MosaicConfig(stages=2, ping_pong=True), 128, 1),
    (MosaicConfig(stages=4, ping_pong=True), 64, 1),
    (MosaicConfig(stages=5), 64, 0),
    (MosaicConfig(stages=1), 128, -1),
])
def test_block_128_launch_configs_lower(config, d, order):
    traced, text = _lowered(941, 2, d, jnp.bfloat16, "bthd", order, config, block_size=128)
    assert traced.out_info.shape == (1, 941, 2, d)
    assert text.count(KERNEL_CALL) == 1


def test_block_128_configs_differ_in_the_lowered_kernel():
    # Stages and ping-pong reach the block-128 kernel.
    texts = {c: _lowered(941, 1, 128, jnp.bfloat16, "bthd", 1, c, block_size=128)[1]
             for c in (MosaicConfig(stages=2), MosaicConfig(stages=2, ping_pong=True),
                       MosaicConfig(stages=1))}
    assert len(set(texts.values())) == 3

    # Without a config the compute warpgroups take turns on a persistent grid (the
    # fastest measured schedule).
    # The kernel bodies are compared as jaxprs: the lowered modules carry source locations.
    def body(config):
        return str(_lowered(941, 1, 128, jnp.bfloat16, "bthd", 1, config, block_size=128)[0].jaxpr)

    default = body(None)
    assert default == body(MosaicConfig(stages=2, ping_pong=True, persistent=True))
    assert default != body(MosaicConfig(stages=2, ping_pong=True))
    assert default != body(MosaicConfig(stages=2, persistent=True))


@pytest.mark.parametrize("order,config", [
    (1, MosaicConfig(persistent=True, ping_pong=True)),
    (0, MosaicConfig(persistent=True, stages=1)),
    (-1, MosaicConfig(persistent=True, ping_pong=True)),
])
def test_block_128_persistent_grid_lowers(order, config):
    # 8 heads x 18 query blocks = 144 items over 132 CTAs: two rounds for some CTAs, with
    # double-buffered index and mask rows.
    traced, text = _lowered(2245, 8, 128, jnp.bfloat16, "bthd", order, config, block_size=128)
    assert traced.out_info.shape == (1, 2245, 8, 128)
    assert text.count(KERNEL_CALL) == 1


def test_block_128_default_leaves_the_persistent_grid_where_it_does_not_fit():
    from pisa_jax.kernels.pallas_mosaic_gpu import wide_blocks
    limit = 227 * 1024
    small = wide_blocks.resolve_config(None, 128, 2, 20, 256, limit)
    assert (small.persistent, small.ping_pong, small.stages) == (True, True, 2)
    # 8192 key blocks (about 1M tokens) at density 0.15: one set of rows fits, two do not.
    rows = dict(head_dim=128, itemsize=2, num_selected=1229, padded_blocks=8192)
    assert wide_blocks.shared_memory_bytes(2, **rows, persistent=True) > limit
    assert wide_blocks.shared_memory_bytes(2, **rows, persistent=False) <= limit
    large = wide_blocks.resolve_config(None, **rows, limit=limit)
    assert (large.persistent, large.ping_pong, large.stages) == (False, True, 2)
    given = MosaicConfig(persistent=True)
    assert wide_blocks.resolve_config(given, **rows, limit=limit) is given


def test_persistent_grid_is_refused_at_block_64():
    with pytest.raises(ValueError, match=r"MosaicConfig.persistent is a block size 128 option; "
                                         r"got block size 64"):
        _lowered(941, 1, 128, jnp.bfloat16, "bthd", 1, MosaicConfig(persistent=True))


@pytest.mark.parametrize("config", [MosaicConfig(query_blocks_per_cta=1)])
def test_block_128_refuses_options_it_would_ignore(config):
    with pytest.raises(ValueError, match=r"MosaicConfig takes only `stages`, `ping_pong` and `persistent` there; got "
                                         r"MosaicConfig\("):
        _lowered(941, 1, 64, jnp.bfloat16, "bthd", 1, config, block_size=128)


def test_too_many_stages_are_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"shared memory .* use fewer stages, "
                                         r"persistent=False or implementation='triton'"):
        _lowered(941, 1, 128, jnp.bfloat16, "bthd", 1, MosaicConfig(stages=3), block_size=128)

