"""Building blocks of the Wan2.1 video autoencoder in Flax NNX, channels-last
(`[B, T, H, W, C]`).

Module and parameter paths mirror diffusers' `AutoencoderKLWan` one to one
(`encoder.down_blocks.3.resample.1`, `decoder.up_blocks.0.upsamplers.0.time_conv`,
`decoder.mid_block.attentions.0.to_qkv`), so loading is a rename and a transpose:
convolution kernels are `[kt, kh, kw, in, out]` (`[kh, kw, in, out]` for the 2D ones),
the 1x1(x1) convolutions are `nnx.Linear` kernels `[in, out]`, RMS norm gains `gamma`
are `[C]` (PyTorch keeps trailing size-1 axes).

Time is causal: every 3D convolution pads two zero frames in the past and none in the
future. Run over a whole clip at once, the network equals diffusers' chunked inference
(frame 0 alone, then chunks of 4 frames in the encoder; one latent frame at a time in
the decoder, each layer carrying its last frames over) because of two first-frame rules
that the chunked code implements through its cache, reproduced here explicitly:
  - temporal downsampling keeps frame 0 as is and convolves (kernel 3, stride 2, no
    padding) over the whole clip: outputs `[x0, f(x0, x1, x2), f(x2, x3, x4), ...]`;
  - temporal upsampling keeps frame 0 as is (one frame) and turns every later frame into
    two, by a causal convolution over frames 1.. alone (zero history, not frame 0).

The clip can also be run chunk by chunk, each chunk continuing the last: every block is
called `block(x, state) -> (y, state)`, with `state` None for a chunk that starts the
clip (zero history and the first-frame rules) and otherwise what the previous chunk
returned. That state is a tuple of arrays: each causal convolution's last two input
frames, the temporal downsampler's last input frame (its stride-2 window reaches one
frame back), the temporal upsampler's convolution frames (still zero after a first chunk
of frame 0 alone); per-frame layers (norms, attention, spatial resampling) keep none
(`()`). Every chunk after the first must have an even number of frames at each temporal
downsampling. Run over the whole clip, the state that comes out is unused and compiles
away.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention_chunks import chunked_attention, default_chunk


class CausalConv3d(nnx.Module):
    """A 3D convolution causal in time (kernel `kt` frames: output frame i sees input
    frames i - kt + 1 .. i), zero-padded by half the kernel in space; parameters `kernel`
    `[kt, kh, kw, in, out]` and `bias` as in `nnx.Conv`.

    `conv(x, past) -> (y, history)`: `past` holds the `kt - 1` input frames before `x`
    (None: zeros, `x` starts the clip); `history` is the last `kt - 1` frames of
    `[past, x]`, the `past` of the chunk that follows.
    """

    def __init__(self, cin: int, cout: int, *, rngs, dtype, kernel=(3, 3, 3)):
        kt, kh, kw = kernel
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (*kernel, cin, cout), dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), dtype))
        self.history = kt - 1
        self.space = ((kh // 2, kh // 2), (kw // 2, kw // 2))

    def __call__(self, x, past=None):
        n = self.history
        if past is None:
            # Zero frames as the convolution's own padding: an explicit pad of a whole
            # clip is not always folded into it by XLA and costs a copy.
            time = (n, 0)
            history = x[:, -n:] if x.shape[1] >= n else jnp.pad(
                x, ((0, 0), (n - x.shape[1], 0), (0, 0), (0, 0), (0, 0)))
        else:
            time, x = (0, 0), jnp.concatenate([past.astype(x.dtype), x], axis=1)
            history = x[:, -n:]
        kernel = self.kernel[...]
        y = jax.lax.conv_general_dilated(x.astype(kernel.dtype), kernel, (1, 1, 1),
                                         (time, *self.space),
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + self.bias[...], history


def _run(layers, x, state):
    """`x` through `layers` in turn, each with its own state (all None: `x` starts the
    clip); returns the output and the tuple of the layers' new states."""
    new = []
    for layer, past in zip(layers, (None,) * len(layers) if state is None else state):
        x, past = layer(x, past)
        new.append(past)
    return x, tuple(new)


def _pointwise(cin, cout, *, rngs, dtype):
    """A 1x1(x1) convolution as a linear layer over channels."""
    return nnx.Linear(cin, cout, dtype=dtype, param_dtype=dtype, rngs=rngs)


