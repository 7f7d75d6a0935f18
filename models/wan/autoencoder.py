"""The Wan2.1 video autoencoder (VAE) in Flax NNX, channels-last, and its loading.

The network is diffusers' `AutoencoderKLWan` as configured in Wan2.1's `vae/config.json`:
causal 3D convolutions, RMS norms, a per-frame attention in the mid blocks, 8x spatial
and 4x temporal compression (`F = 1 + 4k` frames -> `1 + k` latent frames) to a diagonal
Gaussian over 16 channels (we keep its mean). It runs either streaming (the default), a
`lax.scan` over chunks of the clip that carries each causal layer's last frames as
diffusers' chunk-by-chunk inference does, so that memory does not grow with the clip,
or over the whole clip at once; both match diffusers (see `autoencoder_layers`). Latents are
exchanged normalized per channel, `(mean - latents_mean) / latents_std`, as Wan's
transformer sees them.

`load_wan_autoencoder` reads a diffusers `vae/` folder (or a pipeline folder holding one);
parameter paths are diffusers' names, refusing missing, unexpected or mis-shaped tensors
by name before reading any.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from models.attention_chunks import check_chunk
from models.checkpoint import (CheckpointError, TensorFiles, fill_model, flat_params,
                               read_json, safetensors_files)
from models.conversion import checked_config, plan_stream, torch_layout
from models.wan.autoencoder_layers import Decoder, Encoder
from models.wan.model import check_dtype

# Wan2.1's per-channel latent statistics (diffusers' defaults, the released config's).
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# diffusers' encoder takes frame 0, then chunks of this many frames.
ENCODER_CHUNK = 4


@dataclasses.dataclass(frozen=True)
class WanAutoencoderConfig:
    """Hyperparameters, named as in diffusers' AutoencoderKLWan config (`dropout` is
    accepted and ignored: inference only)."""
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)          # one per level
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()               # encoder levels with attention
    temperal_downsample: tuple[bool, ...] = (False, True, True)   # one per level but last
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD
    in_channels: int = 3
    out_channels: int = 3
    decoder_base_dim: int | None = None               # None: base_dim

    def __post_init__(self):
        tup = lambda name, kind: object.__setattr__(
            self, name, tuple(kind(v) for v in getattr(self, name)))
        tup("dim_mult", int), tup("attn_scales", float), tup("temperal_downsample", bool)
        tup("latents_mean", float), tup("latents_std", float)
        ints = dict(base_dim=self.base_dim, z_dim=self.z_dim,
                    num_res_blocks=self.num_res_blocks, in_channels=self.in_channels,
                    out_channels=self.out_channels, decoder_dim=self.decoder_dim)
        bad = {k: v for k, v in ints.items() if not isinstance(v, int) or v < 1}
        if bad or not self.dim_mult or min(self.dim_mult) < 1:
            raise ValueError(f"WanAutoencoderConfig: dims, z_dim, num_res_blocks and "
                             f"channels must be positive integers and dim_mult non-empty "
                             f"positive; got {bad or self.dim_mult}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"WanAutoencoderConfig: temperal_downsample needs one entry per "
                             f"level but the last ({len(self.dim_mult) - 1}); got "
                             f"{list(self.temperal_downsample)}")
        if ENCODER_CHUNK % self.temporal_factor:
            raise ValueError(f"WanAutoencoderConfig: at most two temporal downsamplings "
                             f"(diffusers encodes chunks of {ENCODER_CHUNK} frames); got "
                             f"temperal_downsample {list(self.temperal_downsample)}")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"WanAutoencoderConfig: {name} needs z_dim ({self.z_dim}) "
                                 f"values; got {len(getattr(self, name))}")
        if min(self.latents_std) <= 0:
            raise ValueError(f"WanAutoencoderConfig: latents_std must be positive; got "
                             f"{list(self.latents_std)}")

    @property
    def decoder_dim(self) -> int:
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

    @property
    def spatial_factor(self) -> int:
        """Video side / latent side: 2 per level but the last (8 for Wan2.1)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """(frames - 1) / (latent frames - 1): 2 per temporal downsampling (4 for Wan2.1)."""
        return 2 ** sum(self.temperal_downsample)

    @classmethod
    def from_diffusers(cls, config: dict) -> "WanAutoencoderConfig":
        """From an AutoencoderKLWan `config.json` dict (diffusers' defaults for absent keys).

        Raises `ValueError` for settings this network does not implement (Wan2.2's
        residual blocks or patching) or compression factors the structure contradicts.
        """
        get = lambda k, d: config.get(k) if config.get(k) is not None else d
        unsupported = {"is_residual": (get("is_residual", False), False),
                       "patch_size": (config.get("patch_size"), None)}
        bad = {k: got for k, (got, want) in unsupported.items() if got != want}
        if bad:
            raise ValueError(f"unsupported AutoencoderKLWan settings {bad}; expected "
                             + str({k: unsupported[k][1] for k in bad}))
        cfg = cls(base_dim=get("base_dim", 96), z_dim=get("z_dim", 16),
                  dim_mult=get("dim_mult", (1, 2, 4, 4)),
                  num_res_blocks=get("num_res_blocks", 2),
                  attn_scales=get("attn_scales", ()),
                  temperal_downsample=get("temperal_downsample", (False, True, True)),
                  dropout=float(get("dropout", 0.0)),
                  latents_mean=get("latents_mean", LATENTS_MEAN),
                  latents_std=get("latents_std", LATENTS_STD),
                  in_channels=get("in_channels", 3), out_channels=get("out_channels", 3),
                  decoder_base_dim=config.get("decoder_base_dim"))
        factors = {"scale_factor_spatial": cfg.spatial_factor,
                   "scale_factor_temporal": cfg.temporal_factor}
        wrong = {k: config[k] for k, v in factors.items() if config.get(k) not in (None, v)}
        if wrong:
            raise ValueError(f"config says {wrong} but its levels give "
                             + str({k: factors[k] for k in wrong}))
        return cfg


