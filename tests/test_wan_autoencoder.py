"""The Wan2.1 video autoencoder in Flax against diffusers' AutoencoderKLWan (float32).

Fixtures were made by tests/fixtures/make_wan_vae_fixtures.py with diffusers 0.42.1: a
tiny random AutoencoderKLWan with Wan2.1's structure (8x spatial, 4x temporal
compression), saved by diffusers (vae/), and diffusers' chunked encode and decode of a
9-frame video and of 3 latent frames (io.npz, NCFHW). Encode and decode are checked in
both modes: streaming (the default: chunk by chunk in a scan) and over the whole clip.
"""

from __future__ import annotations

import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.checkpoint import CheckpointError, read_json
from models.wan.autoencoder import (WAN_VAE, WanAutoencoderConfig, from_transformer_layout,
                                    load_wan_autoencoder, to_transformer_layout)
from tests.helpers import broken_folder, relative_error

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "wan_vae")
VAE = os.path.join(HERE, "vae")
# Two float32 evaluations of the same math in another order (jit fusion, attention
# chunks) differ by rounding, grown through ~30 layers of the tiny random network.
SAME = 1e-5

channels_last = lambda x: np.moveaxis(x, 1, -1)                       # NCFHW -> NFHWC
channels_first = lambda x: np.moveaxis(np.asarray(x, np.float32), -1, 1)

# Compiled once per model structure, input shape and mode (an eager scan recompiles its
# body at every call).
encode = nnx.jit(lambda m, x, streaming: m.encode(x, streaming=streaming),
                 static_argnames="streaming")
decode = nnx.jit(lambda m, z, streaming: m.decode(z, streaming=streaming),
                 static_argnames="streaming")


@pytest.fixture(scope="module")
def io():
    return dict(np.load(os.path.join(HERE, "io.npz")))


@pytest.fixture(scope="module")
def model():
    return load_wan_autoencoder(VAE, dtype=jnp.float32)


@pytest.fixture(scope="module")
def outputs(model, io):
    """Float32 (encoded, decoded), channels last, streaming (the default), jitted."""
    return (encode(model, channels_last(io["video"]), streaming=True),
            decode(model, channels_last(io["latents"]), streaming=True))


@pytest.fixture(scope="module")
def whole(model, io):
    """The same over the whole clip at once, eager."""
    return (model.encode(channels_last(io["video"]), streaming=False),
            model.decode(channels_last(io["latents"]), streaming=False))


@pytest.mark.parametrize("mode", ["outputs", "whole"])
def test_matches_diffusers_in_float32(mode, request, io):
    encoded, decoded = request.getfixturevalue(mode)
    assert encoded.shape == (2, 3, 2, 3, 16) and encoded.dtype == jnp.float32
    assert relative_error(channels_first(encoded), io["encoded"]) <= 1e-4
    assert decoded.shape == (2, 9, 16, 24, 3) and decoded.dtype == jnp.float32
    assert relative_error(channels_first(decoded), io["decoded"]) <= 1e-4
    assert float(jnp.abs(decoded).max()) <= 1.0          # clipped as diffusers clips


def test_streaming_equals_whole_clip(outputs, whole):
    # 9 frames: frame 0, then a scan over two chunks of 4; 3 latent frames: 0, then 2
    # steps. Streaming under jit against the eager whole-clip pass.
    for streamed, at_once in zip(outputs, whole):
        assert relative_error(streamed, at_once) <= SAME


def test_bfloat16_model_stays_close_to_float32(io):
    ae = load_wan_autoencoder(VAE)
    encoded = encode(ae, channels_last(io["video"]), streaming=True)
    decoded = decode(ae, channels_last(io["latents"]), streaming=True)
    assert encoded.dtype == decoded.dtype == jnp.bfloat16
    assert relative_error(channels_first(encoded), io["encoded"]) <= 1e-2
    assert relative_error(channels_first(decoded), io["decoded"]) <= 5e-2


