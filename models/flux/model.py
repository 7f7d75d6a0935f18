"""The FLUX.1 transformer (dev and schnell) in Flax NNX, attending through pisa_jax."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from models.flux.config import FluxConfig
from models.flux.layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock
from models.flux.math import position_embedding, timestep_embedding
from pisa_jax.nn import DENSE, AttentionPolicy, layer_policies
from pisa_jax.tokens import tile_major_permutation


def default_policies(config: FluxConfig, attention: str = "pisa", **options) -> tuple:
    """Per-layer policies: "pisa" is the published setting (first 4 layers dense, then
    density 0.15 with biased selection); "dense" makes every layer dense."""
    if attention == "dense":
        return (DENSE,) * config.num_attention_layers
    if attention != "pisa":
        raise ValueError(f"attention must be 'pisa' or 'dense'; got {attention!r}")
    return layer_policies(config.num_attention_layers, **options)


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
        timesteps: Float[Array, "b"],
        y: Float[Array, "b vec"],
        guidance: Float[Array, "b"] | None = None,
        *,
        dense: bool = False,
    ) -> Float[Array, "b l_img c_out"]:
        """Predicted velocity `[B, L_img, C_out]` for packed latents `img`.

        `guidance` is the raw guidance scale (dev) and must be None for schnell.
        `dense=True` runs every layer dense for this call (e.g. early sampling steps).
        """
        self._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance)
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
        c = self.config
        b = img.shape[0]
        expect = {
            "img": (img, (b, img.shape[1], c.in_channels)),
            "img_ids": (img_ids, (b, img.shape[1], 3)),
            "txt": (txt, (b, txt.shape[1], c.context_in_dim)),
            "txt_ids": (txt_ids, (b, txt.shape[1], 3)),
            "timesteps": (timesteps, (b,)),
            "y": (y, (b, c.vec_in_dim)),
        }
        if c.guidance_embed:
            if guidance is None:
                raise ValueError("this model has a guidance embedding (FLUX.1-dev): pass "
                                 "guidance [B] (the raw guidance scale); got None")
            expect["guidance"] = (guidance, (b,))
        elif guidance is not None:
            raise ValueError("this model has no guidance embedding (FLUX.1-schnell): pass "
                             f"guidance=None; got an array of shape {jnp.shape(guidance)}")
        for name, (x, shape) in expect.items():
            if tuple(x.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}; got {list(x.shape)}")
