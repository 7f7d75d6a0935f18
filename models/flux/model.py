"""The FLUX.1 transformer (dev and schnell) in Flax NNX, attending through pisa_jax."""

from __future__ import annotations

import numbers
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from models.flux.config import FluxConfig
from models.flux.layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock
from models.flux.math import position_embedding, timestep_embedding
from pisa_jax.nn import AttentionPolicy, model_policies
from pisa_jax.tokens import tile_major_permutation


def default_policies(config: FluxConfig, attention: str = "pisa", **options) -> tuple:
    """Per-layer policies (`pisa_jax.model_policies`): "pisa" is the published setting
    (first 4 layers dense, then density 0.15 with biased selection, `options` as in
    `pisa_jax.layer_policies`); "dense" makes every layer dense and takes no options."""
    return model_policies(config.num_attention_layers, attention, **options)


def check_dtype(dtype):
    """The parameter and compute dtype: a floating type (bfloat16, float16, float32)."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a floating dtype such as jnp.bfloat16; got {dtype!r}") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype (bfloat16, float16, float32); got {dt}")
    return dt


def _per_sample(name: str, x, b: int):
    """A number, a 0-d array or a `[B]` array -> `[B]` float32."""
    if isinstance(x, (bool, np.bool_)) or not (isinstance(x, numbers.Real) or hasattr(x, "shape")):
        raise TypeError(f"{name} must be a number or a [B] array; got {type(x).__name__}")
    if jnp.ndim(x) == 0:
        return jnp.full((b,), x, jnp.float32)
    if tuple(x.shape) != (b,):
        raise ValueError(f"{name} must be a number or have shape [{b}] ([B]); got "
                         f"{list(x.shape)}")
    return x


class Flux(nnx.Module):
    """FLUX.1 transformer.

    `policies` gives one `AttentionPolicy` per attention layer (double-stream blocks
    first); by default the published PISA setting. When any layer uses PISA, image
    tokens (and their ids) are put in tile-major order at the input and back in raster
    order at the output; the transformer is equivariant to that permutation.
    """

    def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16,
                 policies: Sequence[AttentionPolicy] | None = None):
        policies = tuple(policies) if policies is not None else default_policies(config)
        if len(policies) != config.num_attention_layers:
            raise ValueError(f"policies must hold one entry per attention layer "
                             f"({config.num_attention_layers}); got {len(policies)}")
        dtype = check_dtype(dtype)
        self.config = config
        self.block_size = min((p.block_size for p in policies if p.kind == "pisa"), default=0)
        c, dim = config, config.hidden_size
        lin = lambda i, o: nnx.Linear(i, o, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.img_in = lin(c.in_channels, dim)
        self.time_in = MLPEmbedder(256, dim, rngs=rngs, dtype=dtype)
        self.vector_in = MLPEmbedder(c.vec_in_dim, dim, rngs=rngs, dtype=dtype)
        self.guidance_in = (MLPEmbedder(256, dim, rngs=rngs, dtype=dtype)
                            if c.guidance_embed else None)
        self.txt_in = lin(c.context_in_dim, dim)
        self.double_blocks = nnx.List([
            DoubleStreamBlock(dim, c.num_heads, c.mlp_ratio, c.qkv_bias, policies[i],
                              rngs=rngs, dtype=dtype) for i in range(c.depth)])
        self.single_blocks = nnx.List([
            SingleStreamBlock(dim, c.num_heads, c.mlp_ratio, policies[c.depth + i],
                              rngs=rngs, dtype=dtype) for i in range(c.depth_single_blocks)])
        self.final_layer = LastLayer(dim, c.out_channels, rngs=rngs, dtype=dtype)

    def __call__(
        self,
        img: Float[Array, "b l_img c"],
        img_ids: Float[Array, "b l_img 3"],
        txt: Float[Array, "b l_txt ctx"],
        txt_ids: Float[Array, "b l_txt 3"],
        timesteps: Float[Array, "b"] | float,
        y: Float[Array, "b vec"],
        guidance: Float[Array, "b"] | float | None = None,
        *,
        dense: bool = False,
    ) -> Float[Array, "b l_img c_out"]:
        """Predicted velocity `[B, L_img, C_out]` for packed latents `img`.

        `timesteps` and `guidance` are a number (the same for every sample) or a `[B]`
        array; `guidance` is the raw guidance scale (dev) and must be None for schnell.
        At least one image and one text token. `dense=True` runs every layer dense for
        this call (e.g. early sampling steps). Bad shapes raise a ValueError naming the
        input and its expected shape.
        """
        timesteps, guidance = self._check_inputs(img, img_ids, txt, txt_ids, timesteps, y,
                                                 guidance)
        dtype = self.img_in.kernel.dtype
        perm = None
        if self.block_size and not dense:
            perm = tile_major_permutation(img_ids[..., 1], img_ids[..., 2], self.block_size)
            img = jnp.take_along_axis(img, perm[..., None], axis=1)
            img_ids = jnp.take_along_axis(img_ids, perm[..., None], axis=1)

        x = self.img_in(img.astype(dtype))
        vec = self.time_in(timestep_embedding(timesteps).astype(dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance).astype(dtype))
        vec = vec + self.vector_in(y.astype(dtype))
        t = self.txt_in(txt.astype(dtype))
        pe = position_embedding(jnp.concatenate([txt_ids, img_ids], axis=1),
                                self.config.axes_dim, self.config.theta)
        for block in self.double_blocks:
            x, t = block(x, t, vec, pe, dense=dense)
        n_txt = t.shape[1]
        h = jnp.concatenate([t, x], axis=1)
        for block in self.single_blocks:
            h = block(h, vec, pe, num_text_tokens=n_txt, dense=dense)
        out = self.final_layer(h[:, n_txt:], vec)
        if perm is not None:
            out = jnp.take_along_axis(out, jnp.argsort(perm, axis=-1)[..., None], axis=1)
        return out

    def _check_inputs(self, img, img_ids, txt, txt_ids, timesteps, y, guidance):
        """Checks ranks first (so a shape is never read from the wrong axis), then sizes;
        returns timesteps and guidance as `[B]` arrays."""
        c = self.config
        specs = {"img": (img, ("B", "L_img", c.in_channels)), "img_ids": (img_ids, ("B", "L_img", 3)),
                 "txt": (txt, ("B", "L_txt", c.context_in_dim)),
                 "txt_ids": (txt_ids, ("B", "L_txt", 3)), "y": (y, ("B", c.vec_in_dim))}
        for name, (x, spec) in specs.items():
            if not hasattr(x, "shape"):
                raise TypeError(f"{name} must be an array of shape {list(spec)}; got "
                                f"{type(x).__name__}")
            if len(x.shape) != len(spec):
                raise ValueError(f"{name} must have shape {list(spec)}; got {list(x.shape)}")
        sizes = {"B": img.shape[0], "L_img": img.shape[1], "L_txt": txt.shape[1]}
        for name, (x, spec) in specs.items():
            shape = tuple(sizes.get(s, s) for s in spec)
            if tuple(x.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)} ({', '.join(map(str, spec))})"
                                 f"; got {list(x.shape)}")
        if 0 in sizes.values():
            raise ValueError("FLUX needs at least one sample, one image token and one text "
                             f"token; got img {list(img.shape)}, txt {list(txt.shape)}")
        b = sizes["B"]
        timesteps = _per_sample("timesteps", timesteps, b)
        if c.guidance_embed:
            if guidance is None:
                raise ValueError("this model has a guidance embedding (FLUX.1-dev): pass "
                                 "guidance, a number or [B] (the raw guidance scale); got None")
            guidance = _per_sample("guidance", guidance, b)
        elif guidance is not None:
            raise ValueError("this model has no guidance embedding (FLUX.1-schnell): pass "
                             f"guidance=None; got {guidance!r}"[:300])
        return timesteps, guidance
