"""The FLUX.1 autoencoder in Flax against diffusers' AutoencoderKL (float32).

Fixtures were made by tests/fixtures/make_autoencoder_fixtures.py with diffusers 0.42.1:
a tiny random AutoencoderKL with FLUX's structure, saved by diffusers (vae/) and in Black
Forest Labs' single-file layout (ae.safetensors), and diffusers' outputs (io.npz, NCHW).
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.checkpoint import CheckpointError, read_json
from models.flux.autoencoder import (FLUX_AE, AutoEncoderConfig, config_from_single_file,
                                     load_autoencoder)
from models.attention_chunks import chunked_attention
from tests.helpers import broken_folder, relative_error

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "autoencoder")
VAE = os.path.join(HERE, "vae")
SINGLE = os.path.join(HERE, "ae.safetensors")
# The single file cannot tell the GroupNorm groups; the tiny model has 4.
TINY_NORMS = dataclasses.replace(FLUX_AE, norm_num_groups=4)

nhwc = lambda x: np.transpose(x, (0, 2, 3, 1))
nchw = lambda x: np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2))


@pytest.fixture(scope="module")
def io():
    return dict(np.load(os.path.join(HERE, "io.npz")))


@pytest.fixture(scope="module")
def model():
    return load_autoencoder(VAE, dtype=jnp.float32)


def _load(source, **kw):
    if source == "single":
        return load_autoencoder(SINGLE, config=config_from_single_file(SINGLE, TINY_NORMS), **kw)
    return load_autoencoder(VAE, **kw)


@pytest.mark.parametrize("source", ["diffusers", "single"])
def test_matches_diffusers_in_float32(source, io):
    ae = _load(source, dtype=jnp.float32)
    encoded = ae.encode(nhwc(io["images"]))
    assert encoded.shape == (2, 4, 6, 16) and encoded.dtype == jnp.float32
    assert relative_error(nchw(encoded), io["encoded"]) <= 1e-4
    decoded = ae.decode(nhwc(io["latents"]))
    assert decoded.shape == (2, 16, 24, 3) and decoded.dtype == jnp.float32
    assert relative_error(nchw(decoded), io["decoded"]) <= 1e-4


def test_single_file_structure_is_read_from_shapes():
    cfg = config_from_single_file(SINGLE, TINY_NORMS)
    assert cfg == AutoEncoderConfig.from_diffusers(read_json(os.path.join(VAE, "config.json")))
    assert cfg.block_out_channels == (8, 8, 16) and cfg.layers_per_block == 1


def test_pipeline_folder_finds_its_vae(tmp_path, io):
    shutil.copytree(VAE, tmp_path / "vae")
    ae = load_autoencoder(str(tmp_path), dtype=jnp.float32)
    assert relative_error(nchw(ae.decode(nhwc(io["latents"]))), io["decoded"]) <= 1e-4


def test_bfloat16_model_stays_close_to_float32(io):
    ae = _load("diffusers")
    decoded = ae.decode(nhwc(io["latents"]))
    assert decoded.dtype == jnp.bfloat16
    assert relative_error(nchw(decoded), io["decoded"]) <= 5e-2


@pytest.mark.parametrize("t,chunk", [(37, 5), (64, 16), (20, 1)])
def test_chunked_attention_equals_unchunked(t, chunk):
    rng = np.random.default_rng(t)
    q, k, v = (rng.standard_normal((2, t, 8)).astype(np.float32) for _ in range(3))
    s = np.einsum("bqc,bkc->bqk", q.astype(np.float64), k) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bqk,bkc->bqc", p / p.sum(-1, keepdims=True), v)
    whole = chunked_attention(q, k, v, t)
    chunked = chunked_attention(q, k, v, chunk)
    assert chunked.shape == (2, t, 8)
    assert relative_error(whole, ref) <= 1e-6
    assert relative_error(chunked, whole) <= 1e-6


def test_model_with_tiny_attention_chunks_matches(model, io):
    small = load_autoencoder(VAE, dtype=jnp.float32, attention_chunk=5)   # 24 positions
    z = nhwc(io["latents"])
    assert relative_error(small.decode(z), model.decode(z)) <= 1e-6
    x = nhwc(io["images"])
    assert relative_error(small.encode(x), model.encode(x)) <= 1e-6


def test_jit_matches_eager(model, io):
    z = nhwc(io["latents"])
    decode = nnx.jit(lambda m, z: m.decode(z))
    encode = jax.jit(lambda x: model.encode(x))
    assert relative_error(decode(model, z), model.decode(z)) <= 1e-6
    x = nhwc(io["images"])
    assert relative_error(encode(x), model.encode(x)) <= 1e-6


@pytest.mark.parametrize("shape,what", [
    ((2, 3, 16, 24), "channels last"),     # NCHW by mistake
    ((2, 18, 24, 3), "multiples of 4"),    # height not a multiple of the factor
    ((16, 24, 3), "[B, H, W, 3]"),
])
def test_encode_refuses_bad_shapes(model, shape, what):
    with pytest.raises(ValueError, match=r"images must be .*" + str(list(shape)).replace(
            "[", r"\[").replace("]", r"\]")) as e:
        model.encode(jnp.zeros(shape))
    assert what in str(e.value)


@pytest.mark.parametrize("shape", [(2, 4, 6, 4), (2, 16, 4, 6), (4, 6, 16)])
def test_decode_refuses_bad_shapes(model, shape):
    with pytest.raises(ValueError, match=r"latents must be \[B, h, w, 16\]"):
        model.decode(jnp.zeros(shape))


def test_missing_tensor_is_named(tmp_path):
    name = "decoder.up_blocks.0.resnets.1.norm2.bias"
    folder = broken_folder(VAE, tmp_path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"missing: \['" + name):
        load_autoencoder(folder)


def test_unexpected_tensor_is_named(tmp_path):
    folder = broken_folder(VAE, tmp_path, lambda t: t.update(
        {"quant_conv.weight": jnp.zeros((32, 32, 1, 1))}))
    with pytest.raises(CheckpointError, match=r"unexpected: \['quant_conv.weight'\]"):
        load_autoencoder(folder)


def test_misshaped_tensor_is_named(tmp_path):
    name = "encoder.mid_block.attentions.0.to_k.weight"
    folder = broken_folder(VAE, tmp_path, lambda t: t.update({name: jnp.zeros((16, 8))}))
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape \(16, 8\); the "
                                              r"model expects \(16, 16\)"):
        load_autoencoder(folder)


def test_config_refuses_what_is_not_implemented():
    cfg = read_json(os.path.join(VAE, "config.json"))
    with pytest.raises(ValueError, match="use_quant_conv"):
        AutoEncoderConfig.from_diffusers(cfg | {"use_quant_conv": True})
    with pytest.raises(ValueError, match="multiples of norm_num_groups"):
        AutoEncoderConfig(block_out_channels=(8, 12), norm_num_groups=8)
    assert AutoEncoderConfig.from_diffusers(cfg).downsample_factor == 4
    assert FLUX_AE.downsample_factor == 8


def test_single_file_without_a_fitting_config_names_the_file():
    # The tiny file's channels are not multiples of FLUX's 32 GroupNorm groups.
    with pytest.raises(CheckpointError, match=r"ae\.safetensors: the channels in the file do "
                                              r"not fit the config \(pass config="):
        load_autoencoder(SINGLE)


@pytest.mark.parametrize("dtype,message", [("foo", "got 'foo'"), (jnp.int32, "got int32")])
def test_load_refuses_a_dtype_that_is_not_floating(dtype, message):
    with pytest.raises(TypeError, match=r"dtype must be a floating dtype.*" + message):
        load_autoencoder(VAE, dtype=dtype)
