"""The CLIP text transformer (FLUX's `text_encoder`, CLIP ViT-L/14) in Flax NNX.

Module and parameter paths mirror transformers' `CLIPTextModel` checkpoint
(`embeddings.token_embedding`, `encoder.layers.0.self_attn.q_proj`, `final_layer_norm`,
...); checkpoints written with the `text_model.` prefix (the released ones) are read too.
A Flax `kernel` is the checkpoint's `weight` transposed, every other parameter keeps its
name (`load_clip`).

The residual stream is float32 whatever the parameter dtype (sublayers compute in the
parameter dtype); layer norms, attention logits and softmax are float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from models.text_encoders.common import (Embedding, check_dtype, check_ids, linear,
                                         load_params)

# transformers' configs said eos_token_id 2 before the real end-of-text id was stored;
# with that value the end of text is found as the largest id (as CLIP's tokenizer has it).
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyperparameters of a CLIP text transformer (quick-GELU MLP, causal attention)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    eos_token_id: int = LEGACY_EOS_TOKEN_ID

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CLIPTextConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextConfig.hidden_size ({self.hidden_size}) must be a "
                             f"multiple of num_attention_heads ({self.num_attention_heads})")
        if not isinstance(self.eos_token_id, int) or not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"CLIPTextConfig.eos_token_id must be an id in [0, "
                             f"{self.vocab_size}), got {self.eos_token_id!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"CLIPTextConfig.layer_norm_eps must be > 0, got "
                             f"{self.layer_norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: dict) -> "CLIPTextConfig":
        """The config of a transformers `config.json` dict (`CLIPTextModel`, or a full
        `CLIPModel` config through its `text_config`). Raises ValueError unless the
        activation is quick GELU, or if a field is missing."""
        config = config.get("text_config", config)
        act = config.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise ValueError(f"expected a CLIP text config with hidden_act 'quick_gelu', "
                             f"got {act!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        # eos_token_id is required: transformers' default (49407) differs from FLUX's 2.
        missing = sorted(fields - set(config) - {"layer_norm_eps"})
        if missing:
            raise ValueError(f"CLIP text config lacks the fields {missing}")
        return cls(**{k: config[k] for k in fields if k in config})


CLIP_VIT_L14_TEXT = CLIPTextConfig()


class LayerNorm(nnx.Module):
    """LayerNorm with `weight` and `bias`, statistics in float32, output in param dtype."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...] + self.bias[...]).astype(self.weight.dtype)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs, dtype):
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs,
                                         dtype=dtype)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                            rngs=rngs, dtype=dtype)

    def __call__(self, ids):
        pos = self.position_embedding.weight[:ids.shape[1]]
        return self.token_embedding(ids).astype(jnp.float32) + pos.astype(jnp.float32)


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs, dtype):
        self.cfg = cfg
        d = cfg.hidden_size
        self.q_proj = linear(d, d, rngs, dtype)
        self.k_proj = linear(d, d, rngs, dtype)
        self.v_proj = linear(d, d, rngs, dtype)
        self.out_proj = linear(d, d, rngs, dtype)

    def __call__(self, x):
        b, l, d = x.shape
        q, k, v = (p(x).reshape(b, l, self.cfg.num_attention_heads, self.cfg.head_dim)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.reshape(b, l, d))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs, dtype):
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, rngs, dtype)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, rngs, dtype)

    def __call__(self, x):
        h = self.fc1(x)
        return self.fc2(h * jax.nn.sigmoid(1.702 * h))      # quick GELU


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs, dtype):
        self.self_attn = CLIPAttention(cfg, rngs=rngs, dtype=dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(cfg, rngs=rngs, dtype=dtype)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x)).astype(jnp.float32)
        return x + self.mlp(self.layer_norm2(x)).astype(jnp.float32)


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs, dtype):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs=rngs, dtype=dtype)
                                for _ in range(cfg.num_hidden_layers)])


class CLIPTextModel(nnx.Module):
    """CLIP text transformer: token + learned position embeddings, causal pre-norm
    layers, final layer norm, and the pooled end-of-text state.

    Args:
      config: a `CLIPTextConfig` (`CLIP_VIT_L14_TEXT` for FLUX).
      rngs: initialisation randomness (use `load_clip` for weights).
      dtype: parameter and compute dtype: float32, bfloat16 or float16.
    """

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        if not isinstance(config, CLIPTextConfig):
            raise TypeError(f"config must be a CLIPTextConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = check_dtype(dtype, (jnp.float32, jnp.bfloat16, jnp.float16),
                                 "CLIPTextModel dtype")
        self.embeddings = CLIPTextEmbeddings(config, rngs=rngs, dtype=dtype)
        self.encoder = CLIPEncoder(config, rngs=rngs, dtype=dtype)
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps,
                                          dtype=dtype)

    def __call__(self, input_ids: Int[Array, "b l"]
                 ) -> tuple[Float[Array, "b l d"], Float[Array, "b d"]]:
        """(last hidden state `[B, L, D]`, pooled `[B, D]`), both in the model dtype.

        pooled is the final-normed state at the end-of-text token: the first largest id
        when `config.eos_token_id` is the legacy 2, else the first position holding
        `eos_token_id` (position 0 if there is none, as in the reference). Raises
        ValueError / TypeError for ids that are not `[B, L <= max_position_embeddings]`
        integers.
        """
        check_ids(input_ids, "input_ids", self.config.max_position_embeddings)
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            x = layer(x)
        hidden = self.final_layer_norm(x)
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(hidden, eos[:, None, None], axis=1)[:, 0]
        return hidden, pooled


def _is_buffer(name: str) -> bool:
    return name == "embeddings.position_ids"     # a non-parameter buffer in old files


def load_clip(folder: str, *, dtype=jnp.bfloat16) -> CLIPTextModel:
    """A `CLIPTextModel` from a transformers folder: `config.json` and `model.safetensors`
    (or shards with their index), names with or without the `text_model.` prefix.

    Tensors are read lazily (bf16/fp16 included) and cast to `dtype`; a stored
    `position_ids` buffer is ignored. Raises `CheckpointError` naming the file or tensor
    that is missing, unexpected or mis-shaped, or `config.json` when it is not a
    quick-GELU CLIP text config.
    """
    return load_params(folder, CLIPTextConfig.from_hf, CLIPTextModel, dtype=dtype,
                       strip_prefix="text_model.", ignore=_is_buffer)