class RMSNorm(nnx.Module):
    """`x / ||x|| * sqrt(C) * gamma` over the channels of each position (no bias), in
    float32 whatever the input dtype; the norm is clamped at 1e-12 as PyTorch's
    `F.normalize` does."""

    def __init__(self, channels: int, *, dtype):
        self.gamma = nnx.Param(jnp.ones((channels,), dtype))
        self.scale = channels ** 0.5

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, 1e-12) * self.scale * self.gamma[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2 (causal 3x3x3), plus the input
    (through a 1x1x1 `conv_shortcut` when the channel count changes). Dropout is not
    applied (inference)."""

    def __init__(self, cin: int, cout: int, *, rngs, dtype):
        self.norm1 = RMSNorm(cin, dtype=dtype)
        self.conv1 = CausalConv3d(cin, cout, rngs=rngs, dtype=dtype)
        self.norm2 = RMSNorm(cout, dtype=dtype)
        self.conv2 = CausalConv3d(cout, cout, rngs=rngs, dtype=dtype)
        self.conv_shortcut = (_pointwise(cin, cout, rngs=rngs, dtype=dtype)
                              if cin != cout else None)

    def __call__(self, x, state=None):
        past1, past2 = (None, None) if state is None else state
        h, past1 = self.conv1(jax.nn.silu(self.norm1(x)), past1)
        h, past2 = self.conv2(jax.nn.silu(self.norm2(h)), past2)
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return h + skip, (past1, past2)


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the positions of each frame, with a residual."""

    def __init__(self, channels: int, *, rngs, dtype, chunk: int | None = None):
        self.norm = RMSNorm(channels, dtype=dtype)
        self.to_qkv = _pointwise(channels, 3 * channels, rngs=rngs, dtype=dtype)
        self.proj = _pointwise(channels, channels, rngs=rngs, dtype=dtype)
        self.chunk = chunk

    def __call__(self, x, state=None):
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x).reshape(b * t, h * w, c))
        q, k, v = jnp.split(qkv, 3, axis=-1)
        o = chunked_attention(q, k, v, self.chunk or default_chunk(b * t, h * w))
        return x + self.proj(o).reshape(b, t, h, w, c), ()


class ZeroPadAfter(nnx.Module):
    """One zero row and column after the last (the stride-2 convolution's padding)."""

    def __call__(self, x):
        return jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))


class Nearest2x(nnx.Module):
    """Nearest-neighbour x2 in height and width (diffusers' "nearest-exact" at scale 2)."""

    def __call__(self, x):
        n, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None], (n, h, 2, w, 2, c))
        return x.reshape(n, 2 * h, 2 * w, c)


class Resample(nnx.Module):
    """Spatial x2 down/up sampling of every frame (`resample.0` the padding or the
    nearest-neighbour step, `resample.1` the 3x3 convolution), with temporal x2 down/up
    sampling too in the "3d" modes (`time_conv`, frame 0 kept as is: see the module
    docstring). Modes: downsample2d, downsample3d, upsample2d, upsample3d; upsampling
    halves the channels."""

    def __init__(self, channels: int, mode: str, *, rngs, dtype):
        self.mode = mode
        if mode.startswith("down"):
            conv = nnx.Conv(channels, channels, kernel_size=(3, 3), strides=(2, 2),
                            padding="VALID", dtype=dtype, param_dtype=dtype, rngs=rngs)
            self.resample = nnx.List([ZeroPadAfter(), conv])
        elif mode.startswith("up"):
            conv = nnx.Conv(channels, channels // 2, kernel_size=(3, 3), padding=((1, 1),) * 2,
                            dtype=dtype, param_dtype=dtype, rngs=rngs)
            self.resample = nnx.List([Nearest2x(), conv])
        else:
            raise ValueError(f"Resample: unknown mode {mode!r}")
        if mode == "downsample3d":
            self.time_conv = nnx.Conv(channels, channels, kernel_size=(3, 1, 1),
                                      strides=(2, 1, 1), padding="VALID", dtype=dtype,
                                      param_dtype=dtype, rngs=rngs)
        elif mode == "upsample3d":
            self.time_conv = CausalConv3d(channels, 2 * channels, kernel=(3, 1, 1),
                                          rngs=rngs, dtype=dtype)

    def _spatial(self, x):
        b, t = x.shape[:2]
        y = x.reshape(b * t, *x.shape[2:])
        for layer in self.resample:
            y = layer(y)
        return y.reshape(b, t, *y.shape[1:])

    def _time_up(self, x, past):
        """Frame 0 (when `x` starts the clip) kept, every other frame turned into two."""
        b, t, h, w, c = x.shape
        first, rest = (x[:, :1], x[:, 1:]) if past is None else (None, x)
        if rest.shape[1] == 0:      # frame 0 alone: the convolution has seen nothing yet
            return x, jnp.zeros((b, self.time_conv.history, h, w, c), x.dtype)
        pairs, past = self.time_conv(rest, past)
        n = rest.shape[1]
        pairs = jnp.moveaxis(pairs.reshape(b, n, h, w, 2, c), 4, 2).reshape(b, 2 * n, h, w, c)
        return (pairs if first is None else jnp.concatenate([first, pairs], axis=1)), past

    def _time_down(self, x, last):
        """Frame 0 (when `x` starts the clip) kept, then one frame per two: the stride-2
        window starts at frame 0, or at `last`, the frame before `x`."""
        if last is None:
            y = x[:, :1] if x.shape[1] == 1 else jnp.concatenate(
                [x[:, :1], self.time_conv(x)], axis=1)
        else:
            y = self.time_conv(jnp.concatenate([last, x], axis=1))
        return y, x[:, -1:]

    def __call__(self, x, state=None):
        if self.mode == "upsample3d":
            x, state = self._time_up(x, state)
        x = self._spatial(x)
        if self.mode == "downsample3d":
            x, state = self._time_down(x, state)
        return x, (state if self.mode.endswith("3d") else ())


