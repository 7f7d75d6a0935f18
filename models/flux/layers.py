"""FLUX.1 building blocks in Flax NNX, named like the reference checkpoint's modules.

Parameter paths mirror the Black Forest Labs checkpoint one to one (`img_attn.qkv`,
`img_mlp.0`, `modulation.lin`, ...), so weight conversion is a rename and a transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.flux.math import attention
from pisa_jax.nn import Attention, AttentionPolicy


def _linear(cin, cout, rngs, dtype, bias=True):
    return nnx.Linear(cin, cout, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


def _layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm without affine parameters, eps 1e-6, computed in float32."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + 1e-6)).astype(x.dtype)


def _gelu(x):
    return jax.nn.gelu(x, approximate=True)


class MLPEmbedder(nnx.Module):
    def __init__(self, in_dim: int, hidden: int, *, rngs, dtype):
        self.in_layer = _linear(in_dim, hidden, rngs, dtype)
        self.out_layer = _linear(hidden, hidden, rngs, dtype)

    def __call__(self, x):
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        rrms = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)
        return (xf * rrms).astype(x.dtype) * self.scale[...]


class QKNorm(nnx.Module):
    def __init__(self, dim: int, *, dtype):
        self.query_norm = RMSNorm(dim, dtype=dtype)
        self.key_norm = RMSNorm(dim, dtype=dtype)

    def __call__(self, q, k, v):
        return self.query_norm(q).astype(v.dtype), self.key_norm(k).astype(v.dtype)


def split_qkv(x, num_heads: int):
    """`[B, L, 3*H*D]` -> q, k, v `[B, L, H, D]` (views of the fused projection)."""
    b, l, _ = x.shape
    x = x.reshape(b, l, 3, num_heads, -1)
    return x[:, :, 0], x[:, :, 1], x[:, :, 2]


class SelfAttention(nnx.Module):
    """Projections of one stream: fused qkv, per-head q/k norm, output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, *, rngs, dtype):
        self.num_heads = num_heads
        self.qkv = _linear(dim, 3 * dim, rngs, dtype, qkv_bias)
        self.norm = QKNorm(dim // num_heads, dtype=dtype)
        self.proj = _linear(dim, dim, rngs, dtype)

    def split_heads(self, x):
        """`[B, L, 3*H*D]` -> q, k, v `[B, L, H, D]`, q and k normed."""
        q, k, v = split_qkv(x, self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nnx.Module):
    """Shift, scale, gate triples from the conditioning vector (two for double blocks)."""

    def __init__(self, dim: int, double: bool, *, rngs, dtype):
        self.multiplier = 6 if double else 3
        self.lin = _linear(dim, self.multiplier * dim, rngs, dtype)

    def __call__(self, vec):
        out = self.lin(jax.nn.silu(vec))[:, None, :]
        chunks = jnp.split(out, self.multiplier, axis=-1)
        return [tuple(chunks[i:i + 3]) for i in range(0, self.multiplier, 3)]


def _modulate(x, shift, scale):
    return (1 + scale) * _layer_norm(x) + shift


class DoubleStreamBlock(nnx.Module):
    """Separate weights for image and text tokens, one joint attention (text first)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 policy: AttentionPolicy, *, rngs, dtype):
        hidden = int(dim * mlp_ratio)
        self.img_mod = Modulation(dim, True, rngs=rngs, dtype=dtype)
        self.img_attn = SelfAttention(dim, num_heads, qkv_bias, rngs=rngs, dtype=dtype)
        self.img_mlp = nnx.Dict({"0": _linear(dim, hidden, rngs, dtype),
                                 "2": _linear(hidden, dim, rngs, dtype)})
        self.txt_mod = Modulation(dim, True, rngs=rngs, dtype=dtype)
        self.txt_attn = SelfAttention(dim, num_heads, qkv_bias, rngs=rngs, dtype=dtype)
        self.txt_mlp = nnx.Dict({"0": _linear(dim, hidden, rngs, dtype),
                                 "2": _linear(hidden, dim, rngs, dtype)})
        self.attn = Attention(policy)

    @staticmethod
    def _mlp(mlp, x):
        return mlp["2"](_gelu(mlp["0"](x)))

    def __call__(self, img, txt, vec, pe, *, dense: bool = False):
        (i_shift1, i_scale1, i_gate1), (i_shift2, i_scale2, i_gate2) = self.img_mod(vec)
        (t_shift1, t_scale1, t_gate1), (t_shift2, t_scale2, t_gate2) = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.split_heads(
            self.img_attn.qkv(_modulate(img, i_shift1, i_scale1)))
        txt_q, txt_k, txt_v = self.txt_attn.split_heads(
            self.txt_attn.qkv(_modulate(txt, t_shift1, t_scale1)))
        q, k, v = (jnp.concatenate(p, axis=1) for p in
                   ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        n_txt = txt.shape[1]
        out = attention(q, k, v, pe, self.attn, num_text_tokens=n_txt, dense=dense)
        txt_out, img_out = out[:, :n_txt], out[:, n_txt:]
        img = img + i_gate1 * self.img_attn.proj(img_out)
        img = img + i_gate2 * self._mlp(self.img_mlp, _modulate(img, i_shift2, i_scale2))
        txt = txt + t_gate1 * self.txt_attn.proj(txt_out)
        txt = txt + t_gate2 * self._mlp(self.txt_mlp, _modulate(txt, t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nnx.Module):
    """One fused projection to qkv and the MLP input, one fused output projection."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, policy: AttentionPolicy,
                 *, rngs, dtype):
        self.dim = dim
        self.num_heads = num_heads
        self.mlp_hidden = int(dim * mlp_ratio)
        self.linear1 = _linear(dim, 3 * dim + self.mlp_hidden, rngs, dtype)
        self.linear2 = _linear(dim + self.mlp_hidden, dim, rngs, dtype)
        self.norm = QKNorm(dim // num_heads, dtype=dtype)
        self.modulation = Modulation(dim, False, rngs=rngs, dtype=dtype)
        self.attn = Attention(policy)

    def __call__(self, x, vec, pe, *, num_text_tokens: int, dense: bool = False):
        [(shift, scale, gate)] = self.modulation(vec)
        fused = self.linear1(_modulate(x, shift, scale))
        qkv, mlp = fused[..., :3 * self.dim], fused[..., 3 * self.dim:]
        q, k, v = split_qkv(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = attention(q, k, v, pe, self.attn, num_text_tokens=num_text_tokens, dense=dense)
        return x + gate * self.linear2(jnp.concatenate([out, _gelu(mlp)], axis=-1))


class LastLayer(nnx.Module):
    def __init__(self, dim: int, out_channels: int, *, rngs, dtype):
        self.adaLN_modulation = nnx.Dict({"1": _linear(dim, 2 * dim, rngs, dtype)})
        self.linear = _linear(dim, out_channels, rngs, dtype)

    def __call__(self, x, vec):
        shift, scale = jnp.split(self.adaLN_modulation["1"](jax.nn.silu(vec)), 2, axis=-1)
        x = (1 + scale[:, None, :]) * _layer_norm(x) + shift[:, None, :]
        return self.linear(x)
