"""The reference implementation against an independent float64 NumPy PISA, and its properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pisa_jax as pj
from tests.helpers import numpy_pisa, random_qkv, relative_error, structured_qkv


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("order", [1, 0, -1])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_reference_matches_numpy_float64_on_random_inputs(order, use_bias, layout):
    rng = np.random.default_rng([order + 1, use_bias, len(layout)])
    q, k, v = random_qkv(rng, 2, 83, 2, 8, layout)        # 83 = 5 blocks of 16 + 3
    opts = dict(density=0.4, block_size=16, order=order, use_bias=use_bias, layout=layout)
    want, _ = numpy_pisa(q, k, v, **opts)
    got = pj.piecewise_sparse_attention(*(jnp.asarray(x) for x in (q, k, v)),
                                        implementation="reference", **opts)
    assert got.dtype == jnp.float64 and got.shape == q.shape
    assert relative_error(got, want) < 1e-12


@pytest.mark.parametrize("order", [1, 0, -1])
def test_reference_matches_numpy_on_structured_inputs_with_forced_blocks(order):
    rng = np.random.default_rng(10 + order)
    q, k, v = structured_qkv(rng, 1, 11, 3, 16)            # 121 tokens, partial last block
    opts = dict(density=0.25, block_size=16, order=order, use_bias=True, scale=0.3,
                forced=(0, -1))
    want, _ = numpy_pisa(q, k, v, **opts)
    opts["forced_blocks"] = opts.pop("forced")
    got = pj.piecewise_sparse_attention(*(jnp.asarray(x) for x in (q, k, v)),
                                        implementation="reference", **opts)
    assert relative_error(got, want) < 1e-12


def test_block_statistics_match_definitions():
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, 1, 50, 2, 4, "bhtd")
    st = pj.block_statistics(*(jnp.asarray(x) for x in (q, k, v)), block_size=16,
                             with_norms=True, layout="bhtd", implementation="reference")
    assert st.num_blocks == 4 and st.num_tokens == 50
    last = slice(48, 50)                                   # the 2-token last block
    np.testing.assert_allclose(st.q_mean[0, 1, 3], q[0, 1, last].mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.k_mean[0, 1, 3], k[0, 1, last].mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.v_sum[0, 1, 3], v[0, 1, last].sum(0), rtol=1e-12)
    hs = [(k[0, 0, a:a + 16] - k[0, 0, a:a + 16].mean(0)).T @ v[0, 0, a:a + 16]
          for a in range(0, 50, 16)]
    np.testing.assert_allclose(st.moment[0, 0], sum(hs), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(st.moment_norms[0, 0], [np.linalg.norm(x) for x in hs],
                               rtol=1e-10)


@pytest.mark.parametrize("t", [1, 40, 64])
def test_density_one_equals_dense_attention(t):
    rng = np.random.default_rng(t)
    q, k, v = (jnp.asarray(x) for x in random_qkv(rng, 2, t, 3, 8))
    dense = pj.dense_attention(q, k, v, implementation="reference")
    for order in (1, 0, -1):
        out = pj.piecewise_sparse_attention(q, k, v, density=1.0, block_size=16, order=order,
                                            implementation="reference")
        assert relative_error(out, dense) < 1e-13


def test_keep_or_drop_equals_dense_attention_restricted_to_selected_blocks():
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(x) for x in random_qkv(rng, 1, 70, 2, 8, "bhtd"))
    st = pj.block_statistics(q, k, v, block_size=16, layout="bhtd", implementation="reference")
    sel = pj.select_blocks(st, density=0.4)
    out = pj.piecewise_attention(q, k, v, st, sel, order=-1, layout="bhtd",
                                 implementation="reference")
    mask = np.asarray(sel.mask())
    blk = np.arange(70) // 16
    qn, kn, vn = (np.asarray(x) for x in (q, k, v))
    for b, h, t in [(0, 0, 3), (0, 1, 40), (0, 1, 69)]:
        keys = np.flatnonzero(mask[b, h, blk[t], blk])
        logits = qn[b, h, t] @ kn[b, h, keys].T / np.sqrt(8)
        w = np.exp(logits - logits.max())
        np.testing.assert_allclose(out[b, h, t], w @ vn[b, h, keys] / w.sum(), rtol=1e-12)


def test_forced_blocks_are_always_selected_and_use_up_slots():
    rng = np.random.default_rng(8)
    q, k, v = (jnp.asarray(x) for x in random_qkv(rng, 2, 160, 2, 8))
    st = pj.block_statistics(q, k, v, block_size=16, implementation="reference")
    sel = pj.select_blocks(st, density=0.3, forced_blocks=[9, 2])      # top_k = 3
    mask = np.asarray(sel.mask())
    assert mask[..., 2].all() and mask[..., 9].all()
    assert (mask.sum(-1) == 3).all()
    many = pj.select_blocks(st, density=0.1, forced_blocks=[0, 1, 2])  # top_k = 1 < 3 forced
    assert (np.asarray(many.mask()).sum(-1) == 3).all()
    assert np.asarray(many.mask())[..., :3].all()


def test_selection_matches_numpy_sets():
    rng = np.random.default_rng(9)
    q, k, v = random_qkv(rng, 1, 100, 2, 8)
    _, want = numpy_pisa(q, k, v, density=0.3, block_size=16, use_bias=True)
    st = pj.block_statistics(*(jnp.asarray(x) for x in (q, k, v)), block_size=16,
                             with_norms=True, implementation="reference")
    got = pj.select_blocks(st, density=0.3, use_bias=True).mask()
    np.testing.assert_array_equal(np.asarray(got), want)


def test_layouts_agree_and_jit_works():
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(x, jnp.float32) for x in random_qkv(rng, 1, 90, 2, 8))
    f = jax.jit(lambda q, k, v, layout: pj.piecewise_sparse_attention(
        q, k, v, block_size=16, density=0.3, layout=layout, implementation="reference"),
        static_argnums=3)
    a = f(q, k, v, "bthd")
    b = f(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), "bhtd")
    np.testing.assert_allclose(np.asarray(a), np.swapaxes(np.asarray(b), 1, 2), rtol=1e-6)
    assert a.dtype == jnp.float32


def test_selection_in_head_groups_matches_all_heads_at_once(monkeypatch):
    from pisa_jax import selection
    rng = np.random.default_rng(13)
    q, k, v = (jnp.asarray(x) for x in random_qkv(rng, 2, 200, 3, 16))
    st = pj.block_statistics(q, k, v, block_size=16, with_norms=True, implementation="reference")
    whole = pj.select_blocks(st, density=0.3, use_bias=True, forced_blocks=[1])
    monkeypatch.setattr(selection, "_SCORE_ELEMENTS", 2 * 13 * 13)   # two heads per step
    grouped = pj.select_blocks(st, density=0.3, use_bias=True, forced_blocks=[1])
    np.testing.assert_array_equal(np.asarray(grouped.indices), np.asarray(whole.indices))