class MidBlock(nnx.Module):
    """Residual block, per-frame attention, residual block."""

    def __init__(self, channels: int, *, rngs, dtype, chunk=None):
        self.resnets = nnx.List([ResidualBlock(channels, channels, rngs=rngs, dtype=dtype)
                                 for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(channels, rngs=rngs, dtype=dtype,
                                                   chunk=chunk)])

    def __call__(self, x, state=None):
        return _run((self.resnets[0], self.attentions[0], self.resnets[1]), x, state)


class UpBlock(nnx.Module):
    """`num_res_blocks + 1` residual blocks, then an optional `upsamplers.0`."""

    def __init__(self, cin: int, cout: int, num_blocks: int, mode: str | None, *, rngs,
                 dtype):
        self.resnets = nnx.List([ResidualBlock(cin if i == 0 else cout, cout, rngs=rngs,
                                               dtype=dtype) for i in range(num_blocks)])
        self.upsamplers = (nnx.List([Resample(cout, mode, rngs=rngs, dtype=dtype)])
                           if mode else None)

    def __call__(self, x, state=None):
        return _run((*self.resnets, *(self.upsamplers or ())), x, state)


class Encoder(nnx.Module):
    """Video `[B, T, H, W, in]` -> posterior moments `[B, T', H/s, W/s, 2 * z_dim]`, and
    the state to continue the clip with (see the module docstring).

    `down_blocks` is one flat list as in diffusers: per level `num_res_blocks` residual
    blocks (each followed by an attention block at the scales in `attn_scales`), then a
    resampler on every level but the last.
    """

    def __init__(self, config, *, rngs, dtype, chunk=None):
        c = config
        dims = [c.base_dim * m for m in (1,) + c.dim_mult]
        self.conv_in = CausalConv3d(c.in_channels, dims[0], rngs=rngs, dtype=dtype)
        blocks, scale = [], 1.0
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(c.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, rngs=rngs, dtype=dtype))
                if scale in c.attn_scales:
                    blocks.append(AttentionBlock(cout, rngs=rngs, dtype=dtype, chunk=chunk))
                cin = cout
            if i < len(c.dim_mult) - 1:
                mode = "downsample3d" if c.temperal_downsample[i] else "downsample2d"
                blocks.append(Resample(cout, mode, rngs=rngs, dtype=dtype))
                scale /= 2.0
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], rngs=rngs, dtype=dtype, chunk=chunk)
        self.norm_out = RMSNorm(dims[-1], dtype=dtype)
        self.conv_out = CausalConv3d(dims[-1], 2 * c.z_dim, rngs=rngs, dtype=dtype)

    def __call__(self, x, state=None):
        body, out = (None, None) if state is None else state
        x, body = _run((self.conv_in, *self.down_blocks, self.mid_block), x, body)
        x, out = self.conv_out(jax.nn.silu(self.norm_out(x)), out)
        return x, (body, out)


class Decoder(nnx.Module):
    """Latents `[B, T', h, w, z_dim]` -> video `[B, T, h*s, w*s, out]`, and the state to
    continue the clip with (see the module docstring).

    `up_blocks` run from the lowest resolution up; the temporal upsampling of level i is
    the temporal downsampling of encoder level `levels - 2 - i`. A level after an
    upsampler starts from half its channels (Wan2.1's upsamplers halve them).
    """

    def __init__(self, config, *, rngs, dtype, chunk=None):
        c = config
        dims = [c.decoder_dim * m for m in (c.dim_mult[-1],) + c.dim_mult[::-1]]
        up_time = c.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(c.z_dim, dims[0], rngs=rngs, dtype=dtype)
        self.mid_block = MidBlock(dims[0], rngs=rngs, dtype=dtype, chunk=chunk)
        levels = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(c.dim_mult) - 1
            mode = None if last else ("upsample3d" if up_time[i] else "upsample2d")
            levels.append(UpBlock(cin // 2 if i > 0 else cin, cout, c.num_res_blocks + 1, mode,
                                  rngs=rngs, dtype=dtype))
        self.up_blocks = nnx.List(levels)
        self.norm_out = RMSNorm(dims[-1], dtype=dtype)
        self.conv_out = CausalConv3d(dims[-1], c.out_channels, rngs=rngs, dtype=dtype)

    def __call__(self, z, state=None):
        body, out = (None, None) if state is None else state
        x, body = _run((self.conv_in, self.mid_block, *self.up_blocks), z, body)
        x, out = self.conv_out(jax.nn.silu(self.norm_out(x)), out)
        return x, (body, out)
