"""The Flax FLUX model's attention policy, token order, input checks and converter refusals."""

from __future__ import annotations

import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import pisa_jax.nn as pnn
from models.flux import Flux, FluxConfig
from models.flux.convert import CheckpointError, convert, load_flux, main as convert_main
from pisa_jax import AttentionPolicy, layer_policies
from pisa_jax.tokens import tile_major_permutation
from tests.helpers import relative_error

TINY = FluxConfig(in_channels=16, out_channels=16, vec_in_dim=12, context_in_dim=24,
                  hidden_size=32, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6))
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _inputs(seed=0, rows=6, cols=10, n_txt=7, b=2, guidance=True):
    rng = np.random.default_rng(seed)
    rr, cc = np.divmod(np.arange(rows * cols), cols)
    ids = np.stack([np.zeros_like(rr), rr, cc], -1).astype(np.float32)
    return dict(img=rng.standard_normal((b, rows * cols, 16)).astype(np.float32),
                img_ids=np.broadcast_to(ids, (b,) + ids.shape).copy(),
                txt=rng.standard_normal((b, n_txt, 24)).astype(np.float32),
                txt_ids=np.zeros((b, n_txt, 3), np.float32),
                timesteps=rng.uniform(size=b).astype(np.float32),
                y=rng.standard_normal((b, 12)).astype(np.float32),
                guidance=np.full((b,), 3.5, np.float32) if guidance else None)


def _model(policies, seed=0):
    return Flux(TINY, rngs=nnx.Rngs(seed), dtype=jnp.float32, policies=policies)


def test_tile_major_permutation_round_trip_on_partial_tiles():
    rows, cols = np.divmod(np.arange(13 * 21), 21)
    perm = np.asarray(tile_major_permutation(rows, cols))
    assert sorted(perm) == list(range(13 * 21))
    x = np.random.default_rng(0).standard_normal(13 * 21)
    np.testing.assert_array_equal(x[perm][np.argsort(perm)], x)
    first = perm[:64]
    assert rows[first].max() == 7 and cols[first].max() == 7      # one full 8x8 tile


def test_pisa_at_density_one_equals_dense_model_so_token_order_is_restored():
    io = _inputs()
    dense = _model((pnn.DENSE,) * 4)(**io)
    full = _model(layer_policies(4, dense_layers=0, density=1.0, block_size=16))(**io)
    assert relative_error(full, dense) < 1e-5
    # At density 0.3 each order adds accuracy: measured 0.047 (order 1), 0.084 (order 0),
    # 0.16 (keep-or-drop). Output in the wrong token order would be off by about 1.4, a
    # missing first-order term would make order 1 equal order 0.
    err = {order: relative_error(_model(layer_policies(
        4, dense_layers=0, density=0.3, block_size=16, order=order))(**io), dense)
        for order in (1, 0, -1)}
    assert 1e-3 < err[1] < 0.1
    assert err[1] < 0.8 * err[0] and err[0] < 0.8 * err[-1]


def test_policy_reaches_the_attention_calls_it_claims(monkeypatch):
    calls = []
    real_pisa, real_dense = pnn.piecewise_sparse_attention, pnn.dense_attention

    def spy_pisa(q, k, v, **kw):
        calls.append(("pisa", kw))
        return real_pisa(q, k, v, **kw)

    def spy_dense(q, k, v, **kw):
        calls.append(("dense", kw))
        return real_dense(q, k, v, **kw)

    monkeypatch.setattr(pnn, "piecewise_sparse_attention", spy_pisa)
    monkeypatch.setattr(pnn, "dense_attention", spy_dense)
    policies = layer_policies(4, dense_layers=1, density=0.4, block_size=16, exact_text=True,
                              order=0)
    model = _model(policies)
    io = _inputs()
    model(**io)
    assert [c[0] for c in calls] == ["dense", "pisa", "pisa", "pisa"]
    for _, kw in calls[1:]:
        assert kw["density"] == 0.4 and kw["order"] == 0 and kw["use_bias"] is True
        assert list(kw["forced_blocks"]) == [0]       # 7 text tokens lie in block 0
        assert kw["layout"] == "bthd"     # heads stay on axis 2: no transposed copies
    calls.clear()
    model(**io, dense=True)
    assert [c[0] for c in calls] == ["dense"] * 4


def test_pallas_policy_runs_the_kernels_and_agrees_with_reference():
    io = _inputs(seed=3)
    ref = _model(layer_policies(4, dense_layers=2, density=0.4, block_size=16,
                                implementation="reference"))(**io)
    pal = _model(layer_policies(4, dense_layers=2, density=0.4, block_size=16,
                                implementation="triton"))(**io)
    assert relative_error(pal, ref) < 1e-4


def test_model_runs_under_jit():
    model = _model(layer_policies(4, dense_layers=1, block_size=16))
    io = _inputs()
    eager = model(**io)
    jitted = nnx.jit(lambda m, io: m(**io))(model, io)
    assert relative_error(jitted, eager) < 1e-5


