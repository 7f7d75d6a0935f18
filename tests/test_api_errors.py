"""Bad input fails at the public boundary with a message naming the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pisa_jax as pj
from pisa_jax import nn as pnn


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
    with pytest.raises(ValueError, match=r"stats must come from q, k, v of \[B, T, H, D\] = "
                                         r"\[1, 90, 2, 16\]; they were computed for T = 100"):
        pj.piecewise_attention(q[:, :90], k[:, :90], v[:, :90], st, sel, implementation="reference")
    with pytest.raises(TypeError, match="stats must be a BlockStatistics"):
        pj.piecewise_attention(q, k, v, {"q_mean": 1}, sel, implementation="reference")
    # Statistics of another head dim (same T, B, H): refused by shape, not an einsum error.
    st8 = pj.block_statistics(q[..., :8], k[..., :8], v[..., :8], block_size=16,
                              implementation="reference")
    with pytest.raises(ValueError, match=r"\[1, 100, 2, 16\].*q_mean \(1, 2, 7, 8\)"):
        pj.piecewise_attention(q, k, v, st8, sel, implementation="reference")
    # A selection made for another block size (NT = 4 instead of 7).
    sel32 = pj.select_blocks(pj.block_statistics(q, k, v, block_size=32,
                                                 implementation="reference"))
    with pytest.raises(ValueError, match=r"selection must have indices \[B, H, NT, K\] = "
                                         r"\[1, 2, 7, K\].*got \(1, 2, 4, 1\) for NT = 4"):
        pj.piecewise_attention(q, k, v, st, sel32, implementation="reference")


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


# ------------------------------------------------------------------ hardening (issue cases)

def test_empty_dimensions_are_refused_by_name():
    q, k, v = _qkv()
    for bad in ((q[:, :0], k[:, :0], v[:, :0]), (q[..., :0], k[..., :0], v[..., :0])):
        with pytest.raises(ValueError, match=r"q must have at least one element along each "
                                             r"dimension \[B, T, H, D\]; got shape"):
            _call(qkv=bad)
        with pytest.raises(ValueError, match="at least one element"):
            pj.block_statistics(*bad, implementation="reference")
        with pytest.raises(ValueError, match="at least one element"):
            pj.dense_attention(*bad)


def test_float64_with_triton_is_refused_up_front():
    with jax.enable_x64(True):
        q, k, v = _qkv(dtype=jnp.float64)
        msg = (r"implementation='triton' takes bfloat16, float16, float32 inputs; got float64: "
               r"use implementation='reference'")
        with pytest.raises(TypeError, match=msg):
            _call(qkv=(q, k, v), implementation="triton", interpret=True)
        with pytest.raises(TypeError, match=msg):
            pj.block_statistics(q, k, v, implementation="triton", interpret=True)
        st = pj.block_statistics(q, k, v, block_size=16, implementation="reference")
        with pytest.raises(TypeError, match=msg):
            pj.piecewise_attention(q, k, v, st, pj.select_blocks(st), implementation="triton",
                                   interpret=True)
        assert _call(qkv=(q, k, v)).dtype == jnp.float64       # the reference takes it


def _selection(indices, nt=7):
    return pj.Selection(indices=jnp.asarray(indices, jnp.int32), num_blocks=nt)


def test_selection_indices_out_of_range_or_repeated_are_refused():
    q, k, v = _qkv()
    st = pj.block_statistics(q, k, v, block_size=16, implementation="reference")
    good = np.asarray(pj.select_blocks(st, density=0.3).indices)          # K = 2
    attend = lambda idx: pj.piecewise_attention(q, k, v, st, _selection(idx),
                                                implementation="reference")
    assert attend(good).shape == q.shape
    for value, pattern in ((7, r"must lie in \[0, 7\); got values from 0 to 7"),
                           (-1, r"must lie in \[0, 7\); got values from -1 to")):
        bad = good.copy()
        bad[0, 1, 3, 0] = value
        with pytest.raises(ValueError, match=pattern):
            attend(bad)
    bad = good.copy()
    bad[0, 0, 5, 1] = bad[0, 0, 5, 0]
    with pytest.raises(ValueError, match="must be distinct within each query block's row"):
        attend(bad)
    with pytest.raises(TypeError, match="selection.indices must be integers; got float32"):
        pj.piecewise_attention(q, k, v, st, pj.Selection(jnp.asarray(good, jnp.float32), 7),
                               implementation="reference")
    with pytest.raises(ValueError, match=r"1 <= K <= 7"):
        attend(np.zeros((1, 2, 7, 8), np.int32))
    # Under jit the values are not known: the shapes are still checked, the values not.
    jitted = jax.jit(lambda idx: pj.piecewise_attention(q, k, v, st, _selection(idx),
                                                        implementation="reference"))
    assert jitted(good).shape == q.shape


def test_numbers_given_as_arrays_are_taken_and_traced_ones_refused_clearly():
    q, k, v = _qkv()
    want = _call(scale=0.1, density=0.3)
    got = _call(scale=jnp.float32(0.1), density=np.float32(0.3))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(TypeError, match="scale must be a concrete number .* got a traced array"):
        jax.jit(lambda s: _call(scale=s))(0.1)
    with pytest.raises(TypeError, match="scale must be None or a finite positive number; got '1'"):
        _call(scale="1")
    with pytest.raises(TypeError, match="density must be a real number in \\(0, 1\\]; got True"):
        _call(density=True)


@pytest.mark.parametrize("kw,pattern", [
    (dict(use_bias="no"), "use_bias must be True or False; got 'no'"),
    (dict(order=True), r"order must be one of \(1, 0, -1\); got True"),
    (dict(interpret="yes"), "interpret must be True or False; got 'yes'"),
])
def test_flags_must_be_booleans(kw, pattern):
    with pytest.raises((TypeError, ValueError), match=pattern):
        _call(**kw)


def test_attention_module_default_layout_is_bthd_like_every_function():
    q, k, v = _qkv((1, 40, 3, 16))                       # [B, T, H, D]
    want = pj.dense_attention(q, k, v)
    np.testing.assert_allclose(pj.Attention()(q, k, v), want, rtol=1e-6, atol=1e-6)
    pisa = pj.Attention(pj.AttentionPolicy(density=1.0, block_size=16,
                                           implementation="reference"))
    np.testing.assert_allclose(pisa(q, k, v), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw,error,pattern", [
    (dict(implementation="typo"), ValueError, r"implementation must be one of .*got 'typo'"),
    (dict(use_bias="no"), TypeError, "use_bias must be True or False; got 'no'"),
    (dict(exact_text=1), TypeError, "exact_text must be True or False; got 1"),
    (dict(kind="dense", density=0.3), ValueError,
     r"AttentionPolicy\(kind='dense'\) takes no PISA options .*got \{'density': 0.3\}"),
])
def test_attention_policy_is_checked_when_built(kw, error, pattern):
    with pytest.raises(error, match=pattern):
        pj.AttentionPolicy(**kw)


def test_layer_policies_messages_name_the_bad_argument():
    with pytest.raises(ValueError, match="num_layers must be an integer >= 1; got -1"):
        pj.layer_policies(-1)
    with pytest.raises(ValueError, match=r"dense_layers must be in \[0, num_layers = 3\]; got 4"):
        pj.layer_policies(3)
    with pytest.raises(ValueError, match=r"all 2 layers are dense .* \['density'\] would do nothing"):
        pj.layer_policies(2, dense_layers=2, density=0.3)
    assert [p.kind for p in pj.layer_policies(3, dense_layers=1)] == ["dense", "pisa", "pisa"]


def test_attention_module_checks_its_call_options():
    q, k, v = _qkv((1, 40, 3, 16))
    attn = pj.Attention(pj.AttentionPolicy(block_size=16, exact_text=True,
                                           implementation="reference"))
    with pytest.raises(ValueError, match="num_text_tokens must be an integer >= 0; got -3"):
        attn(q, k, v, num_text_tokens=-3)
    with pytest.raises(TypeError, match="dense must be True or False; got 'no'"):
        attn(q, k, v, dense="no")


def test_model_policies_follow_the_attention_setting_and_refuse_idle_options():
    assert pj.model_policies(6, "dense") == (pnn.DENSE,) * 6
    kinds = [p.kind for p in pj.model_policies(6, density=0.3)]
    assert kinds == ["dense"] * 4 + ["pisa"] * 2                      # the published setting
    assert all(p.density == 0.3 for p in pj.model_policies(6, density=0.3)[4:])
    assert pj.model_policies(3) == (pnn.DENSE,) * 3                   # fewer layers: all dense
    assert [p.kind for p in pj.model_policies(3, dense_layers=1)] == ["dense", "pisa", "pisa"]
    with pytest.raises(ValueError, match=r"attention='dense' takes no PISA options.*density"):
        pj.model_policies(6, "dense", density=0.3)
    with pytest.raises(ValueError, match="attention must be 'pisa' or 'dense'; got 'sparse'"):
        pj.model_policies(6, "sparse")