def test_jit_matches_eager(model, whole, io):
    encoded, decoded = whole
    assert relative_error(decode(model, channels_last(io["latents"]), streaming=False),
                          decoded) <= SAME
    encode_closed = jax.jit(lambda x: model.encode(x, streaming=False))   # weights as constants
    assert relative_error(encode_closed(channels_last(io["video"])), encoded) <= SAME


@pytest.mark.parametrize("streaming", [True, False])
def test_short_clips_are_the_long_clips_start(model, whole, io, streaming):
    # Causal in time: the first 1 and 5 frames encode to the first 1 and 2 latent frames
    # of the 9-frame clip, which decode to its first 1 and 5 frames. Streaming (eager),
    # 1 frame is the first chunk alone (no scan: the whole-clip pass) and 5 frames the
    # first chunk and one scan step.
    video, latents = channels_last(io["video"]), channels_last(io["latents"])
    cases = ((1, 1), (5, 2)) if streaming else ((5, 2),)
    for frames, latent_frames in cases:
        encoded = (model.encode(video[:, :frames]) if streaming else
                   encode(model, video[:, :frames], streaming=False))
        assert encoded.shape == (2, latent_frames, 2, 3, 16)
        assert relative_error(encoded, whole[0][:, :latent_frames]) <= SAME
        assert relative_error(channels_first(encoded),
                              io["encoded"][:, :, :latent_frames]) <= 1e-4
        decoded = (model.decode(latents[:, :latent_frames]) if streaming else
                   decode(model, latents[:, :latent_frames], streaming=False))
        assert decoded.shape == (2, frames, 16, 24, 3)
        assert relative_error(decoded, whole[1][:, :frames]) <= SAME
        assert relative_error(channels_first(decoded), io["decoded"][:, :, :frames]) <= 1e-4


def test_streaming_decode_memory_does_not_grow_with_the_clip(model):
    # XLA's compile-time estimate of the buffers a jitted decode needs besides its
    # arguments and output: from 5 to 17 latent frames streaming stays flat but for
    # latent-sized buffers; the whole-clip pass needs several times more.
    graph, state = nnx.split(model)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)

    def temp(frames, streaming):
        decode = jax.jit(lambda s, z: nnx.merge(graph, s).decode(z, streaming=streaming))
        z = jax.ShapeDtypeStruct((1, frames, 8, 8, 16), jnp.float32)
        return decode.lower(state, z).compile().memory_analysis().temp_size_in_bytes

    streaming = temp(17, True)
    assert streaming <= 1.05 * temp(5, True)
    assert temp(17, False) >= 4 * streaming


def test_tiny_attention_chunks_match(whole, io):
    small = load_wan_autoencoder(VAE, dtype=jnp.float32, attention_chunk=4)   # 6 positions
    decoded = small.decode(channels_last(io["latents"]), streaming=False)
    assert relative_error(decoded, whole[1]) <= SAME


def test_transformer_layout_round_trip(outputs):
    encoded, _ = outputs
    wan = to_transformer_layout(encoded)
    assert wan.shape == (2, 16, 3, 2, 3)
    np.testing.assert_array_equal(wan[:, 5, 1], encoded[:, 1, ..., 5])
    np.testing.assert_array_equal(from_transformer_layout(wan), encoded)


@pytest.mark.parametrize("shape,what", [
    ((2, 3, 9, 16, 24), "channels last"),      # NCFHW by mistake
    ((2, 8, 16, 24, 3), "1 + 4k frames"),
    ((2, 9, 12, 24, 3), "multiples of 8; got 12x24"),
    ((9, 16, 24, 3), "[B, F, H, W, 3]"),
])
def test_encode_refuses_bad_shapes(model, shape, what):
    with pytest.raises(ValueError, match=r"video .*" + str(list(shape)).replace(
            "[", r"\[").replace("]", r"\]")) as e:
        model.encode(jnp.zeros(shape))
    assert what in str(e.value)


@pytest.mark.parametrize("shape", [(2, 16, 3, 2, 3), (2, 3, 2, 3, 4), (3, 2, 3, 16)])
def test_decode_refuses_bad_shapes(model, shape):
    with pytest.raises(ValueError, match=r"latents must be \[B, F, h, w, 16\].*got shape"):
        model.decode(jnp.zeros(shape))