def test_bad_model_inputs_are_named():
    model = _model((pnn.DENSE,) * 4)
    io = _inputs()
    with pytest.raises(ValueError, match="pass guidance"):
        model(**(io | {"guidance": None}))
    with pytest.raises(ValueError, match=r"txt must have shape \[2, 7, 24\] \(B, L_txt, 24\); "
                                         r"got \[2, 7, 20\]"):
        model(**(io | {"txt": io["txt"][..., :20]}))
    # A rank-2 img is reported against the symbolic shape, not sizes read off wrong axes.
    with pytest.raises(ValueError, match=r"img must have shape \['B', 'L_img', 16\]; got \[60, 16\]"):
        model(**(io | {"img": io["img"][0]}))
    with pytest.raises(ValueError, match=r"at least one sample, one image token and one text "
                                         r"token; got img \[2, 60, 16\], txt \[2, 0, 24\]"):
        model(**(io | {"txt": io["txt"][:, :0], "txt_ids": io["txt_ids"][:, :0]}))
    with pytest.raises(ValueError, match=r"guidance must be a number or have shape \[2\]"):
        model(**(io | {"guidance": np.ones(3, np.float32)}))
    with pytest.raises(TypeError, match="dtype must be a floating dtype .*got int32"):
        Flux(TINY, rngs=nnx.Rngs(0), dtype=jnp.int32)
    with pytest.raises(ValueError, match="policies must hold one entry per attention layer"):
        _model((pnn.DENSE,) * 3)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        AttentionPolicy(density=0.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        AttentionPolicy(kind="sparse")


def _broken_copy(tmp_path, edit):
    src = os.path.join(FIXTURES, "flux_schnell_bfl.safetensors")
    tensors = load_file(src)
    edit(tensors)
    path = str(tmp_path / "broken.safetensors")
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("edit,pattern", [
    (lambda t: t.pop("double_blocks.1.txt_mlp.2.bias"), r"missing: \['double_blocks.1.txt_mlp.2.bias'\]"),
    (lambda t: t.update(extra=np.ones(3, np.float32)), r"unexpected: \['extra'\]"),
    (lambda t: t.update({"single_blocks.0.linear2.weight": np.ones((32, 100), np.float32)}),
     r"single_blocks.0.linear2.weight has shape \(32, 100\); the model expects \(32, 160\)"),
])
def test_converter_refuses_bad_checkpoints_and_leaves_nothing(tmp_path, edit, pattern):
    bad = _broken_copy(tmp_path, edit)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=pattern):
        convert(bad, str(out), axes_dim=(4, 6, 6), progress=lambda *_: None)
    assert sorted(os.listdir(tmp_path)) == ["broken.safetensors"]


