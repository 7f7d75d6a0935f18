"""The Pallas kernels, run in interpret mode on the CPU, against the reference.

Interpret mode fills every output with NaN before the kernel runs (checked below), and
`relative_error` refuses non-finite values, so any element a kernel fails to write fails
the comparison.
"""

from __future__ import annotations


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import pisa_jax as pj
from tests.helpers import random_qkv, relative_error

TRITON = dict(implementation="triton", interpret=True)
REF = dict(implementation="reference")


def _qkv(seed, b, t, h, d, layout="bthd", dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(x, dtype) for x in random_qkv(rng, b, t, h, d, layout)]


def test_interpret_mode_poisons_outputs():
    def writes_nothing(x_ref, o_ref):
        pass
    out = pl.pallas_call(writes_nothing, out_shape=jax.ShapeDtypeStruct((8, 16), jnp.float32),
                         interpret=True)(jnp.ones((8, 16)))
    assert np.isnan(np.asarray(out)).all()


@pytest.mark.parametrize("t,bs,d,layout", [(200, 64, 64, "bthd"), (100, 32, 48, "bhtd"),
                                           (256, 128, 128, "bthd"), (17, 16, 16, "bhtd")])
def test_block_statistics_kernel_matches_reference(t, bs, d, layout):
    q, k, v = _qkv(t, 2, t, 3, d, layout)
    got = pj.block_statistics(q, k, v, block_size=bs, with_norms=True, layout=layout, **TRITON)
    want = pj.block_statistics(q, k, v, block_size=bs, with_norms=True, layout=layout, **REF)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    chex.assert_type(got.moment, jnp.float32)
    for name in ("q_mean", "k_mean", "v_sum", "moment", "moment_norms"):
        assert relative_error(getattr(got, name), getattr(want, name)) < 1e-5, name
    assert got.moment_norms is not None
    no_norms = pj.block_statistics(q, k, v, block_size=bs, layout=layout, **TRITON)
    assert no_norms.moment_norms is None


@pytest.mark.parametrize("per_program,t,layout", [
    (3, 300, "bthd"),     # 10 blocks: runs of 3, 3, 3 and 1, the last block partial
    (1, 120, "bhtd"),     # one block per program
])
def test_block_statistics_kernel_run_lengths_match_reference(per_program, t, layout):
    from pisa_jax.kernels.pallas_triton import block_statistics as kernel
    from pisa_jax.kernels.pallas_triton.config import LaunchConfig
    q, k, v = _qkv(t + per_program, 2, t, 3, 32, layout)
    config = LaunchConfig(num_warps=4, blocks_per_program=per_program)
    got = kernel.block_statistics(q, k, v, block_size=32, with_norms=True, layout=layout,
                                  interpret=True, config=config)
    want = pj.block_statistics(q, k, v, block_size=32, with_norms=True, layout=layout, **REF)
    for name in ("q_mean", "k_mean", "v_sum", "moment", "moment_norms"):
        assert relative_error(getattr(got, name), getattr(want, name)) < 1e-5, name


def test_statistics_launch_options_are_checked():
    from pisa_jax.kernels.pallas_triton.config import LaunchConfig
    with pytest.raises(ValueError, match="blocks_per_program: expected an int >= 0"):
        LaunchConfig(blocks_per_program=-1)
    with pytest.raises(ValueError, match="blocks_per_program: expected an int >= 0"):
        LaunchConfig(blocks_per_program=2.5)


@pytest.mark.parametrize("t,bs,d,layout,order", [
    (200, 64, 64, "bthd", 1),      # partial last block (200 = 3 * 64 + 8)
    (200, 64, 64, "bhtd", 0),
    (333, 128, 64, "bthd", -1),
    (150, 64, 128, "bhtd", 1),
    (100, 32, 40, "bthd", 1),      # head dim padded to 64 inside the wrapper
    (1, 64, 64, "bthd", 1),        # a single token
    (64, 16, 16, "bhtd", 0),
])
def test_piecewise_attention_kernel_matches_reference_float32(t, bs, d, layout, order):
    q, k, v = _qkv(t + d, 2, t, 2, d, layout)
    opts = dict(density=0.3, block_size=bs, order=order, use_bias=True, layout=layout)
    got = pj.piecewise_sparse_attention(q, k, v, **opts, **TRITON)
    want = pj.piecewise_sparse_attention(q, k, v, **opts, **REF)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_kernels_within_1e_2_of_float32_reference(dtype):
    q, k, v = _qkv(5, 1, 300, 2, 64, dtype=dtype)
    stats = pj.block_statistics(q, k, v, with_norms=True, **TRITON)
    sel = pj.select_blocks(stats, density=0.4, use_bias=True)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_stats = pj.block_statistics(*f32, **REF)
    for order in (1, -1):
        got = pj.piecewise_attention(q, k, v, stats, sel, order=order, **TRITON)
        want = pj.piecewise_attention(*f32, ref_stats, sel, order=order, **REF)
        assert got.dtype == dtype
        assert relative_error(got, want) <= 1e-2


