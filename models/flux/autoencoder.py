"""The FLUX.1 autoencoder (VAE) in Flax NNX, channels-last, and its loading.

The network is diffusers' `AutoencoderKL` as configured in FLUX.1's `vae/config.json`
(the same as Black Forest Labs' `flux/modules/autoencoder.py`): a convolutional encoder
to a diagonal Gaussian over 16 latent channels (we keep its mean) and a decoder back,
8x down/up in height and width, no quant/post-quant convolutions. Latents are exchanged
scaled, `(z - shift_factor) * scaling_factor`, as FLUX's transformer sees them.

`load_autoencoder` reads a diffusers `vae/` folder (or a pipeline folder holding one) or
BFL's single file `ae.safetensors`; both map onto parameter paths named like the single
file (see `autoencoder_layers`), refusing missing, unexpected or mis-shaped tensors by name
before reading any.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from models.attention_chunks import check_chunk
from models.checkpoint import (CheckpointError, TensorFiles, fill_model, flat_params,
                               read_json, safetensors_files)
from models.conversion import plan_stream, torch_layout
from models.flux.autoencoder_layers import Decoder, Encoder
from models.flux.model import check_dtype


@dataclasses.dataclass(frozen=True)
class AutoEncoderConfig:
    """Hyperparameters, named as in diffusers' AutoencoderKL config."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)   # one per level
    layers_per_block: int = 2            # encoder res blocks per level (decoder: one more)
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    latent_channels: int = 16
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels",
                           tuple(int(c) for c in self.block_out_channels))
        ints = dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    layers_per_block=self.layers_per_block,
                    norm_num_groups=self.norm_num_groups,
                    latent_channels=self.latent_channels)
        bad = {k: v for k, v in ints.items() if not isinstance(v, int) or v < 1}
        if bad or not self.block_out_channels or min(self.block_out_channels) < 1:
            raise ValueError(f"AutoEncoderConfig: channel counts, layers_per_block and "
                             f"norm_num_groups must be positive integers and "
                             f"block_out_channels non-empty; got {bad or ''}"
                             f"{'' if bad else self.block_out_channels}")
        odd = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if odd:
            raise ValueError(f"AutoEncoderConfig: block_out_channels {self.block_out_channels}"
                             f" must be multiples of norm_num_groups ({self.norm_num_groups})")
        if not self.scaling_factor or self.norm_eps <= 0:
            raise ValueError(f"AutoEncoderConfig: scaling_factor must be non-zero and norm_eps "
                             f"positive; got {self.scaling_factor}, {self.norm_eps}")

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: 2 per level but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict) -> "AutoEncoderConfig":
        """From an AutoencoderKL `config.json` dict (diffusers' defaults for absent keys).

        Raises `ValueError` for settings this network does not implement (quant convs,
        other block types or activations, no mid-block attention, latents_mean/std).
        """
        get = lambda k, d: config.get(k, d) if config.get(k) is not None else d
        channels = tuple(get("block_out_channels", (64,)))
        unsupported = {
            "act_fn": (get("act_fn", "silu"), "silu"),
            "use_quant_conv": (get("use_quant_conv", True), False),
            "use_post_quant_conv": (get("use_post_quant_conv", True), False),
            "mid_block_add_attention": (get("mid_block_add_attention", True), True),
            "down_block_types": (tuple(get("down_block_types", ("DownEncoderBlock2D",))),
                                 ("DownEncoderBlock2D",) * len(channels)),
            "up_block_types": (tuple(get("up_block_types", ("UpDecoderBlock2D",))),
                               ("UpDecoderBlock2D",) * len(channels)),
            "latents_mean": (config.get("latents_mean"), None),
            "latents_std": (config.get("latents_std"), None),
        }
        bad = {k: got for k, (got, want) in unsupported.items() if got != want}
        if bad:
            raise ValueError(f"unsupported AutoencoderKL settings {bad}; expected "
                             + str({k: unsupported[k][1] for k in bad}))
        return cls(in_channels=get("in_channels", 3), out_channels=get("out_channels", 3),
                   block_out_channels=channels,
                   layers_per_block=get("layers_per_block", 1),
                   norm_num_groups=get("norm_num_groups", 32),
                   latent_channels=get("latent_channels", 4),
                   scaling_factor=float(get("scaling_factor", 0.18215)),
                   shift_factor=float(get("shift_factor", 0.0)))


FLUX_AE = AutoEncoderConfig()