def test_converter_refuses_an_existing_output_and_unknown_sources(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    src = os.path.join(FIXTURES, "flux_schnell_bfl.safetensors")
    assert convert_main([src, str(tmp_path / "out"), "--axes-dim", "4,6,6"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "nothing"), str(tmp_path / "o2")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_converter_cli_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "flux"
    pipe = tmp_path / "pipe"
    shutil.copytree(os.path.join(FIXTURES, "flux_dev_pipeline"), pipe)
    assert convert_main([str(pipe), str(out), "--dtype", "fp32"]) == 0
    # What was written loads and gives diffusers' output (fixture made with diffusers).
    io = dict(np.load(os.path.join(FIXTURES, "flux_dev_io.npz")))
    model = load_flux(str(out), dtype=jnp.float32, attention="dense")
    args = [io[k] for k in ("img", "img_ids", "txt", "txt_ids", "timesteps", "y")]
    assert relative_error(model(*args, guidance=io["guidance"]), io["expected"]) <= 1e-4


def test_schedule_runs_from_one_to_zero_and_shift_bends_it_towards_one():
    from models.flux.sampling import schedule
    plain = schedule(4, 4096, shift=False)
    np.testing.assert_allclose(plain, [1, 0.75, 0.5, 0.25, 0])
    shifted = schedule(4, 4096)
    assert shifted[0] == 1 and shifted[-1] == 0
    assert (np.diff(shifted) < 0).all() and (shifted[1:-1] > plain[1:-1]).all()
    with pytest.raises(ValueError, match="num_steps must be >= 1; got 0"):
        schedule(0, 16)


@pytest.mark.parametrize("shape", [(1, 3, 4, 2), (1, 4, 5, 2), (4, 4, 2), (1, 0, 4, 2)])
def test_pack_latents_refuses_odd_or_malformed_latents(shape):
    from models.flux.sampling import pack_latents
    with pytest.raises(ValueError, match=r"z must be \[B, h, w, C\].*got shape"):
        pack_latents(jnp.ones(shape))


@pytest.mark.parametrize("shape,h,w,message", [
    ((1, 5, 8), 4, 6, r"x must be \[B, 6, 4C\] for h=4, w=6; got shape \[1, 5, 8\]"),
    ((1, 6, 6), 4, 6, r"got shape \[1, 6, 6\]"),
    ((6, 8), 4, 6, r"got shape \[6, 8\]"),
    ((1, 6, 8), 3, 6, r"h and w must be even positive ints; got h=3, w=6"),
    ((1, 6, 8), 4.0, 6, r"got h=4.0"),
])
def test_unpack_latents_refuses_a_mismatched_grid(shape, h, w, message):
    from models.flux.sampling import unpack_latents
    with pytest.raises(ValueError, match=message):
        unpack_latents(jnp.ones(shape), h, w)


def test_euler_loop_refuses_malformed_sigmas_and_dense_steps():
    from models.flux.sampling import euler_loop
    img = jnp.ones((1, 4, 8))
    velocity = lambda x, t, dense: x
    with pytest.raises(ValueError, match=r"sigmas must be 1-D .*got shape \[1\]"):
        euler_loop(velocity, img, jnp.ones((1,)))
    with pytest.raises(ValueError, match=r"sigmas must be 1-D .*got shape \[2, 3\]"):
        euler_loop(velocity, img, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"dense_steps must be in \[0, 2\].*got 3"):
        euler_loop(velocity, img, jnp.asarray([1.0, 0.5, 0.0]), dense_steps=3)
    with pytest.raises(ValueError, match=r"dense_steps must be .*an integer; got True"):
        euler_loop(velocity, img, jnp.asarray([1.0, 0.5, 0.0]), dense_steps=True)


def test_denoise_dense_steps_switch_attention_per_step():
    from models.flux.sampling import denoise, schedule
    io = _inputs(seed=5)
    times = schedule(3, 60)
    args = (io["img"], io["img_ids"], io["txt"], io["txt_ids"], io["y"], times)
    pisa = _model(layer_policies(4, dense_layers=0, density=0.3, block_size=16))
    dense = _model((pnn.DENSE,) * 4)
    steps = []
    all_dense = denoise(pisa, *args, guidance=3.5, dense_steps=3,
                        progress=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    np.testing.assert_allclose(all_dense, denoise(dense, *args, guidance=3.5), rtol=1e-5,
                               atol=1e-5)
    some_sparse = denoise(pisa, *args, guidance=3.5, dense_steps=1)
    assert relative_error(some_sparse, all_dense) > 1e-5
    with pytest.raises(ValueError, match=r"dense_steps must be in \[0, 3\].*got 4"):
        denoise(pisa, *args, guidance=3.5, dense_steps=4)
    with pytest.raises(ValueError, match=r"times must be 1-D .*got shape \[1\]"):
        denoise(pisa, *args[:-1], times[:1], guidance=3.5)


def test_pisa_jax_convert_command_runs_the_converter(tmp_path):
    from models import cli
    src = os.path.join(FIXTURES, "flux_schnell_bfl.safetensors")
    out = tmp_path / "schnell"
    assert cli.main(["convert", src, str(out), "--axes-dim", "4,6,6"]) == 0
    # Every parameter as written equals the one loaded straight from the source (bf16).
    written = nnx.state(load_flux(str(out), attention="dense"), nnx.Param)
    direct = nnx.state(load_flux(src, attention="dense", axes_dim=(4, 6, 6)), nnx.Param)
    chex.assert_trees_all_equal(written, direct)
    assert jax.tree.leaves(written)[0].dtype == jnp.bfloat16


def test_guidance_and_timesteps_may_be_numbers():
    model = _model((pnn.DENSE,) * 4)
    io = _inputs(seed=2)
    io["timesteps"] = np.full((2,), 0.25, np.float32)
    want = model(**io)
    got = model(**(io | {"guidance": 3.5, "timesteps": 0.25}))
    chex.assert_trees_all_close(got, want, rtol=0, atol=0)
    got = nnx.jit(lambda m, g: m(**(io | {"guidance": g})))(model, jnp.float32(3.5))
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


def test_load_flux_refuses_options_that_do_nothing_and_integer_dtypes():
    src = os.path.join(FIXTURES, "flux_schnell_bfl.safetensors")
    with pytest.raises(ValueError, match=r"attention='dense' takes no PISA options .*\['density'\]"):
        load_flux(src, attention="dense", density=0.3, axes_dim=(4, 6, 6))
    with pytest.raises(ValueError, match=r"policies= sets every layer; the options \['density'\]"):
        load_flux(src, policies=(pnn.DENSE,) * 4, density=0.3, axes_dim=(4, 6, 6))
    with pytest.raises(TypeError, match="dtype must be a floating dtype .*got int32"):
        load_flux(src, dtype=jnp.int32, axes_dim=(4, 6, 6))
