"""The Mosaic GPU attention kernel on a Hopper GPU (run with `pytest -m gpu` there)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

import pisa_jax as pj
from pisa_jax.kernels.dispatch import mosaic_unavailable
from pisa_jax.kernels.pallas_mosaic_gpu import MosaicConfig
from pisa_jax.kernels.pallas_mosaic_gpu import piecewise_attention as mosaic_attention
from tests.helpers import relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(bool(mosaic_unavailable()),
                       reason=f"needs a Hopper (sm_90) GPU: {mosaic_unavailable()}"),
]


def _qkv(seed, b, t, h, d, dtype, layout, spread=1.0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    shape = (b, t, h, d) if layout == "bthd" else (b, h, t, d)
    return [(spread * jax.random.normal(k, shape, jnp.float32)).astype(dtype) for k in ks]


# Statistics and selection from the reference (jitted once per shape, no other kernel
# builds): the tests check the attention kernel alone, for a given selection.
@functools.partial(jax.jit, static_argnames=("layout", "block_size"))
def _statistics(q, k, v, layout, block_size=64):
    return pj.block_statistics(q, k, v, block_size=block_size, with_norms=True, layout=layout,
                               implementation="reference")


@functools.partial(jax.jit, static_argnames=("density",))
def _selection(stats, density):
    return pj.select_blocks(stats, density=density, use_bias=True, forced_blocks=[0],
                            implementation="reference")


@functools.partial(jax.jit, static_argnames=("order", "layout"))
def _reference(q, k, v, stats, sel, order, layout):
    return pj.piecewise_attention(q, k, v, stats, sel, order=order, layout=layout,
                                  implementation="reference")


@functools.partial(jax.jit, static_argnames=("order", "layout", "config"))
def _mosaic(q, k, v, stats, sel, order, layout, config):
    return mosaic_attention(q, k, v, stats, sel, scale=q.shape[-1] ** -0.5, order=order,
                            layout=layout, config=config)


def _against_reference(q, k, v, layout, orders=(1, 0, -1), density=0.15, config=None,
                       block_size=64, per_query_block=False):
    """Mosaic output vs the float32 reference with the same selection, per order; with
    `per_query_block`, also the worst relative error of any one (batch, head, query
    block) per order, under the key "worst query block"."""
    stats = _statistics(q, k, v, layout, block_size)
    sel = _selection(stats, density)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_stats = _statistics(*f32, layout, block_size)
    errors = {}
    for order in orders:
        out = _mosaic(q, k, v, stats, sel, order, layout, config)
        assert out.shape == q.shape and out.dtype == q.dtype
        ref = _reference(*f32, ref_stats, sel, order, layout)
        errors[order] = relative_error(out, ref)   # also refuses NaN / inf
        if per_query_block:
            errors.setdefault("worst query block", {})[order] = _worst_block_error(
                out, ref, layout, block_size)
    return errors


def _worst_block_error(out, ref, layout, block_size):
    """The largest relative error over (batch, head, query block) slices."""
    if layout == "bthd":
        out, ref = (jnp.swapaxes(x, 1, 2) for x in (out, ref))
    t = out.shape[2]
    worst = 0.0
    for start in range(0, t, block_size):
        rows = slice(start, min(start + block_size, t))
        o, r = out[:, :, rows].astype(jnp.float32), ref[:, :, rows]
        num = jnp.sqrt(jnp.sum((o - r) ** 2, axis=(2, 3)))
        den = jnp.sqrt(jnp.sum(r ** 2, axis=(2, 3)))
        worst = max(worst, float(jnp.max(num / den)))
    return worst


@pytest.mark.parametrize("dtype,d,layout,t,h", [
    (jnp.bfloat16, 128, "bhtd", 4608 - 37, 2),   # partial last block, even block count
    (jnp.float16, 64, "bthd", 941, 3),           # partial last block, odd block count
    (jnp.bfloat16, 128, "bthd", 4608, 2),         # whole blocks
    (jnp.bfloat16, 96, "bthd", 1000, 2),          # head dim zero-padded to 128
])
def test_half_precision_within_1e_2_of_float32_reference(dtype, d, layout, t, h):
    errors = _against_reference(*_qkv(t + d, 1, t, h, d, dtype, layout), layout)
    assert all(e <= 1e-2 for e in errors.values()), errors


@pytest.mark.parametrize("config,d,t", [
    (MosaicConfig(stages=1, query_blocks_per_cta=1), 128, 2245),
    (MosaicConfig(stages=4, query_blocks_per_cta=2), 64, 2245),
    (MosaicConfig(stages=2, query_blocks_per_cta=2, ping_pong=True), 128, 2245),
    (MosaicConfig(stages=3, query_blocks_per_cta=2, ping_pong=True), 64, 941),   # odd NT
])
def test_other_pipeline_configs_agree_with_reference(config, d, t):
    q, k, v = _qkv(5, 2, t, 2, d, jnp.bfloat16, "bthd")
    errors = _against_reference(q, k, v, "bthd", orders=(1,), config=config)
    assert errors[1] <= 1e-2, errors


@pytest.mark.parametrize("dtype,d,layout,t,h", [
    (jnp.bfloat16, 128, "bthd", 4608 - 37, 2),   # partial last block
    (jnp.float16, 64, "bhtd", 2048, 3),          # whole blocks
    (jnp.bfloat16, 96, "bthd", 1000, 2),          # head dim zero-padded to 128
    (jnp.bfloat16, 128, "bthd", 132 * 128 - 5, 1),   # 132 key blocks: two zeroth-order chunks
])
def test_block_128_within_1e_2_of_float32_reference(dtype, d, layout, t, h):
    errors = _against_reference(*_qkv(t + d + 1, 1, t, h, d, dtype, layout), layout,
                                block_size=128)
    assert all(e <= 1e-2 for e in errors.values()), errors


@pytest.mark.parametrize("config,d,t", [
    (MosaicConfig(stages=2), 128, 2245),   # no ping-pong (the default takes turns)
    (MosaicConfig(stages=4, ping_pong=True), 64, 941),
    (MosaicConfig(stages=1), 128, 2048),
])
def test_block_128_pipeline_configs_agree_with_reference(config, d, t):
    q, k, v = _qkv(7, 1, t, 2, d, jnp.bfloat16, "bthd")
    errors = _against_reference(q, k, v, "bthd", config=config, block_size=128)
    assert all(e <= 1e-2 for e in errors.values()), errors


@pytest.mark.parametrize("config,b,t,h,d,layout", [
    # 2 x 5 x 36 = 360 query blocks: each CTA walks 2 or 3 of them (132 multiprocessors).
    (MosaicConfig(persistent=True, ping_pong=True), 2, 4571, 5, 128, "bthd"),
    (MosaicConfig(persistent=True), 1, 4608, 9, 64, "bhtd"),
    (MosaicConfig(persistent=True, ping_pong=True), 1, 941, 2, 96, "bthd"),   # one round
    # 1-2 tiles per item against 4 stages: the next item's tiles share the ring early.
    (MosaicConfig(stages=4, ping_pong=True, persistent=True), 2, 941, 17, 64, "bthd"),
    (MosaicConfig(stages=1, persistent=True), 1, 941, 40, 128, "bhtd"),
    # 8 x 132 = 1056 items: every CTA walks 8.
    (MosaicConfig(ping_pong=True, persistent=True), 1, 8 * 1024, 16, 128, "bthd"),
])
def test_block_128_persistent_grid_agrees_with_reference(config, b, t, h, d, layout):
    q, k, v = _qkv(t + h, b, t, h, d, jnp.bfloat16, layout)
    errors = _against_reference(q, k, v, layout, config=config, block_size=128,
                                per_query_block=True)
    # Each item of the walk checked on its own, so one spoilt item cannot hide.
    assert all(e <= 2e-2 for e in errors["worst query block"].values()), errors
    assert all(e <= 1e-2 for o, e in errors.items() if o != "worst query block"), errors
    # A race shows as outputs that change from run to run: the kernel is deterministic.
    stats = _statistics(q, k, v, layout, 128)
    sel = _selection(stats, 0.15)
    runs = [_mosaic(q, k, v, stats, sel, 1, layout, config) for _ in range(3)]
    assert all(bool(jnp.array_equal(runs[0], r)) for r in runs[1:])


def test_large_logits_stay_finite():
    # |s q.k| reaches about 80 with this spread at D = 128.
    q, k, v = _qkv(3, 1, 4096, 2, 128, jnp.bfloat16, "bthd", spread=3.9)
    logits = jnp.einsum("bthd,bshd->bhts", q[:, :512].astype(jnp.float32),
                        k.astype(jnp.float32)) * 128 ** -0.5
    assert float(jnp.abs(logits).max()) > 70
    errors = _against_reference(q, k, v, "bthd")
    assert all(e <= 1e-2 for e in errors.values()), errors


def test_density_one_is_dense_attention():
    q, k, v = _qkv(11, 1, 2048 - 10, 2, 64, jnp.bfloat16, "bhtd")
    stats = _statistics(q, k, v, "bhtd")
    sel = _selection(stats, 1.0)
    out = _mosaic(q, k, v, stats, sel, 1, "bhtd", None)
    ref = pj.dense_attention(*(x.astype(jnp.float32) for x in (q, k, v)), layout="bhtd",
                             implementation="reference")
    assert relative_error(out, ref) <= 1e-2


@pytest.mark.parametrize("dtype,block_size,d,match", [
    (jnp.float32, 64, 128, "bfloat16 or float16"),
    (jnp.bfloat16, 32, 128, "block_size 64 or 128"),
    (jnp.bfloat16, 64, 256, "head dims up to 128"),
])
def test_unsupported_inputs_are_refused_clearly(dtype, block_size, d, match):
    q, k, v = _qkv(1, 1, 256, 1, d, dtype, "bthd")
    stats = pj.block_statistics(q, k, v, block_size=block_size, implementation="reference")
    sel = pj.select_blocks(stats, implementation="reference")
    with pytest.raises(ValueError, match=match):
        mosaic_attention(q, k, v, stats, sel, scale=d ** -0.5, order=1, layout="bthd")


def test_interpret_mode_is_refused_clearly():
    q, k, v = _qkv(1, 1, 256, 1, 64, jnp.bfloat16, "bthd")
    stats = pj.block_statistics(q, k, v, implementation="reference")
    sel = pj.select_blocks(stats, implementation="reference")
    with pytest.raises(ValueError, match="no interpret mode"):
        mosaic_attention(q, k, v, stats, sel, scale=0.125, order=1, layout="bthd",
                         interpret=True)


def test_public_api_runs_mosaic_with_triton_statistics_and_top_k():
    # wan-like long rows (NT = 264 >= the top-k kernel's threshold), whole op through
    # `implementation="mosaic"` against the float32 reference with the same selection.
    q, k, v = _qkv(23, 1, 264 * 64 - 5, 2, 128, jnp.bfloat16, "bthd")
    opts = dict(density=0.15, use_bias=True, forced_blocks=[0])
    run = jax.jit(lambda q, k, v: pj.piecewise_sparse_attention(q, k, v, **opts,
                                                                implementation="mosaic"))
    out = run(q, k, v)
    stats = pj.block_statistics(q, k, v, with_norms=True, implementation="triton")
    sel = pj.select_blocks(stats, **opts, implementation="triton")
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = _reference(*f32, _statistics(*f32, "bthd"), sel, 1, "bthd")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_error(out, ref) <= 1e-2
