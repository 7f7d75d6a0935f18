"""The Pallas kernels on a real GPU (run with `pytest -m gpu` on a CUDA machine)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pisa_jax as pj
from tests.helpers import relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU"),
]


def _qkv(seed, b, t, h, d, dtype, spread=1.0, layout="bthd"):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    shape = (b, t, h, d) if layout == "bthd" else (b, h, t, d)
    return [(spread * jax.random.normal(k, shape, jnp.float32)).astype(dtype) for k in ks]


@pytest.mark.parametrize("t,h,block_size,layout", [(4608 - 37, 2, 64, "bhtd")])
def test_float32_matches_reference_at_realistic_shapes(t, h, block_size, layout):
    q, k, v = _qkv(t, 1, t, h, 128, jnp.float32, layout=layout)
    for order in (1, 0, -1):
        opts = dict(density=0.15, block_size=block_size, order=order, use_bias=True,
                    forced_blocks=[0], layout=layout)
        run = lambda impl: jax.jit(lambda q, k, v: pj.piecewise_sparse_attention(
            q, k, v, implementation=impl, **opts))(q, k, v)
        assert relative_error(run("triton"), run("reference")) < 1e-4, order


@pytest.mark.parametrize("dtype,block_size", [(jnp.bfloat16, 64), (jnp.float16, 64),
                                              (jnp.bfloat16, 128)])
def test_half_precision_within_1e_2_of_float32_reference_with_same_selection(dtype, block_size):
    q, k, v = _qkv(7, 2, 4608, 4, 128, dtype)
    stats = pj.block_statistics(q, k, v, block_size=block_size, with_norms=True,
                                implementation="triton")
    sel = pj.select_blocks(stats, density=0.15, use_bias=True)
    out = pj.piecewise_attention(q, k, v, stats, sel, implementation="triton")
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_stats = pj.block_statistics(*f32, block_size=block_size, with_norms=True,
                                    implementation="reference")
    ref = pj.piecewise_attention(*f32, ref_stats, sel, implementation="reference")
    assert out.dtype == dtype
    assert relative_error(out, ref) <= 1e-2


def test_large_logits_stay_finite():
    # |s q.k| reaches about 80 with this spread at D = 128 (spread**2 x 5.3 sigma).
    q, k, v = _qkv(3, 1, 4096, 4, 128, jnp.bfloat16, spread=3.9)
    logits = jnp.einsum("bthd,bshd->bhts", q[:, :512].astype(jnp.float32),
                        k.astype(jnp.float32)) * 128 ** -0.5
    assert float(jnp.abs(logits).max()) > 70
    stats = pj.block_statistics(q, k, v, with_norms=True, implementation="triton")
    sel = pj.select_blocks(stats, use_bias=True)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_stats = pj.block_statistics(*f32, implementation="reference")
    for order in (1, 0, -1):
        out = pj.piecewise_attention(q, k, v, stats, sel, order=order, implementation="triton")
        assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
        ref = pj.piecewise_attention(*f32, ref_stats, sel, order=order,
                                     implementation="reference")
        assert relative_error(out, ref) <= 1e-2


def test_density_one_is_dense_attention_on_gpu():
    q, k, v = _qkv(11, 1, 2048, 4, 64, jnp.float32)
    out = pj.piecewise_sparse_attention(q, k, v, density=1.0, implementation="triton")
    ref = pj.dense_attention(q, k, v, implementation="reference")
    assert relative_error(out, ref) < 1e-5
    assert np.isfinite(np.asarray(out)).all()


def test_float32_with_block_128_is_refused_clearly():
    q, k, v = _qkv(5, 1, 1024, 1, 128, jnp.float32)
    with pytest.raises(ValueError, match="block_size 128 only for bfloat16/float16"):
        pj.piecewise_sparse_attention(q, k, v, block_size=128, implementation="triton")


def test_top_k_kernel_selects_the_same_blocks_as_xla_at_long_rows():
    # wan-720p has 1184 blocks per row; the kernel holds 8 such rows per program.
    q, k, v = _qkv(17, 1, 1184 * 64, 2, 128, jnp.bfloat16)
    stats = pj.block_statistics(q, k, v, with_norms=True, implementation="triton")
    for forced in (None, [0, -1]):
        opts = dict(density=0.15, use_bias=True, forced_blocks=forced)
        got = pj.select_blocks(stats, implementation="triton", **opts).indices
        want = pj.select_blocks(stats, implementation="reference", **opts).indices
        assert got.shape == want.shape == (1, 2, 1184, 177)
        np.testing.assert_array_equal(np.asarray(got), np.sort(np.asarray(want), axis=-1))
