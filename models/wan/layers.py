"""Wan2.1 building blocks in Flax NNX, named like the official checkpoint's modules.

Parameter paths mirror the official Wan2.1 checkpoint one to one (`blocks.0.self_attn.q`,
`blocks.0.norm3`, `ffn.0`, `modulation`, `head.head`), so weight conversion is a rename
and a transpose. The residual stream and every norm and modulation run in float32, as in
the official code; projections run in the parameters' dtype. The small parameters the
output is sensitive to (modulation tables, affine norm weights, and in `Wan` the time
embedding) are float32 whatever the model's dtype, as diffusers and the official code keep
them (`PRECISE`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pisa_jax.nn import Attention, AttentionPolicy

# dtype of the precision-critical parameters, whatever the model's dtype.
PRECISE = jnp.float32


def _linear(cin, cout, rngs, dtype):
    return nnx.Linear(cin, cout, dtype=dtype, param_dtype=dtype, rngs=rngs)


def _gelu(x):
    return jax.nn.gelu(x, approximate=True)


def layer_norm(x: jax.Array, eps: float, weight=None, bias=None) -> jax.Array:
    """LayerNorm over the last axis in float32 (affine if `weight` is given)."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    out = (xf - mean) * jax.lax.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.astype(jnp.float32) + bias.astype(jnp.float32)
    return out


# ------------------------------------------------------------------------------- math

def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (x0, x1) of `x` `[B, L, H, D]` by `[L, D/2]` angles, in float32."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None], sin[:, None]
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


# ---------------------------------------------------------------------------- modules

class RMSNorm(nnx.Module):
    """RMS norm over the last axis in float32, then a learned scale (`weight`)."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), PRECISE))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
    """Affine LayerNorm in float32 (the norm before the cross-attention)."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), PRECISE))
        self.bias = nnx.Param(jnp.zeros((dim,), PRECISE))

    def __call__(self, x):
        return layer_norm(x, self.eps, self.weight[...], self.bias[...])


class PatchEmbedding(nnx.Module):
    """Non-overlapping 3D patches -> tokens; the kernel is a Conv3d's, `[pt, ph, pw, C, dim]`."""

    def __init__(self, in_channels: int, dim: int, patch_size, *, rngs, dtype):
        self.patch_size = tuple(patch_size)
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (*patch_size, in_channels, dim), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x):
        """`[B, C, F, H, W]` -> `[B, F/pt, H/ph, W/pw, dim]`."""
        b, c, f, h, w = x.shape
        pt, ph, pw = self.patch_size
        x = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
        x = x.transpose(0, 2, 4, 6, 3, 5, 7, 1).astype(self.kernel.dtype)
        return jnp.einsum("bfhwpqrc,pqrcd->bfhwd", x, self.kernel[...]) + self.bias[...]


class WanSelfAttention(nnx.Module):
    """Multi-head attention; q and k RMS-normed across all heads (norm over dim).

    Self-attention (with rotary angles, through `attn`'s policy) when called with
    `context=None`; cross-attention to `context`, always dense, otherwise.
    """

    def __init__(self, dim: int, num_heads: int, eps: float, qk_norm: bool,
                 policy: AttentionPolicy, *, rngs, dtype):
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (_linear(dim, dim, rngs, dtype) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else None
        self.norm_k = RMSNorm(dim, eps) if qk_norm else None
        self.attn = Attention(policy)

    def __call__(self, x, context=None, rope=None, *, dense: bool = False):
        dtype = self.q.kernel.dtype
        x = x.astype(dtype)
        kv = x if context is None else context
        q, k, v = self.q(x), self.k(kv), self.v(kv)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        split = lambda t: t.reshape(*t.shape[:2], self.num_heads, -1)
        q, k, v = split(q), split(k), split(v)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = self.attn(q, k, v, dense=dense or context is not None, layout="bthd")
        return self.o(out.reshape(*out.shape[:2], -1))


class WanAttentionBlock(nnx.Module):
    """Self-attention, cross-attention to the text, feed-forward; modulated by the time."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float, qk_norm: bool,
                 cross_attn_norm: bool, policy: AttentionPolicy, *, rngs, dtype):
        self.eps = eps
        self.self_attn = WanSelfAttention(dim, num_heads, eps, qk_norm, policy,
                                          rngs=rngs, dtype=dtype)
        self.cross_attn = WanSelfAttention(dim, num_heads, eps, qk_norm,
                                           AttentionPolicy(kind="dense"), rngs=rngs, dtype=dtype)
        self.norm3 = LayerNorm(dim, eps) if cross_attn_norm else None
        self.ffn = nnx.Dict({"0": _linear(dim, ffn_dim, rngs, dtype),
                             "2": _linear(ffn_dim, dim, rngs, dtype)})
        self.modulation = nnx.Param(
            jax.random.normal(rngs.params(), (1, 6, dim), PRECISE) / math.sqrt(dim))

    def __call__(self, x, e, context, rope, *, dense: bool = False):
        """x `[B, L, dim]` float32, e `[B, 6, dim]` float32 -> `[B, L, dim]` float32."""
        e = self.modulation[...] + e
        shift1, scale1, gate1, shift2, scale2, gate2 = (e[:, i:i + 1] for i in range(6))
        dtype = self.ffn["0"].kernel.dtype
        y = layer_norm(x, self.eps) * (1 + scale1) + shift1
        x = x + self.self_attn(y.astype(dtype), rope=rope, dense=dense) * gate1
        y = self.norm3(x) if self.norm3 is not None else x
        x = x + self.cross_attn(y.astype(dtype), context)
        y = (layer_norm(x, self.eps) * (1 + scale2) + shift2).astype(dtype)
        return x + self.ffn["2"](_gelu(self.ffn["0"](y))) * gate2


class Head(nnx.Module):
    """Output norm modulated by the time embedding, then the projection to patches."""

    def __init__(self, dim: int, out_dim: int, eps: float, *, rngs, dtype):
        self.eps = eps
        self.head = _linear(dim, out_dim, rngs, dtype)
        self.modulation = nnx.Param(
            jax.random.normal(rngs.params(), (1, 2, dim), PRECISE) / math.sqrt(dim))

    def __call__(self, x, e):
        """x `[B, L, dim]` float32, e `[B, dim]` float32 (the time embedding)."""
        e = self.modulation[...] + e[:, None]
        shift, scale = e[:, :1], e[:, 1:]
        y = layer_norm(x, self.eps) * (1 + scale) + shift
        return self.head(y.astype(self.head.kernel.dtype))
