"""Building blocks of the FLUX.1 autoencoder in Flax NNX, channels-last (NHWC).

Module and parameter paths mirror Black Forest Labs' `ae.safetensors` one to one
(`encoder.down.0.block.1.norm2`, `decoder.up.3.upsample.conv`, `encoder.mid.attn_1.q`),
so loading is a rename and a transpose: convolution kernels are `[kh, kw, in, out]`,
the attention projections (1x1 convolutions in the checkpoint) are `nnx.Linear` kernels
`[in, out]`, GroupNorm weights are called `scale`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention_chunks import chunked_attention, default_chunk


def _conv(cin, cout, *, rngs, dtype, kernel=3, stride=1, padding=1):
    pad = ((padding, padding),) * 2 if isinstance(padding, int) else padding
    return nnx.Conv(cin, cout, kernel_size=(kernel, kernel), strides=(stride, stride),
                    padding=pad, dtype=dtype, param_dtype=dtype, rngs=rngs)


class GroupNorm(nnx.Module):
    """GroupNorm over `[B, H, W, C]` with contiguous channel groups (PyTorch's), statistics
    in float32 (two passes: mean, then the mean square deviation)."""

    def __init__(self, channels: int, groups: int, eps: float, *, dtype):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into "
                             f"{groups} groups")
        self.groups, self.eps = groups, eps
        self.scale = nnx.Param(jnp.ones((channels,), dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        xf = x.astype(jnp.float32).reshape(b, h * w, self.groups, c // self.groups)
        mean = xf.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(xf - mean).mean(axis=(1, 3), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ResnetBlock(nnx.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the input (through a 1x1
    `nin_shortcut` when the channel count changes)."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float, *, rngs, dtype):
        self.norm1 = GroupNorm(cin, groups, eps, dtype=dtype)
        self.conv1 = _conv(cin, cout, rngs=rngs, dtype=dtype)
        self.norm2 = GroupNorm(cout, groups, eps, dtype=dtype)
        self.conv2 = _conv(cout, cout, rngs=rngs, dtype=dtype)
        self.nin_shortcut = (_conv(cin, cout, kernel=1, padding=0, rngs=rngs, dtype=dtype)
                             if cin != cout else None)

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (self.nin_shortcut(x) if self.nin_shortcut is not None else x)


class AttnBlock(nnx.Module):
    """Single-head self-attention over all spatial positions, with a residual."""

    def __init__(self, channels: int, groups: int, eps: float, *, rngs, dtype,
                 chunk: int | None = None):
        self.norm = GroupNorm(channels, groups, eps, dtype=dtype)
        lin = lambda: nnx.Linear(channels, channels, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.q, self.k, self.v, self.proj_out = lin(), lin(), lin(), lin()
        self.chunk = chunk

    def __call__(self, x):
        b, h, w, c = x.shape
        y = self.norm(x).reshape(b, h * w, c)
        chunk = self.chunk or default_chunk(b, h * w)
        o = chunked_attention(self.q(y), self.k(y), self.v(y), chunk)
        return x + self.proj_out(o).reshape(b, h, w, c)


class Downsample(nnx.Module):
    """Stride-2 3x3 convolution; zero padding of one row/column after (none before)."""

    def __init__(self, channels: int, *, rngs, dtype):
        self.conv = _conv(channels, channels, stride=2, padding=((0, 1), (0, 1)),
                          rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int, *, rngs, dtype):
        self.conv = _conv(channels, channels, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c))
        return self.conv(x.reshape(b, 2 * h, 2 * w, c))


class Mid(nnx.Module):
    def __init__(self, channels: int, groups: int, eps: float, *, rngs, dtype, chunk=None):
        self.block_1 = ResnetBlock(channels, channels, groups, eps, rngs=rngs, dtype=dtype)
        self.attn_1 = AttnBlock(channels, groups, eps, rngs=rngs, dtype=dtype, chunk=chunk)
        self.block_2 = ResnetBlock(channels, channels, groups, eps, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nnx.Module):
    """One resolution: res blocks, then `downsample` (encoder) or `upsample` (decoder)."""

    def __init__(self, cin: int, cout: int, num_blocks: int, groups: int, eps: float,
                 resample: str | None, *, rngs, dtype):
        self.block = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, eps,
                                           rngs=rngs, dtype=dtype)
                               for i in range(num_blocks)])
        if resample == "down":
            self.downsample = Downsample(cout, rngs=rngs, dtype=dtype)
        elif resample == "up":
            self.upsample = Upsample(cout, rngs=rngs, dtype=dtype)
        self.resample = resample

    def __call__(self, x):
        for block in self.block:
            x = block(x)
        if self.resample == "down":
            x = self.downsample(x)
        elif self.resample == "up":
            x = self.upsample(x)
        return x


class Encoder(nnx.Module):
    """Images `[B, H, W, in]` -> mean and log-variance `[B, H/f, W/f, 2 * latent]`."""

    def __init__(self, config, *, rngs, dtype, chunk=None):
        c, ch = config, config.block_out_channels
        g, eps = c.norm_num_groups, c.norm_eps
        self.conv_in = _conv(c.in_channels, ch[0], rngs=rngs, dtype=dtype)
        self.down = nnx.List([
            Level(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, eps,
                  "down" if i < len(ch) - 1 else None, rngs=rngs, dtype=dtype)
            for i in range(len(ch))])
        self.mid = Mid(ch[-1], g, eps, rngs=rngs, dtype=dtype, chunk=chunk)
        self.norm_out = GroupNorm(ch[-1], g, eps, dtype=dtype)
        self.conv_out = _conv(ch[-1], 2 * c.latent_channels, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class Decoder(nnx.Module):
    """Latents `[B, h, w, latent]` -> images `[B, h*f, w*f, out]`.

    `up[i]` works at the resolution of `down[i]`; they run from the last to the first,
    as in the reference checkpoint's numbering.
    """

    def __init__(self, config, *, rngs, dtype, chunk=None):
        c, ch = config, config.block_out_channels
        g, eps = c.norm_num_groups, c.norm_eps
        self.conv_in = _conv(c.latent_channels, ch[-1], rngs=rngs, dtype=dtype)
        self.mid = Mid(ch[-1], g, eps, rngs=rngs, dtype=dtype, chunk=chunk)
        self.up = nnx.List([
            Level(ch[min(i + 1, len(ch) - 1)], ch[i], c.layers_per_block + 1, g, eps,
                  "up" if i > 0 else None, rngs=rngs, dtype=dtype)
            for i in range(len(ch))])
        self.norm_out = GroupNorm(ch[0], g, eps, dtype=dtype)
        self.conv_out = _conv(ch[0], c.out_channels, rngs=rngs, dtype=dtype)

    def __call__(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))