WAN_VAE = WanAutoencoderConfig()


def to_transformer_layout(latents: Float[Array, "b f h w z"]) -> Float[Array, "b z f h w"]:
    """`[B, F, H, W, 16]` (this module's latents) -> `[B, 16, F, H, W]` (Wan's transformer)."""
    return jnp.moveaxis(latents, -1, 1)


def from_transformer_layout(latents: Float[Array, "b z f h w"]) -> Float[Array, "b f h w z"]:
    """`[B, 16, F, H, W]` (Wan's transformer) -> `[B, F, H, W, 16]` (this module's latents)."""
    return jnp.moveaxis(latents, 1, -1)


class WanAutoencoder(nnx.Module):
    """The Wan2.1 video autoencoder, channels-last.

    `dtype` is the parameter and compute dtype, bfloat16 or float32 (RMS norms and the
    attention softmax are float32 regardless). `attention_chunk` is the number of query
    positions the mid-block attention takes per step; None keeps at most 2^26 scores at
    once (exact softmax either way). Raises ValueError for another `dtype`.
    """

    def __init__(self, config: WanAutoencoderConfig = WAN_VAE, *, rngs: nnx.Rngs,
                 dtype=jnp.bfloat16, attention_chunk: int | None = None):
        check_chunk(attention_chunk)
        dtype = check_dtype(dtype)
        c = self.config = config
        self.encoder = Encoder(config, rngs=rngs, dtype=dtype, chunk=attention_chunk)
        self.quant_conv = nnx.Linear(2 * c.z_dim, 2 * c.z_dim, dtype=dtype, param_dtype=dtype,
                                     rngs=rngs)
        self.post_quant_conv = nnx.Linear(c.z_dim, c.z_dim, dtype=dtype, param_dtype=dtype,
                                          rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs, dtype=dtype, chunk=attention_chunk)

    @property
    def dtype(self):
        return self.encoder.conv_in.kernel.dtype

    def encode(self, video: Float[Array, "b f h w c"], *,
               streaming: bool = True) -> Float[Array, "b f2 h2 w2 z"]:
        """Normalized latents of `video`.

        Args:
          video: `[B, F, H, W, 3]` in [-1, 1], channels last; F = 1 + 4k frames and H, W
            multiples of 8 (for Wan2.1: `1 + temporal_factor * k`, `spatial_factor`).
          streaming: encode frame 0, then `ENCODER_CHUNK` (4) frames at a time in a
            `lax.scan` carrying each causal layer's last frames, as diffusers does: the
            working memory is that of one chunk whatever F. XLA's compile-time estimate
            on the CPU (bf16, batch 1, 81 frames, besides inputs and output): 3.7 GiB at
            480x832 and 8.3 GiB at 720x1280, against 35.3 and 81.3 GiB for the whole
            clip. False: one pass over the whole clip. Both compute the same latents
            (equal up to float rounding, ~1e-7 relative in float32).
        Returns:
          `[B, 1 + k, H/8, W/8, 16]` in the model's dtype: the mean of the encoder's
          Gaussian (no sampling), mapped as `(mean - latents_mean) / latents_std`, the
          latents Wan's transformer works on (in `to_transformer_layout`'s layout there).
        Raises `ValueError` for any other shape.
        """
        c, s, t = self.config, self.config.spatial_factor, self.config.temporal_factor
        shape = list(jnp.shape(video))
        if len(shape) != 5 or shape[-1] != c.in_channels or 0 in shape:
            raise ValueError(f"video must be [B, F, H, W, {c.in_channels}] (channels last, "
                             f"non-empty); got shape {shape}")
        if (shape[1] - 1) % t:
            raise ValueError(f"video must have 1 + {t}k frames (axis 1); got {shape[1]} "
                             f"frames (shape {shape})")
        if shape[2] % s or shape[3] % s:
            raise ValueError(f"video height and width must be multiples of {s}; got "
                             f"{shape[2]}x{shape[3]} (shape {shape})")
        video = video.astype(self.dtype)
        if streaming:
            moments = self._encode_streaming(video)
        else:
            moments, _ = self.encoder(video)
        mean = self.quant_conv(moments)[..., :c.z_dim].astype(jnp.float32)
        mu, sigma = jnp.asarray(c.latents_mean), jnp.asarray(c.latents_std)
        return ((mean - mu) / sigma).astype(self.dtype)

    def _encode_streaming(self, video):
        """The encoder's moments, frame 0 first, then a scan over chunks of `n` frames
        (each continuing the last through the encoder's state)."""
        b, f = video.shape[:2]
        # Any even chunk of frames at each temporal downsampling gives the same result;
        # gcd keeps diffusers' 4 and divides f - 1 (a multiple of temporal_factor).
        n = math.gcd(ENCODER_CHUNK, f - 1)
        first, state = self.encoder(video[:, :1])
        if f == 1:
            return first

        def step(state, i):
            chunk = jax.lax.dynamic_slice_in_dim(video, 1 + n * i, n, axis=1)
            moments, state = self.encoder(chunk, state)
            return state, moments

        _, rest = jax.lax.scan(step, state, jnp.arange((f - 1) // n))
        rest = jnp.moveaxis(rest, 0, 1)                    # [B, chunks, per chunk, ...]
        rest = rest.reshape(b, -1, *rest.shape[3:])
        return jnp.concatenate([first, rest], axis=1)

    def decode(self, latents: Float[Array, "b f h w z"], *,
               streaming: bool = True) -> Float[Array, "b f2 h2 w2 c"]:
        """Video from normalized latents (as `encode` returns them and Wan samples them).

        Args:
          latents: `[B, F', h, w, 16]`, channels last (`from_transformer_layout` turns the
            transformer's `[B, 16, F', h, w]` into it); the decoder receives
            `latents * latents_std + latents_mean`.
          streaming: decode latent frame 0, then one latent frame (4 video frames) at a
            time in a `lax.scan` carrying each causal layer's last frames, as diffusers
            does: the working memory is that of one step whatever F'. XLA's compile-time
            estimate on the CPU (bf16, batch 1, 21 latent frames to 81 frames, besides
            inputs and output): 4.5 GiB at 480x832 and 10.0 GiB at 720x1280, against
            40.7 and 94.0 GiB for the whole clip. False: one pass over the whole clip.
            Both compute the same video (equal up to float rounding, ~1e-6 relative in
            float32).
        Returns:
          `[B, 1 + 4(F' - 1), 8h, 8w, 3]` in the model's dtype, clipped to [-1, 1] as
          diffusers' `AutoencoderKLWan.decode` clips it (its video pipeline then maps
          [-1, 1] to [0, 1] for output).
        Raises `ValueError` for any other shape.
        """
        c = self.config
        shape = list(jnp.shape(latents))
        if len(shape) != 5 or shape[-1] != c.z_dim or 0 in shape:
            raise ValueError(f"latents must be [B, F, h, w, {c.z_dim}] (channels last, "
                             f"non-empty); got shape {shape}")
        mu, sigma = jnp.asarray(c.latents_mean), jnp.asarray(c.latents_std)
        z = self.post_quant_conv((latents.astype(jnp.float32) * sigma + mu).astype(self.dtype))
        if not streaming:
            return jnp.clip(self.decoder(z)[0], -1.0, 1.0)
        return self._decode_streaming(z)

    def _decode_streaming(self, z):
        """The clipped video, latent frame 0 first, then a scan over the other latent
        frames, each written in place into one video buffer carried along."""
        b, f = z.shape[:2]
        n = self.config.temporal_factor                    # video frames per latent frame
        first, state = self.decoder(z[:, :1])
        first = jnp.clip(first, -1.0, 1.0)
        if f == 1:
            return first
        video = jnp.zeros((b, 1 + n * (f - 1), *first.shape[2:]), first.dtype)
        video = jax.lax.dynamic_update_slice_in_dim(video, first, 0, axis=1)

        def step(carry, i):
            video, state = carry
            frames, state = self.decoder(jax.lax.dynamic_slice_in_dim(z, 1 + i, 1, axis=1),
                                         state)
            video = jax.lax.dynamic_update_slice_in_dim(
                video, jnp.clip(frames, -1.0, 1.0), 1 + n * i, axis=1)
            return (video, state), None

        (video, _), _ = jax.lax.scan(step, (video, state), jnp.arange(f - 1))
        return video


# ------------------------------------------------------------------------- loading

def _vae_folder(path: str) -> str:
    """`path` if it holds config.json, else `path/vae` if that does."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if os.path.isfile(os.path.join(path, "vae", "config.json")):
        return os.path.join(path, "vae")
    raise CheckpointError(f"{path}: a diffusers vae folder needs config.json (or a "
                          "pipeline folder with vae/config.json)")


def load_wan_autoencoder(path: str, *, dtype=jnp.bfloat16,
                         attention_chunk: int | None = None) -> WanAutoencoder:
    """A `WanAutoencoder` with weights from `path`.

    Args:
      path: a diffusers vae folder (config.json + diffusion_pytorch_model*.safetensors,
        sharded with an index or not) or a pipeline folder holding `vae/`.
      dtype: parameter and compute dtype (bfloat16 or float32).
      attention_chunk: see `WanAutoencoder`.
    Raises `CheckpointError` naming the file or tensors for a missing folder or config,
    a config this network does not implement, and missing, unexpected or mis-shaped
    tensors, before any tensor is read; `ValueError` for a `dtype` other than bfloat16
    or float32.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such folder (expected a diffusers vae folder or "
                              "a pipeline folder holding vae/)")
    folder = _vae_folder(path)
    config_path = os.path.join(folder, "config.json")
    cfg = checked_config(config_path, lambda: WanAutoencoderConfig.from_diffusers(
        read_json(config_path)), "AutoencoderKLWan")
    abstract = nnx.eval_shape(lambda: WanAutoencoder(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                                     attention_chunk=attention_chunk))
    expected = flat_params(abstract)
    files = TensorFiles(safetensors_files(folder))
    # Every parameter is one tensor under its own name; 1x1(x1) convolutions stored as
    # [out, in, 1, 1(, 1)] and RMS norm gains as [C, 1, 1(, 1)] lose their size-1 axes.
    names = {torch_layout(p, len(v.shape))[0] for p, v in expected.items()}
    recipe = {name: ([name], lambda x: x) for name in names}
    tensors = plan_stream(files, expected, recipe, model=f"Wan autoencoder ({cfg})",
                          where=folder, squeeze=True)
    return fill_model(abstract, tensors)
