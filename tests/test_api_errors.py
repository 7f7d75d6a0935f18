"""Bad input fails at the public boundary with a message naming the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pisa_jax as pj


def _qkv(shape=(1, 100, 2, 16), dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3)]


def _call(**kw):
    q, k, v = kw.pop("qkv", _qkv())
    kw.setdefault("implementation", "reference")
    return pj.piecewise_sparse_attention(q, k, v, **kw)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval(density):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]; got"):
        _call(density=density)


def test_density_of_wrong_type():
    with pytest.raises(TypeError, match="density must be a real number"):
        _call(density="0.1")


@pytest.mark.parametrize("kw,pattern", [
    (dict(layout="bhdt"), r"layout must be one of \('bthd', 'bhtd'\); got 'bhdt'"),
    (dict(implementation="cuda"), r"implementation must be one of .*; got 'cuda'"),
    (dict(order=2), r"order must be one of \(1, 0, -1\); got 2"),
    (dict(block_size=48), "block_size must be a power of two >= 16; got 48"),
    (dict(block_size=8), "block_size must be a power of two >= 16; got 8"),
    (dict(scale=-1.0), "scale must be None or a finite positive number; got -1.0"),
    (dict(forced_blocks=[7], block_size=16), r"forced_blocks must lie in \[0, 7\) for 7 blocks.*got 7"),
    (dict(forced_blocks=[-8], block_size=16), r"forced_blocks must lie in \[0, 7\).*got -8"),
])
def test_bad_options(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        _call(**kw)


def test_forced_blocks_of_wrong_type():
    with pytest.raises(TypeError, match="forced_blocks must hold integers; got 1.5"):
        _call(forced_blocks=[1.5])


def test_shapes_that_disagree():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"k and v must have the same shape .*got k \(1, 100, 2, 16\), v \(1, 100, 2, 8\)"):
        _call(qkv=(q, k, v[..., :8]))
    with pytest.raises(ValueError, match="q and k/v must have the same sequence length .*got 100 and 50"):
        _call(qkv=(q, k[:, :50], v[:, :50]))
    with pytest.raises(ValueError, match="q and k/v must agree in batch, heads and head dim"):
        _call(qkv=(q[..., :8], k, v))
    with pytest.raises(ValueError, match=r"q must have 4 dimensions \[B, T, H, D\] .*got shape \(100, 2, 16\)"):
        _call(qkv=(q[0], k, v))


def test_dtypes_that_disagree_or_are_not_floating():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="q, k and v must share one dtype; got float32, bfloat16"):
        _call(qkv=(q, k.astype(jnp.bfloat16), v))
    with pytest.raises(TypeError, match="q must have a floating dtype; got int32"):
        _call(qkv=(q.astype(jnp.int32), k, v))
    with pytest.raises(TypeError, match="k must be an array; got list"):
        _call(qkv=(q, [1, 2], v))


def test_use_bias_needs_norms():
    st = pj.block_statistics(*_qkv(), implementation="reference")
    with pytest.raises(ValueError, match="use_bias=True needs statistics computed with with_norms=True"):
        pj.select_blocks(st, use_bias=True)


def test_stale_statistics_or_selection_are_refused():
    q, k, v = _qkv()
    st = pj.block_statistics(q, k, v, block_size=16, implementation="reference")
    sel = pj.select_blocks(st)
    with pytest.raises(ValueError, match="stats were computed for"):
        pj.piecewise_attention(q[:, :90], k[:, :90], v[:, :90], st, sel, implementation="reference")
    with pytest.raises(TypeError, match="stats must be a BlockStatistics"):
        pj.piecewise_attention(q, k, v, {"q_mean": 1}, sel, implementation="reference")


def test_errors_are_raised_under_jit_too():
    with pytest.raises(ValueError, match="density must be in"):
        jax.jit(lambda q, k, v: pj.piecewise_sparse_attention(q, k, v, density=2.0))(*_qkv())


def test_dense_attention_checks_its_arguments():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="implementation must be one of"):
        pj.dense_attention(q, k, v, implementation="pallas")
    with pytest.raises(ValueError, match="layout must be one of"):
        pj.dense_attention(q, k, v, layout="x")
    out = pj.dense_attention(q, k[:, :40], v[:, :40])       # cross-attention is allowed
    assert out.shape == q.shape
