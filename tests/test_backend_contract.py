"""The results contract every backend meets, written once and run for each backend that
can run here: against the independent float64 NumPy PISA of `tests.helpers`.

On the CPU: the reference and the Triton kernels in interpret mode (float32). On a GPU
(`-m gpu` is not needed: these are cheap) the Triton kernels compiled, and on a Hopper
GPU the Mosaic backend in bfloat16 (its attention does not take float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pisa_jax as pj
from pisa_jax.kernels.dispatch import mosaic_unavailable
from tests.helpers import numpy_pisa, random_qkv, relative_error

_ON_GPU = jax.default_backend() == "gpu"
_NO_MOSAIC = mosaic_unavailable()

# (options, input dtype, relative-error bound against float64): float32 backends are
# held to float32 rounding; bfloat16 to bfloat16's, against float64 of the same inputs.
BACKENDS = [
    pytest.param(dict(implementation="reference"), jnp.float32, 1e-5, id="reference"),
    pytest.param(dict(implementation="triton", interpret=not _ON_GPU), jnp.float32, 1e-5,
                 id="triton-interpret" if not _ON_GPU else "triton"),
    pytest.param(dict(implementation="mosaic"), jnp.bfloat16, 1e-2, id="mosaic",
                 marks=pytest.mark.skipif(bool(_NO_MOSAIC), reason=f"Mosaic GPU: {_NO_MOSAIC}")),
]
BLOCK = 64      # the published block size (every backend also takes 128: tested below)


def _inputs(seed, t, d, layout="bthd", dtype=jnp.float32, h=2):
    """q, k, v in `dtype`, and the same values in float64 for the NumPy oracle."""
    rng = np.random.default_rng(seed)
    xs = [jnp.asarray(x, dtype) for x in random_qkv(rng, 1, t, h, d, layout)]
    return xs, [np.asarray(x, np.float64) for x in xs]


@pytest.mark.parametrize("options,dtype,bound", BACKENDS)
@pytest.mark.parametrize("order,layout,t", [(1, "bthd", 200), (0, "bhtd", 200),
                                            (-1, "bthd", 256)])
def test_whole_op_matches_float64_numpy(options, dtype, bound, order, layout, t):
    # 200 tokens: 3 whole blocks and one of 8 tokens; forced last block; biased selection.
    (q, k, v), f64 = _inputs(t + order, t, 64, layout, dtype)
    opts = dict(density=0.5, block_size=BLOCK, order=order, use_bias=True, layout=layout)
    got = pj.piecewise_sparse_attention(q, k, v, forced_blocks=[-1], **opts, **options)
    want, _ = numpy_pisa(*f64, forced=(-1,), **opts)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert relative_error(got, want) < bound


@pytest.mark.parametrize("options,dtype,bound", BACKENDS)
@pytest.mark.parametrize("order", [1, -1])
def test_block_128_whole_op_matches_float64_numpy(options, dtype, bound, order):
    # 300 tokens: blocks of 128, 128 and 44 tokens; 2 selected per query block (one of
    # them the forced last block), the third by the zeroth order.
    if _ON_GPU and options["implementation"] == "triton":   # block 128 in half precision there
        dtype, bound = jnp.bfloat16, 1e-2
    (q, k, v), f64 = _inputs(11 + order, 300, 64, dtype=dtype)
    opts = dict(density=0.7, block_size=128, order=order, use_bias=True)
    got = pj.piecewise_sparse_attention(q, k, v, forced_blocks=[-1], **opts, **options)
    want, sets = numpy_pisa(*f64, forced=(-1,), **opts)
    assert sets.sum(-1).max() == 2 and sets[..., -1].all()
    assert got.shape == q.shape and got.dtype == q.dtype
    assert relative_error(got, want) < bound


@pytest.mark.parametrize("options,dtype,bound", BACKENDS)
def test_stages_compose_to_the_whole_op_and_select_the_numpy_sets(options, dtype, bound):
    (q, k, v), f64 = _inputs(3, 300, 32, dtype=dtype)
    stats = pj.block_statistics(q, k, v, block_size=BLOCK, with_norms=True, **options)
    sel = pj.select_blocks(stats, density=0.4, use_bias=True, **options)
    staged = pj.piecewise_attention(q, k, v, stats, sel, **options)
    whole = pj.piecewise_sparse_attention(q, k, v, density=0.4, block_size=BLOCK,
                                          use_bias=True, **options)
    np.testing.assert_array_equal(np.asarray(staged), np.asarray(whole))
    want, sets = numpy_pisa(*f64, density=0.4, block_size=BLOCK, use_bias=True)
    got_sets = np.zeros_like(sets)
    np.put_along_axis(got_sets, np.asarray(sel.indices), True, axis=-1)
    np.testing.assert_array_equal(got_sets, sets)
    assert relative_error(staged, want) < bound


@pytest.mark.parametrize("options,dtype,bound", BACKENDS)
def test_statistics_match_their_definitions(options, dtype, bound):
    (q, k, v), (qf, kf, vf) = _inputs(5, 150, 16, dtype=dtype)      # 3 blocks, last of 22
    st = pj.block_statistics(q, k, v, block_size=BLOCK, with_norms=True, **options)
    spans = [(0, 64), (64, 128), (128, 150)]
    per_head = lambda x: np.swapaxes(x, 1, 2)[0]                     # [H, T, D]
    qh, kh, vh = per_head(qf), per_head(kf), per_head(vf)
    km = np.stack([kh[:, a:e].mean(1) for a, e in spans], 1)
    want = {"q_mean": np.stack([qh[:, a:e].mean(1) for a, e in spans], 1)[None],
            "k_mean": km[None],
            "v_sum": np.stack([vh[:, a:e].sum(1) for a, e in spans], 1)[None],
            "moment": sum(np.einsum("htd,hte->hde", kh[:, a:e] - km[:, j, None], vh[:, a:e])
                          for j, (a, e) in enumerate(spans))[None]}
    # Means and sums accumulate in float32. The moment's product takes its operands in the
    # input dtype (the centred keys are rounded to it), so half inputs carry that rounding.
    half = jnp.dtype(dtype).itemsize < 4
    for name, value in want.items():
        tol = bound if (name == "moment" and half) else 1e-5
        assert relative_error(getattr(st, name), value) < tol, name


@pytest.mark.parametrize("options,dtype,bound", BACKENDS)
def test_density_one_is_dense_attention(options, dtype, bound):
    (q, k, v), f64 = _inputs(7, 130, 64, dtype=dtype)
    got = pj.piecewise_sparse_attention(q, k, v, density=1.0, block_size=BLOCK, **options)
    want = pj.dense_attention(*(jnp.asarray(x, jnp.float32) for x in f64),
                              implementation="reference")
    assert relative_error(got, want) < bound