def test_float16_first_order_with_moment_beyond_float16_range():
    # Correlated large keys and values: the summed moment H passes float16's maximum
    # (65504) although every input and the output are well inside it.
    rng = np.random.default_rng(11)
    t, d = 600, 32
    k = 30.0 * rng.standard_normal((1, t, 1, d)) + 5.0
    v = k + 3.0 * rng.standard_normal((1, t, 1, d))
    q = 0.02 * rng.standard_normal((1, t, 1, d))
    q, k, v = (jnp.asarray(x, jnp.float16) for x in (q, k, v))
    stats = pj.block_statistics(q, k, v, with_norms=True, **TRITON)
    assert float(jnp.max(jnp.abs(stats.moment))) > 2 * 65504
    sel = pj.select_blocks(stats, density=0.3, use_bias=True)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = pj.piecewise_attention(*f32, pj.block_statistics(*f32, **REF), sel, **REF)
    got = pj.piecewise_attention(q, k, v, stats, sel, **TRITON)
    assert relative_error(got, want) <= 1e-2


@pytest.mark.parametrize("zeroth_chunk,in_registers,layout", [
    (32, True, "bhtd"),     # the index row read once as a vector
    (16, False, "bthd"),    # one scalar index load per step, chunks smaller than a word
    (128, True, "bthd"),    # one zeroth-order chunk covers every block
])
def test_launch_variants_match_reference(zeroth_chunk, in_registers, layout):
    from pisa_jax.kernels.pallas_triton import piecewise_attention as kernel
    from pisa_jax.kernels.pallas_triton import LaunchConfig
    t, bs = 300, 16      # 19 blocks, the last one partial (12 tokens)
    q, k, v = _qkv(zeroth_chunk, 2, t, 2, 32, layout)
    stats = pj.block_statistics(q, k, v, block_size=bs, with_norms=True, layout=layout, **REF)
    sel = pj.select_blocks(stats, density=0.4, use_bias=True, forced_blocks=[-1])
    assert sel.indices.shape[-1] == 7
    config = LaunchConfig(zeroth_chunk=zeroth_chunk, indices_in_registers=in_registers)
    for order in (1, -1):
        got = kernel.piecewise_attention(q, k, v, stats, sel, scale=32 ** -0.5, order=order,
                                         layout=layout, interpret=True, config=config)
        want = pj.piecewise_attention(q, k, v, stats, sel, order=order, layout=layout, **REF)
        assert relative_error(got, want) < 1e-5, order


@pytest.mark.parametrize("multiprocessors", [1, 1000])
def test_statistics_partition_follows_the_multiprocessor_count(multiprocessors, monkeypatch):
    # 1 multiprocessor: runs of the 96-block maximum; 1000: runs of the 4-block minimum.
    from pisa_jax.kernels.pallas_triton import block_statistics as kernel
    monkeypatch.setattr(kernel, "multiprocessor_count", lambda: multiprocessors)
    q, k, v = _qkv(multiprocessors, 1, 16 * 150 - 5, 1, 16)      # 150 blocks, last partial
    got = pj.block_statistics(q, k, v, block_size=16, with_norms=True, **TRITON)
    want = pj.block_statistics(q, k, v, block_size=16, with_norms=True, **REF)
    for name in ("q_mean", "v_sum", "moment", "moment_norms"):
        assert relative_error(getattr(got, name), getattr(want, name)) < 1e-5, name


def test_multiprocessor_count_comes_from_the_device(monkeypatch):
    from types import SimpleNamespace
    from pisa_jax.kernels import _common
    for device, want in ((SimpleNamespace(core_count=78), 78), (SimpleNamespace(), 132)):
        monkeypatch.setattr(_common.jax, "devices", lambda d=device: [d])
        _common.multiprocessor_count.cache_clear()
        assert _common.multiprocessor_count() == want
    _common.multiprocessor_count.cache_clear()