class AutoEncoder(nnx.Module):
    """The FLUX.1 autoencoder, channels-last.

    `dtype` is the parameter and compute dtype (GroupNorm statistics and the attention
    softmax are float32 regardless). `attention_chunk` is the number of query positions
    the mid-block attention takes per step; None picks it so that at most 2^26 scores
    are held at once (exact softmax either way). Raises TypeError for a `dtype` that is
    not a floating dtype.
    """

    def __init__(self, config: AutoEncoderConfig = FLUX_AE, *, rngs: nnx.Rngs,
                 dtype=jnp.bfloat16, attention_chunk: int | None = None):
        check_chunk(attention_chunk)
        dtype = check_dtype(dtype)
        self.config = config
        self.encoder = Encoder(config, rngs=rngs, dtype=dtype, chunk=attention_chunk)
        self.decoder = Decoder(config, rngs=rngs, dtype=dtype, chunk=attention_chunk)

    @property
    def dtype(self):
        return self.encoder.conv_in.kernel.dtype

    def encode(self, images: Float[Array, "b h w c"]) -> Float[Array, "b h/f w/f z"]:
        """Scaled latents of `images`.

        Args:
          images: `[B, H, W, 3]` in [-1, 1], channels last; H and W multiples of the
            downsample factor (8 for FLUX).
        Returns:
          `[B, H/8, W/8, 16]` in the model's dtype: the mean of the encoder's Gaussian
          (no sampling), mapped as `(mean - shift_factor) * scaling_factor`.
        Raises `ValueError` for any other shape.
        """
        c, f = self.config, self.config.downsample_factor
        if (jnp.ndim(images) != 4 or images.shape[-1] != c.in_channels
                or images.shape[1] % f or images.shape[2] % f or 0 in images.shape):
            raise ValueError(f"images must be [B, H, W, {c.in_channels}] (channels last) "
                             f"with H and W non-zero multiples of {f}; got shape "
                             f"{list(jnp.shape(images))}")
        moments = self.encoder(images.astype(self.dtype))
        mean = moments[..., :c.latent_channels].astype(jnp.float32)
        return ((mean - c.shift_factor) * c.scaling_factor).astype(self.dtype)

    def decode(self, latents: Float[Array, "b h w z"]) -> Float[Array, "b h*f w*f c"]:
        """Images from scaled latents (as `encode` returns and FLUX samples them).

        Args:
          latents: `[B, h, w, 16]`, channels last; `latents / scaling_factor +
            shift_factor` is what the decoder receives.
        Returns:
          `[B, 8h, 8w, 3]`, nominally in [-1, 1] (not clipped), in the model's dtype.
        Raises `ValueError` for any other shape.
        """
        c = self.config
        if (jnp.ndim(latents) != 4 or latents.shape[-1] != c.latent_channels
                or 0 in latents.shape):
            raise ValueError(f"latents must be [B, h, w, {c.latent_channels}] (channels "
                             f"last, non-empty); got shape {list(jnp.shape(latents))}")
        z = latents.astype(jnp.float32) / c.scaling_factor + c.shift_factor
        return self.decoder(z.astype(self.dtype))


# ------------------------------------------------------------------------- loading

