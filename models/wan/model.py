"""The Wan2.1 text-to-video transformer in Flax NNX, attending through pisa_jax."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from models.embeddings import rope_angles, sinusoidal_embedding
from models.wan.config import DEFAULT_TILE, WanConfig
from models.wan.layers import (PRECISE, Head, PatchEmbedding, WanAttentionBlock, _gelu,
                               _linear)
from pisa_jax.nn import AttentionPolicy, model_policies
from pisa_jax.tokens import check_tile, tile_order

# Tile of one block per block size; 128-token blocks take two 64-token tiles side by side.
DEFAULT_TILES = {64: DEFAULT_TILE, 128: DEFAULT_TILE[:2] + (2 * DEFAULT_TILE[2],)}


def default_policies(config: WanConfig, attention: str = "pisa", **options) -> tuple:
    """Per-layer policies (`pisa_jax.model_policies`): "pisa" is the published setting
    (first 4 layers dense, then density 0.15 with biased selection, `options` as in
    `pisa_jax.layer_policies`); "dense" makes every layer dense and takes no options."""
    return model_policies(config.num_attention_layers, attention, **options)


def check_dtype(dtype) -> jnp.dtype:
    """`dtype` as a NumPy dtype if the model can run in it (bfloat16 or float32).

    Raises ValueError otherwise: float16 in particular, whose range (65504) the residual
    stream and feed-forward activations can pass, where bfloat16 has float32's range.
    """
    d = jnp.dtype(dtype)
    if d not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"dtype must be bfloat16 or float32 (float16 activations can pass "
                         f"its range of 65504; bfloat16 has float32's); got {d.name}")
    return d


def pad_text(context: Float[Array, "b l d"], text_len: int, *, name: str = "context"
             ) -> Float[Array, "b text_len d"]:
    """Text encoder states `[B, L, D]` zero-padded at the end to `[B, text_len, D]`, as the
    official Wan2.1 model pads each prompt's (unpadded) umT5 states before its text
    embedding; the cross-attention then attends over every position, padding included.

    Raises ValueError (naming the argument `name`) for a context that is not 3D or has
    more than `text_len` tokens.
    """
    if context.ndim != 3:
        raise ValueError(f"{name} must have shape [B, L, D]; got {list(context.shape)}")
    length = context.shape[1]
    if length > text_len:
        raise ValueError(f"{name} has {length} tokens; the model takes at most text_len = "
                         f"{text_len} (truncate the prompt's states)")
    return jnp.pad(jnp.asarray(context), ((0, 0), (0, text_len - length), (0, 0)))


class Wan(nnx.Module):
    """Wan2.1 transformer (text-to-video), with diffusers' channels-first interface.

    `policies` gives one `AttentionPolicy` per block's self-attention (cross-attention is
    always dense); by default the published PISA setting. When any layer uses PISA, the
    video tokens are put in tile-major order at the input, each block of `block_size`
    tokens a `tile` (frames, height, width) of the latent grid with the full tiles first
    (`pisa_jax.tokens.tile_order`), the rotary table with them, and back in raster order
    at the output; the transformer is equivariant to that permutation.

    `dtype` (bfloat16 or float32; float16 is refused, see `check_dtype`) is the dtype of
    the projections; the modulation tables, affine norm weights and the time embedding
    stay float32 (`layers.PRECISE`), as in diffusers and the official code.

    Text: the official model zero-pads each prompt's states to `config.text_len` (512)
    tokens and attends over all of them. This call, like diffusers' transformer, attends
    over the `L` tokens it is given; pad them with `pad_text` (as `denoise` does) to get
    the official model's output.
    """

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16,
                 policies: Sequence[AttentionPolicy] | None = None,
                 tile: Sequence[int] | None = None):
        dtype = check_dtype(dtype)
        if config.image_dim is not None:
            raise NotImplementedError("image-to-video (config.image_dim set) is not "
                                      "implemented yet; only text-to-video")
        policies = tuple(policies) if policies is not None else default_policies(config)
        if len(policies) != config.num_attention_layers:
            raise ValueError(f"policies must hold one entry per self-attention layer "
                             f"({config.num_attention_layers}); got {len(policies)}")
        self.config = config
        self.block_size = min((p.block_size for p in policies if p.kind == "pisa"), default=0)
        if tile is None:
            tile = DEFAULT_TILES.get(self.block_size, DEFAULT_TILE)
        self.tile = check_tile(tile, self.block_size or None)
        if len(self.tile) != 3:
            raise ValueError(f"tile must be (frames, height, width); got {self.tile}")
        c, dim = config, config.dim
        lin = lambda i, o: _linear(i, o, rngs, dtype)
        self.patch_embedding = PatchEmbedding(c.in_channels, dim, c.patch_size, rngs=rngs,
                                              dtype=dtype)
        self.text_embedding = nnx.Dict({"0": lin(c.text_dim, dim), "2": lin(dim, dim)})
        precise = lambda i, o: _linear(i, o, rngs, PRECISE)
        self.time_embedding = nnx.Dict({"0": precise(c.freq_dim, dim), "2": precise(dim, dim)})
        self.time_projection = nnx.Dict({"1": precise(dim, 6 * dim)})
        self.blocks = nnx.List([
            WanAttentionBlock(dim, c.ffn_dim, c.num_heads, c.eps, c.qk_norm, c.cross_attn_norm,
                              policies[i], rngs=rngs, dtype=dtype) for i in range(c.num_layers)])
        self.head = Head(dim, c.out_channels * math.prod(c.patch_size), c.eps, rngs=rngs,
                         dtype=dtype)

    def token_order(self, grid: tuple[int, int, int], dense: bool = False) -> np.ndarray | None:
        """Raster index of each token in the order the blocks see (None: raster order)."""
        if not self.block_size or dense:
            return None
        return tile_order(grid, self.tile)

    def __call__(
        self,
        hidden_states: Float[Array, "b c f h w"],
        timestep: Float[Array, "b"],
        encoder_hidden_states: Float[Array, "b l text_dim"],
        *,
        dense: bool = False,
    ) -> Float[Array, "b c_out f h w"]:
        """Predicted flow `[B, C_out, F, H, W]` (float32) for video latents `hidden_states`.

        `timestep` is on the 0-1000 scale; `encoder_hidden_states` are the text encoder's
        states, attended as given (diffusers' behaviour): the official model zero-pads
        them to `config.text_len` (512) first, see `pad_text`. `dense=True` runs
        every self-attention dense for this call (e.g. early sampling steps). Raises
        ValueError for inputs of the wrong rank or shape.
        """
        c = self.config
        self._check_inputs(hidden_states, timestep, encoder_hidden_states)
        b = hidden_states.shape[0]
        x = self.patch_embedding(hidden_states)                  # [B, F', H', W', dim]
        grid = x.shape[1:4]
        x = x.reshape(b, -1, c.dim).astype(jnp.float32)
        positions = np.stack(np.unravel_index(np.arange(x.shape[1]), grid), axis=-1)
        order = self.token_order(grid, dense)
        if order is not None:
            x, positions = x[:, order], positions[order]
        angles = rope_angles(jnp.asarray(positions, jnp.int32), c.rope_dims, c.theta)
        rope = (jnp.cos(angles), jnp.sin(angles))

        t = sinusoidal_embedding(timestep, c.freq_dim)
        e = self.time_embedding["2"](jax.nn.silu(self.time_embedding["0"](t)))
        e0 = self.time_projection["1"](jax.nn.silu(e)).reshape(b, 6, c.dim)
        dtype = self.text_embedding["0"].kernel.dtype
        context = self.text_embedding["2"](_gelu(self.text_embedding["0"](
            encoder_hidden_states.astype(dtype))))

        for block in self.blocks:
            x = block(x, e0, context, rope, dense=dense)
        out = self.head(x, e).astype(jnp.float32)               # [B, L, pt*ph*pw*C]
        if order is not None:
            out = out[:, np.argsort(order)]
        return self._unpatchify(out, grid)

    def _unpatchify(self, x, grid):
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1)
        x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)

    def _check_inputs(self, hidden_states, timestep, encoder_hidden_states):
        c = self.config
        if hidden_states.ndim != 5 or hidden_states.shape[1] != c.in_channels:
            raise ValueError(f"hidden_states must have shape [B, {c.in_channels}, F, H, W]; got "
                             f"{list(hidden_states.shape)}")
        b, _, *sizes = hidden_states.shape
        if any(s % p or s == 0 for s, p in zip(sizes, c.patch_size)):
            raise ValueError(f"hidden_states' F, H, W must be positive multiples of the patch "
                             f"size {list(c.patch_size)}; got {sizes}")
        if tuple(timestep.shape) != (b,):
            raise ValueError(f"timestep must have shape [{b}] (one per batch entry); got "
                             f"{list(timestep.shape)}")
        eh = encoder_hidden_states
        if eh.ndim != 3 or eh.shape[0] != b or eh.shape[2] != c.text_dim or eh.shape[1] == 0:
            raise ValueError(f"encoder_hidden_states must have shape [{b}, L, {c.text_dim}] "
                             f"with L >= 1; got {list(eh.shape)}")
