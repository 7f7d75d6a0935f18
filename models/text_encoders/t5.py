"""The T5 v1.1 encoder (FLUX's `text_encoder_2`) and umT5 (Wan2.1's `text_encoder`) in
Flax NNX.

Module and parameter paths mirror transformers' `T5EncoderModel` checkpoint one to one
(`encoder.block.0.layer.0.SelfAttention.q`, `encoder.block.0.layer.1.DenseReluDense.wi_0`,
`shared`, ...): a Flax `kernel` is the checkpoint's `weight` transposed, every other
parameter keeps its name, so loading is mechanical (`load_t5`).

umT5 is T5 v1.1 with one change: every layer owns its relative position bias table
(`encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias`), where T5 v1.1 has
one table in the first layer shared by all. `T5Config.per_layer_position_bias` selects
it; `T5Config.from_hf` sets it for transformers configs of model_type "umt5".

Precision: T5 v1.1's activations are known to pass float16's maximum, so the residual
stream is kept in float32 whatever the parameter dtype; each sublayer reads it through an
RMS norm (variance in float32), computes in the parameter dtype, and adds its output back
in float32. Attention logits and softmax are float32. float16 parameters are refused;
bfloat16 has float32's range.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from models.text_encoders.common import (Embedding, check_dtype, check_ids, linear,
                                         load_params)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyperparameters of a T5 v1.1 or umT5 encoder (gated-GELU feed-forward, tanh GELU).

    `per_layer_position_bias`: False for T5 v1.1 (the first layer's bias table serves
    every layer), True for umT5 (each layer has its own table).
    """
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    per_layer_position_bias: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"T5Config.{name} must be a positive int, got {value!r}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("T5Config.relative_attention_num_buckets must be >= 4 (half per "
                             "direction, half of that exact), got "
                             f"{self.relative_attention_num_buckets}")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"T5Config.layer_norm_epsilon must be > 0, got "
                             f"{self.layer_norm_epsilon!r}")
        if not isinstance(self.per_layer_position_bias, bool):
            raise TypeError(f"T5Config.per_layer_position_bias must be a bool, got "
                            f"{self.per_layer_position_bias!r}")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf(cls, config: dict) -> "T5Config":
        """The config of a transformers `config.json` dict: `T5EncoderModel` (T5 v1.1,
        model_type "t5" or "mt5", or none) or `UMT5EncoderModel` (model_type "umt5",
        which sets `per_layer_position_bias`).

        Raises ValueError unless the feed-forward is gated GELU (`feed_forward_proj`
        "gated-gelu", activation "gelu_new"), if the model_type is another one, or if a
        field is missing.
        """
        model_type = config.get("model_type", "t5")
        # transformers' defaults: UMT5Config is gated-GELU, T5Config ReLU.
        ff = config.get("feed_forward_proj", "gated-gelu" if model_type == "umt5" else "relu")
        act = config.get("dense_act_fn", "gelu_new")
        if ff != "gated-gelu" or act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"expected a T5 v1.1 config with feed_forward_proj 'gated-gelu' "
                             f"(tanh GELU); got feed_forward_proj {ff!r}, dense_act_fn {act!r}")
        if model_type not in ("t5", "mt5", "umt5"):
            raise ValueError(f"expected model_type 't5', 'mt5' or 'umt5', got {model_type!r}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"per_layer_position_bias"}
        missing = sorted(fields - set(config) - {"relative_attention_max_distance",
                                                "layer_norm_epsilon"})
        if missing:
            raise ValueError(f"T5 config lacks the fields {missing}")
        return cls(**{k: config[k] for k in fields if k in config},
                   per_layer_position_bias=model_type == "umt5")


T5_V1_1_XXL = T5Config()
# google/umt5-xxl's encoder, Wan2.1's text encoder.
UMT5_XXL = T5Config(vocab_size=256384, per_layer_position_bias=True)


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int,
                             max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of each `key - query` offset (int array, any shape).

    Half the buckets per direction; of those, half are exact offsets and half are
    logarithmic up to `max_distance`, beyond which all offsets share the last bucket.
    The logarithm is taken in float32, as the reference does, so the boundaries agree.
    """
    rel = np.asarray(relative_position, np.int64)
    half = num_buckets // 2
    bucket = np.where(rel > 0, half, 0)
    dist = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        log_ratio = np.log(dist.astype(np.float32) / np.float32(max_exact))
    large = max_exact + (log_ratio / np.float32(math.log(max_distance / max_exact))
                         * np.float32(half - max_exact))
    large = np.minimum(np.where(dist < max_exact, 0, large).astype(np.int64), half - 1)
    return bucket + np.where(dist < max_exact, dist, large)


class T5LayerNorm(nnx.Module):
    """RMS norm without mean or bias; variance in float32, output in the weight dtype."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        return w * xf.astype(w.dtype)


class T5Attention(nnx.Module):
    """Self-attention without q.k scaling; owns a relative bias table when
    `has_relative_attention_bias` (the first layer of T5 v1.1, every layer of umT5)."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, *, rngs, dtype):
        self.cfg = cfg
        self.q = linear(cfg.d_model, cfg.inner_dim, rngs, dtype, bias=False)
        self.k = linear(cfg.d_model, cfg.inner_dim, rngs, dtype, bias=False)
        self.v = linear(cfg.d_model, cfg.inner_dim, rngs, dtype, bias=False)
        self.o = linear(cfg.inner_dim, cfg.d_model, rngs, dtype, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = Embedding(cfg.relative_attention_num_buckets,
                                                     cfg.num_heads, rngs=rngs, dtype=dtype)

    def buckets(self, length: int) -> np.ndarray:
        """Bucket `[query, key]` (int32) of each offset in a sequence of `length` tokens."""
        pos = np.arange(length)
        return relative_position_bucket(pos[None, :] - pos[:, None],
                                        self.cfg.relative_attention_num_buckets,
                                        self.cfg.relative_attention_max_distance
                                        ).astype(np.int32)

    def compute_bias(self, buckets: np.ndarray) -> Float[Array, "1 h l l"]:
        """Float32 bias `[1, heads, query, key]` of the buckets `[query, key]`."""
        values = self.relative_attention_bias(jnp.asarray(buckets))     # [l, l, h]
        return values.astype(jnp.float32).transpose(2, 0, 1)[None]

    def __call__(self, x, bias):
        b, l, _ = x.shape
        q, k, v = (p(x).reshape(b, l, self.cfg.num_heads, self.cfg.d_kv)
                   for p in (self.q, self.k, self.v))
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0)
        return self.o(out.reshape(b, l, self.cfg.inner_dim))


class T5DenseGatedActDense(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs, dtype):
        self.wi_0 = linear(cfg.d_model, cfg.d_ff, rngs, dtype, bias=False)
        self.wi_1 = linear(cfg.d_model, cfg.d_ff, rngs, dtype, bias=False)
        self.wo = linear(cfg.d_ff, cfg.d_model, rngs, dtype, bias=False)

    def __call__(self, x):
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, *, rngs, dtype):
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias, rngs=rngs,
                                         dtype=dtype)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)

    def __call__(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias).astype(jnp.float32)


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs, dtype):
        self.DenseReluDense = T5DenseGatedActDense(cfg, rngs=rngs, dtype=dtype)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)

    def __call__(self, x):
        return x + self.DenseReluDense(self.layer_norm(x)).astype(jnp.float32)


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, *, rngs, dtype):
        self.layer = nnx.List([
            T5LayerSelfAttention(cfg, has_relative_attention_bias, rngs=rngs, dtype=dtype),
            T5LayerFF(cfg, rngs=rngs, dtype=dtype)])

    def __call__(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs, dtype):
        self.block = nnx.List([T5Block(cfg, i == 0 or cfg.per_layer_position_bias,
                                       rngs=rngs, dtype=dtype)
                               for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)


class T5Encoder(nnx.Module):
    """T5 v1.1 / umT5 encoder: token embedding, `num_layers` pre-norm blocks, final RMS
    norm.

    Args:
      config: a `T5Config` (`T5_V1_1_XXL` for FLUX, `UMT5_XXL` for Wan2.1).
      rngs: initialisation randomness (use `nnx.eval_shape` and `load_t5` for weights).
      dtype: parameter and compute dtype, float32 or bfloat16 (float16 is refused: T5
        v1.1 activations exceed its range).
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        if not isinstance(config, T5Config):
            raise TypeError(f"config must be a T5Config, got {type(config).__name__}")
        self.config = config
        self.dtype = check_dtype(dtype, (jnp.float32, jnp.bfloat16), "T5Encoder dtype")
        self.shared = Embedding(config.vocab_size, config.d_model, rngs=rngs, dtype=dtype)
        self.encoder = T5Stack(config, rngs=rngs, dtype=dtype)

    def __call__(self, input_ids: Int[Array, "b l"],
                 attention_mask: Int[Array, "b l"] | None = None) -> Float[Array, "b l d"]:
        """Last hidden state `[B, L, d_model]` in the model dtype.

        `attention_mask` (optional, `[B, L]`, nonzero = attend) hides padding keys; FLUX
        passes none, Wan2.1 passes one. Raises ValueError / TypeError for ids or a mask of
        the wrong shape or dtype (ids outside the vocabulary cannot be checked under `jit`).
        """
        check_ids(input_ids, "input_ids")
        b, l = input_ids.shape
        keep = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (b, l):
                raise ValueError(f"attention_mask must have the shape of input_ids {(b, l)}, "
                                 f"got {tuple(attention_mask.shape)}")
            keep = (jnp.asarray(attention_mask) != 0)[:, None, None, :]
        stack = self.encoder
        buckets = stack.block[0].layer[0].SelfAttention.buckets(l)

        def bias_of(block):
            bias = block.layer[0].SelfAttention.compute_bias(buckets)
            return bias if keep is None else jnp.where(keep, bias,
                                                       jnp.finfo(jnp.float32).min)

        shared_bias = None if self.config.per_layer_position_bias else bias_of(stack.block[0])
        x = self.shared(input_ids).astype(jnp.float32)     # float32 residual stream
        for block in stack.block:
            x = block(x, bias_of(block) if shared_bias is None else shared_bias)
        return stack.final_layer_norm(x)


def load_t5(folder: str, *, dtype=jnp.bfloat16) -> T5Encoder:
    """A `T5Encoder` from a transformers folder: `config.json` and `model.safetensors` or
    shards with `model.safetensors.index.json` (FLUX's `text_encoder_2`, a
    `T5EncoderModel`, or Wan2.1's `text_encoder`, a `UMT5EncoderModel`).

    Tensors are read lazily (bf16 included) and cast to `dtype`. The tied duplicate
    `encoder.embed_tokens.weight` is used only when `shared.weight` is absent. Raises
    `CheckpointError` naming the file or tensor that is missing, unexpected or
    mis-shaped (a T5 v1.1 checkpoint under a umT5 config lacks the later layers' bias
    tables; the reverse has them unexpected), or `config.json` when it is not a T5 v1.1
    or umT5 config.
    """
    return load_params(folder, T5Config.from_hf, T5Encoder, dtype=dtype,
                       aliases={"encoder.embed_tokens.weight": "shared.weight"})