def test_skip_bits_mark_selected_and_padding_blocks():
    from pisa_jax.kernels.pallas_triton.piecewise_attention import _skip_bits
    rng = np.random.default_rng(3)
    nt, nt_pad, top = 70, 96, 9
    rows = [rng.choice(nt, top, replace=False) for _ in range(2 * 3 * nt)]
    rows[0][:3] = [31, 63, 0]          # the sign bit of a word and both ends
    indices = np.stack(rows).reshape(2, 3, nt, top).astype(np.int32)
    words = np.asarray(_skip_bits(jnp.asarray(indices), nt, nt_pad)).view(np.uint32)
    assert words.shape == (2, 3, nt, nt_pad // 32)
    bits = (words[..., :, None] >> np.arange(32, dtype=np.uint32)) & 1
    got = bits.reshape(2, 3, nt, nt_pad).astype(bool)
    want = np.zeros((2, 3, nt, nt_pad), bool)
    want[..., nt:] = True
    np.put_along_axis(want, indices, True, axis=-1)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rows,n,k", [(10, 37, 5), (70, 72, 10), (3, 1184, 177), (4, 16, 16)])
def test_top_k_kernel_takes_the_same_set_as_lax_top_k(rows, n, k):
    from pisa_jax.kernels.pallas_triton.top_k import top_k_indices
    rng = np.random.default_rng(n)
    s = rng.standard_normal((rows, n)).astype(np.float32)
    s[0, : min(3, k)] = np.inf                      # forced blocks
    s[1] = np.round(s[1])                           # many ties: lower index first
    s[2, :] = -s[2, :] ** 2                         # only non-positive scores
    got = np.asarray(top_k_indices(jnp.asarray(s), k, interpret=True))
    want = np.asarray(jax.lax.top_k(jnp.asarray(s), k)[1])
    assert got.shape == (rows, k) and got.dtype == np.int32
    assert (np.diff(got, axis=1) > 0).all()         # ascending, no repeats
    np.testing.assert_array_equal(got, np.sort(want, axis=1))


@pytest.mark.parametrize("kernel_from", [0, 128])    # the kernel, or lax.top_k at NT = 44
def test_triton_selection_matches_reference_selection(kernel_from, monkeypatch):
    from pisa_jax import selection
    monkeypatch.setattr(selection, "_TOP_K_KERNEL_MIN_BLOCKS", kernel_from)
    q, k, v = _qkv(21, 2, 700, 3, 32)
    stats = pj.block_statistics(q, k, v, block_size=16, with_norms=True, **REF)
    opts = dict(density=0.2, use_bias=True, forced_blocks=[0, 5])
    got = pj.select_blocks(stats, **opts, **TRITON)
    want = pj.select_blocks(stats, **opts, **REF)
    assert got.num_blocks == want.num_blocks == 44
    got = np.asarray(got.indices)
    if kernel_from == 0:
        assert (np.diff(got, axis=-1) > 0).all()     # the kernel's ascending order
    np.testing.assert_array_equal(np.sort(got, axis=-1), np.sort(np.asarray(want.indices), -1))


def test_launch_config_refuses_bad_values():
    from pisa_jax.kernels.pallas_triton import LaunchConfig
    with pytest.raises(ValueError, match="zeroth_chunk: expected a power of two, got 48"):
        LaunchConfig(zeroth_chunk=48)
    with pytest.raises(ValueError, match="num_warps: expected a positive int, got 0"):
        LaunchConfig(num_warps=0)
    with pytest.raises(ValueError, match="num_stages: expected a positive int, got True"):
        LaunchConfig(num_stages=True)
    with pytest.raises(ValueError, match="indices_in_registers: expected a bool, got 1"):
        LaunchConfig(indices_in_registers=1)


def test_forced_blocks_and_density_one_in_kernels():
    q, k, v = _qkv(9, 1, 160, 2, 32)
    opts = dict(density=0.2, block_size=16, forced_blocks=[0, -1])
    got = pj.piecewise_sparse_attention(q, k, v, **opts, **TRITON)
    want = pj.piecewise_sparse_attention(q, k, v, **opts, **REF)
    assert relative_error(got, want) < 1e-5
    dense = pj.dense_attention(q, k, v, implementation="reference")
    full = pj.piecewise_sparse_attention(q, k, v, density=1.0, block_size=16, **TRITON)
    assert relative_error(full, dense) < 1e-5


def test_reused_selection_under_jit():
    q, k, v = _qkv(11, 1, 130, 2, 32)
    q2 = _qkv(12, 1, 130, 2, 32)[0]

    @jax.jit
    def two_calls(q, q2, k, v):
        stats = pj.block_statistics(q, k, v, block_size=32, **TRITON)
        sel = pj.select_blocks(stats, density=0.5)
        stats2 = pj.block_statistics(q2, k, v, block_size=32, **TRITON)
        return sel, pj.piecewise_attention(q2, k, v, stats2, sel, **TRITON)

    sel, got = two_calls(q, q2, k, v)
    stats2 = pj.block_statistics(q2, k, v, block_size=32, **REF)
    want = pj.piecewise_attention(q2, k, v, stats2, sel, **REF)
    assert relative_error(got, want) < 1e-5


def test_differentiating_the_kernels_fails_clearly():
    q, k, v = _qkv(13, 1, 64, 1, 16)
    loss = lambda q: pj.piecewise_sparse_attention(q, k, v, block_size=16, **TRITON).sum()
    with pytest.raises(TypeError, match="inference-only and cannot be differentiated"):
        jax.grad(loss)(q)