def test_pipeline_folder_finds_its_vae(tmp_path, io):
    shutil.copytree(VAE, tmp_path / "vae")
    ae = load_wan_autoencoder(str(tmp_path), dtype=jnp.float32)
    assert relative_error(channels_first(ae.encode(channels_last(io["video"]))),
                          io["encoded"]) <= 1e-4


def test_missing_tensor_is_named(tmp_path):
    name = "decoder.up_blocks.0.upsamplers.0.time_conv.bias"
    folder = broken_folder(VAE, tmp_path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"missing: \['" + name):
        load_wan_autoencoder(folder)


def test_unexpected_tensor_is_named(tmp_path):
    folder = broken_folder(VAE, tmp_path, lambda t: t.update(
        {"encoder.down_blocks.9.conv1.weight": jnp.zeros((4, 4, 3, 3, 3))}))
    with pytest.raises(CheckpointError,
                       match=r"unexpected: \['encoder.down_blocks.9.conv1.weight'\]"):
        load_wan_autoencoder(folder)


@pytest.mark.parametrize("name,shape,want", [
    ("encoder.mid_block.attentions.0.to_qkv.weight", (24, 4, 1, 1), (24, 8)),
    ("decoder.conv_in.weight", (8, 16, 3, 3, 1), (8, 16, 3, 3, 3)),
    ("decoder.norm_out.gamma", (4, 1, 2, 1), (4,)),
])
def test_misshaped_tensor_is_named(tmp_path, name, shape, want):
    folder = broken_folder(VAE, tmp_path, lambda t: t.update({name: jnp.zeros(shape)}))
    with pytest.raises(CheckpointError, match=re.escape(
            f"tensor {name} has shape {shape}; the model expects {want}")):
        load_wan_autoencoder(folder)


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"needs config.json"):
        load_wan_autoencoder(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"no such folder"):
        load_wan_autoencoder(str(tmp_path / "absent"))


def test_config_reads_diffusers_and_refuses_what_is_not_implemented(tmp_path):
    meta = read_json(os.path.join(VAE, "config.json"))
    cfg = WanAutoencoderConfig.from_diffusers(meta)
    assert cfg.dim_mult == (1, 2, 2, 2) and cfg.temperal_downsample == (False, True, True)
    assert cfg.base_dim == 4 and cfg.num_res_blocks == 1 and cfg.latents_std[-1] == 1.916
    assert (cfg.spatial_factor, cfg.temporal_factor) == (8, 4)
    assert WAN_VAE.base_dim == 96 and WAN_VAE.dim_mult == (1, 2, 4, 4)      # released VAE
    with pytest.raises(ValueError, match="is_residual"):
        WanAutoencoderConfig.from_diffusers(meta | {"is_residual": True})
    with pytest.raises(ValueError, match=r"scale_factor_temporal': 8\} but its levels give"):
        WanAutoencoderConfig.from_diffusers(meta | {"scale_factor_temporal": 8})
    with pytest.raises(ValueError, match=r"temperal_downsample needs one entry per level"):
        WanAutoencoderConfig(temperal_downsample=(True, True))
    with pytest.raises(ValueError, match=r"at most two temporal downsamplings"):
        WanAutoencoderConfig(temperal_downsample=(True, True, True))
    with pytest.raises(ValueError, match=r"latents_std needs z_dim \(16\) values; got 3"):
        WanAutoencoderConfig(latents_std=(1.0, 2.0, 3.0))
    bad = tmp_path / "vae"
    shutil.copytree(VAE, bad)
    (bad / "config.json").write_text(
        (tmp_path / "vae" / "config.json").read_text().replace('"patch_size": null',
                                                               '"patch_size": 2'))
    with pytest.raises(CheckpointError, match=r"config.json: not a valid AutoencoderKLWan "
                                              r"configuration .*patch_size"):
        load_wan_autoencoder(str(bad))


def test_load_refuses_float16():
    with pytest.raises(ValueError, match=r"dtype must be bfloat16 or float32"):
        load_wan_autoencoder(VAE, dtype=jnp.float16)