_BFL_PREFIXES = ("first_stage_model.", "vae.")
# Single-file name pieces -> diffusers', applied in order to names without the
# encoder./decoder. part; up levels are renumbered separately (diffusers counts them
# from the lowest resolution).
_TO_DIFFUSERS = [
    (r"^norm_out\.", "conv_norm_out."),
    (r"^down\.(\d+)\.block\.(\d+)\.", r"down_blocks.\1.resnets.\2."),
    (r"^down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0."),
    (r"^up\.(\d+)\.block\.(\d+)\.", r"up_blocks.\1.resnets.\2."),
    (r"^up\.(\d+)\.upsample\.", r"up_blocks.\1.upsamplers.0."),
    (r"^mid\.block_1\.", "mid_block.resnets.0."),
    (r"^mid\.block_2\.", "mid_block.resnets.1."),
    (r"^mid\.attn_1\.norm\.", "mid_block.attentions.0.group_norm."),
    (r"^mid\.attn_1\.(q|k|v)\.", r"mid_block.attentions.0.to_\1."),
    (r"^mid\.attn_1\.proj_out\.", "mid_block.attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
]


def bfl_to_diffusers_name(name: str, levels: int) -> str:
    """`decoder.up.3.block.0.norm1.weight` -> `decoder.up_blocks.0.resnets.0.norm1.weight`."""
    part, rest = name.split(".", 1)
    m = re.match(r"up\.(\d+)\.", rest)
    if m:
        rest = f"up.{levels - 1 - int(m.group(1))}." + rest[m.end():]
    for pattern, repl in _TO_DIFFUSERS:
        rest = re.sub(pattern, repl, rest)
    return f"{part}.{rest}"


def _single_file_layout(flax_path: str, ndim: int) -> tuple[str, tuple[int, ...] | None]:
    """(single-file name, axes): PyTorch's layout, GroupNorm's `scale` named `weight`."""
    name, axes = torch_layout(flax_path, ndim)
    return (name[:-len("scale")] + "weight" if name.endswith(".scale") else name), axes


def _open_single_file(path: str) -> TensorFiles:
    """The file's tensors, without a `vae.` / `first_stage_model.` prefix all names share."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file or folder")
    with TensorFiles([path]) as probe:
        names = probe.names()
    prefix = next((p for p in _BFL_PREFIXES if names and all(n.startswith(p) for n in names)),
                  "")
    return TensorFiles([path], strip_prefix=prefix)


def config_from_single_file(path: str, base: AutoEncoderConfig = FLUX_AE
                            ) -> AutoEncoderConfig:
    """`base` with the channel structure (levels, channels, res blocks, latent channels)
    read from the tensor shapes of a single file; the file cannot tell the GroupNorm
    groups, eps or the latent scaling, so those stay `base`'s."""
    with _open_single_file(path) as files:
        names = files.names()
        need = ["encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight",
                "encoder.down.0.block.0.conv1.weight"]
        missing = [n for n in need if n not in names]
        if missing:
            raise CheckpointError(f"{path}: not an autoencoder single file (ae.safetensors "
                                  f"layout); missing {missing}")
        levels = len({n.split(".")[2] for n in names if n.startswith("encoder.down.")})
        conv1 = [f"encoder.down.{i}.block.0.conv1.weight" for i in range(levels)]
        absent = [n for n in conv1 if n not in names]
        if absent:
            raise CheckpointError(f"{path}: missing tensors {absent}")
        try:
            return dataclasses.replace(
                base,
                in_channels=files.shape("encoder.conv_in.weight")[1],
                out_channels=files.shape("decoder.conv_out.weight")[0],
                block_out_channels=tuple(files.shape(n)[0] for n in conv1),
                layers_per_block=len({n.split(".")[4] for n in names
                                      if n.startswith("encoder.down.0.block.")}),
                latent_channels=files.shape("decoder.conv_in.weight")[1])
        except ValueError as e:     # e.g. channels FLUX's 32 GroupNorm groups do not divide
            raise CheckpointError(f"{path}: the channels in the file do not fit the config "
                                  f"(pass config= with the file's settings): {e}") from None


def _open_source(path: str, config: AutoEncoderConfig | None):
    """(config, TensorFiles, Flax path -> source name function, description)."""
    if os.path.isdir(path):
        folder = path
        if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(
                os.path.join(folder, "vae", "config.json")):
            folder = os.path.join(folder, "vae")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise CheckpointError(f"{path}: a diffusers vae folder needs config.json (or a "
                                  "pipeline folder with vae/config.json)")
        meta = read_json(os.path.join(folder, "config.json"))
        try:
            cfg = AutoEncoderConfig.from_diffusers(meta)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{os.path.join(folder, 'config.json')}: {e}") from None
        if config is not None and config != cfg:
            raise ValueError(f"config is given ({config}) but {folder}/config.json says "
                             f"{cfg}; pass config=None for a diffusers folder")
        levels = len(cfg.block_out_channels)
        return (cfg, TensorFiles(safetensors_files(folder)),
                lambda name: bfl_to_diffusers_name(name, levels), folder)
    cfg = config if config is not None else config_from_single_file(path)
    return cfg, _open_single_file(path), lambda name: name, path


def load_autoencoder(path: str, *, dtype=jnp.bfloat16, config: AutoEncoderConfig | None = None,
                     attention_chunk: int | None = None) -> AutoEncoder:
    """An `AutoEncoder` with weights from `path`.

    Args:
      path: a diffusers vae folder (config.json + diffusion_pytorch_model*.safetensors,
        sharded with an index or not), a pipeline folder holding `vae/`, or a single file
        in BFL's `ae.safetensors` layout (optionally under a `vae.` or
        `first_stage_model.` prefix).
      dtype: parameter and compute dtype.
      config: for a single file, the hyperparameters the file cannot tell (groups,
        scaling/shift); default FLUX's, with the channel structure read from the shapes.
      attention_chunk: see `AutoEncoder`.
    Raises `CheckpointError` naming the file and tensors for missing, unexpected or
    mis-shaped tensors, before any tensor is read.
    """
    cfg, files, to_source, where = _open_source(path, config)
    with files:
        abstract = nnx.eval_shape(lambda: AutoEncoder(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                                      attention_chunk=attention_chunk))
        expected = flat_params(abstract)

        def source_name(flax_path: str, ndim: int):
            name, axes = _single_file_layout(flax_path, ndim)
            return to_source(name), axes

        # Every parameter is one tensor; attention q/k/v/proj_out may be stored as a
        # Linear [out, in] (diffusers) or a 1x1 conv [out, in, 1, 1] (single file).
        names = {source_name(p, len(v.shape))[0] for p, v in expected.items()}
        recipe = {name: ([name], lambda x: x) for name in names}
        tensors = plan_stream(files, expected, recipe, model=f"autoencoder ({cfg})",
                              source_name=source_name, where=where, squeeze=True)
        return fill_model(abstract, tensors)
