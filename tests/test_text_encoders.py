"""T5, umT5 and CLIP text encoders against transformers' outputs (fixtures made by
tests/fixtures/make_text_encoder_fixtures.py), checkpoint loading and its errors."""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.flax import save_file

from models.checkpoint import CheckpointError, TensorFiles, safetensors_files
from models.text_encoders import (CLIP_VIT_L14_TEXT, CLIPTextConfig, CLIPTextModel,
                                  T5_V1_1_XXL, UMT5_XXL, T5Config, T5Encoder, load_clip,
                                  load_t5)
from models.text_encoders.t5 import relative_position_bucket
from tests.helpers import relative_error

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "text_encoders")
T5_DIR, CLIP_DIR = os.path.join(HERE, "t5"), os.path.join(HERE, "clip")
UMT5_DIR = os.path.join(HERE, "umt5")
BIAS = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
FP32_TOL = 1e-4
# Measured bf16-vs-float32 errors on these fixtures: T5 1.42e-2, umT5 2.23e-2, CLIP
# hidden 3.8e-3, pooled 3.5e-3 (transformers' own bf16: 1.48e-2, 2.36e-2, 4.5e-3,
# 4.3e-3). Tolerances ~1.4x.
BF16_TOL = {"t5": 2e-2, "umt5": 3e-2, "clip": 5.5e-3}


@pytest.fixture(scope="module")
def io():
    return dict(np.load(os.path.join(HERE, "io.npz")))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, *args):
    return nnx.merge(graphdef, state)(*args)


def jitted(model):
    """The model's call compiled over its split state (what a pipeline does); models of
    one structure share the compiled function."""
    graphdef, state = nnx.split(model)
    return functools.partial(_apply, graphdef, state)


@pytest.fixture(scope="module")
def t5():
    return load_t5(T5_DIR, dtype=jnp.float32)


@pytest.fixture(scope="module")
def umt5():
    return load_t5(UMT5_DIR, dtype=jnp.float32)


@pytest.fixture(scope="module")
def clip():
    return load_clip(CLIP_DIR, dtype=jnp.float32)


def _copy(src, dst, config=None, edit=None, drop=None):
    """A copy of a checkpoint folder; `edit(tensors: dict) -> dict` rewrites each file."""
    shutil.copytree(src, dst)
    if config or drop:
        path = os.path.join(dst, "config.json")
        with open(path) as f:
            cfg = json.load(f) | (config or {})
        cfg.pop(drop, None)
        with open(path, "w") as f:
            json.dump(cfg, f)
    if edit:
        for path in safetensors_files(str(dst)):
            with TensorFiles([path]) as files:
                tensors = {n: files.get(n) for n in files.names()}
            save_file(edit(tensors), path, metadata={"format": "pt"})
    return str(dst)


# ------------------------------------------------------------------------------ T5

def test_t5_matches_transformers_float32(t5, io):
    out = jitted(t5)(jnp.asarray(io["t5_ids"]))
    assert out.shape == io["t5_hidden"].shape and out.dtype == jnp.float32
    assert relative_error(out, io["t5_hidden"]) <= FP32_TOL


def test_t5_attention_mask_hides_padding_like_transformers(t5, io):
    out = jitted(t5)(jnp.asarray(io["t5_ids"]), jnp.asarray(io["t5_mask"]))
    assert relative_error(out, io["t5_hidden_masked"]) <= FP32_TOL
    assert relative_error(out, io["t5_hidden"]) > 1e-2     # the mask changes something


def test_t5_relative_position_buckets_match_transformers(io):
    got = relative_position_bucket(io["t5_rel"], 32, 128)
    np.testing.assert_array_equal(got, io["t5_bucket"])


def test_t5_loads_a_folder_sharded_with_an_index(t5):
    # As FLUX's text_encoder_2: two shards named by model.safetensors.index.json. Every
    # parameter must come from one of them (load refuses missing ones), so both are read.
    files = safetensors_files(T5_DIR)
    assert os.path.exists(os.path.join(T5_DIR, "model.safetensors.index.json"))
    assert [os.path.basename(f) for f in files] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    with TensorFiles(files[1:]) as second:
        assert "encoder.final_layer_norm.weight" in second.names()
        want = np.asarray(second.get("encoder.final_layer_norm.weight"))
    np.testing.assert_array_equal(t5.encoder.final_layer_norm.weight[...], want)


@pytest.mark.parametrize("src", [T5_DIR, UMT5_DIR])
def test_t5_reads_a_tied_embedding_copy_or_either_name(tmp_path, src, io):
    ids = jnp.asarray(io["t5_ids"][:, :24])
    ref = jitted(load_t5(src, dtype=jnp.float32))(ids)

    def add_copy(t):
        return t | ({"encoder.embed_tokens.weight": t["shared.weight"]}
                    if "shared.weight" in t else {})

    def rename(t):
        return {("encoder.embed_tokens.weight" if n == "shared.weight" else n): x
                for n, x in t.items()}

    for edit in (add_copy, rename):
        model = load_t5(_copy(src, tmp_path / edit.__name__, edit=edit),
                        dtype=jnp.float32)
        np.testing.assert_array_equal(jitted(model)(ids), ref)


# ---------------------------------------------------------------------------- umT5

def test_umt5_matches_transformers_float32(umt5, io):
    # 160 tokens: offsets past max_distance 128 share the last buckets.
    ids = jnp.asarray(io["umt5_ids"])
    out = jitted(umt5)(ids)
    assert out.shape == io["umt5_hidden"].shape and out.dtype == jnp.float32
    assert relative_error(out, io["umt5_hidden"]) <= FP32_TOL
    masked = jitted(umt5)(ids, jnp.asarray(io["umt5_mask"]))
    assert relative_error(masked, io["umt5_hidden_masked"]) <= FP32_TOL
    assert relative_error(masked, io["umt5_hidden"]) > 1e-2  # the mask changes something


def test_umt5_uses_each_layers_own_bias_table(io):
    # With the first layer's table in every layer (T5 v1.1's rule) the output moves far
    # from transformers': each layer must read its own table.
    ids = jnp.asarray(io["umt5_ids"])
    shared = load_t5(UMT5_DIR, dtype=jnp.float32)     # a fresh copy: edited below
    first = shared.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    for block in shared.encoder.block[1:]:
        block.layer[0].SelfAttention.relative_attention_bias.weight[...] = first[...]
    assert relative_error(jitted(shared)(ids), io["umt5_hidden"]) > 1e-2


def test_umt5_loads_a_transformers_folder_with_a_table_per_layer(umt5):
    assert umt5.config.per_layer_position_bias and umt5.config.num_layers == 3
    with TensorFiles(safetensors_files(UMT5_DIR)) as files:
        for i, block in enumerate(umt5.encoder.block):
            np.testing.assert_array_equal(
                block.layer[0].SelfAttention.relative_attention_bias.weight[...],
                np.asarray(files.get(BIAS.format(i))))


def test_t5_v1_1_keeps_one_table_in_the_first_layer(t5):
    assert not t5.config.per_layer_position_bias
    attn = [b.layer[0].SelfAttention for b in t5.encoder.block]
    assert hasattr(attn[0], "relative_attention_bias")
    assert not any(hasattr(a, "relative_attention_bias") for a in attn[1:])


@pytest.mark.parametrize("src,model_type,words", [
    (T5_DIR, "umt5", ["missing", BIAS.format(1)]),         # T5 v1.1 weights, umT5 config
    (UMT5_DIR, "t5", ["unexpected", BIAS.format(1)]),      # umT5 weights, T5 v1.1 config
])
def test_bias_tables_must_match_the_config(tmp_path, src, model_type, words):
    folder = _copy(src, tmp_path / "bad", config={"model_type": model_type})
    with pytest.raises(CheckpointError) as e:
        load_t5(folder, dtype=jnp.float32)
    assert all(w in str(e.value) for w in words + [folder]), str(e.value)


# ---------------------------------------------------------------------------- CLIP

def test_clip_matches_transformers_float32_legacy_eos(clip, io):
    assert clip.config.eos_token_id == 2          # FLUX's config: end of text = largest id
    hidden, pooled = jitted(clip)(jnp.asarray(io["clip_ids"]))
    assert hidden.shape == (2, 77, 32) and pooled.shape == (2, 32)
    assert relative_error(hidden, io["clip_hidden"]) <= FP32_TOL
    assert relative_error(pooled, io["clip_pooled"]) <= FP32_TOL


def test_clip_pooled_at_first_eos_token_id(tmp_path, io):
    eos = int(io["clip_eos_token_id"])
    model = load_clip(_copy(CLIP_DIR, tmp_path / "clip", config={"eos_token_id": eos}),
                      dtype=jnp.float32)
    assert model.config.eos_token_id == eos
    hidden, pooled = jitted(model)(jnp.asarray(io["clip_eos_ids"]))
    assert relative_error(hidden, io["clip_eos_hidden"]) <= FP32_TOL
    assert relative_error(pooled, io["clip_eos_pooled"]) <= FP32_TOL


def test_clip_ignores_a_stored_position_ids_buffer(tmp_path, clip, io):
    def add(t):
        return t | {"text_model.embeddings.position_ids": jnp.arange(77)[None]}

    model = load_clip(_copy(CLIP_DIR, tmp_path / "clip", edit=add), dtype=jnp.float32)
    ids = jnp.asarray(io["clip_ids"])
    np.testing.assert_array_equal(jitted(model)(ids)[1], jitted(clip)(ids)[1])


# ------------------------------------------------------------------------ bfloat16

def test_bf16_loading_stays_close(io):
    t5 = load_t5(T5_DIR)                              # default dtype: bfloat16
    out = jitted(t5)(jnp.asarray(io["t5_ids"]))
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, io["t5_hidden"]) <= BF16_TOL["t5"]
    out = jitted(load_t5(UMT5_DIR))(jnp.asarray(io["umt5_ids"]))
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, io["umt5_hidden"]) <= BF16_TOL["umt5"]
    clip = load_clip(CLIP_DIR)
    hidden, pooled = jitted(clip)(jnp.asarray(io["clip_ids"]))
    assert hidden.dtype == pooled.dtype == jnp.bfloat16
    assert relative_error(hidden, io["clip_hidden"]) <= BF16_TOL["clip"]
    assert relative_error(pooled, io["clip_pooled"]) <= BF16_TOL["clip"]


def test_bf16_files_are_read_without_torch(tmp_path, io):
    folder = _copy(T5_DIR, tmp_path / "t5",
                   edit=lambda t: {n: x.astype(jnp.bfloat16) for n, x in t.items()})
    with TensorFiles(safetensors_files(folder)) as files:
        assert {files.get(n).dtype for n in files.names()} == {jnp.dtype(jnp.bfloat16)}
    ids = jnp.asarray(io["t5_ids"])
    got = jitted(load_t5(folder, dtype=jnp.bfloat16))(ids)
    want = jitted(load_t5(T5_DIR, dtype=jnp.bfloat16))(ids)   # same bf16 weights
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


# -------------------------------------------------------------------------- errors

@pytest.mark.parametrize("src,edit,words", [
    (T5_DIR, lambda t: {n: x for n, x in t.items()
                        if n != "encoder.block.1.layer.1.DenseReluDense.wo.weight"},
     ["missing", "encoder.block.1.layer.1.DenseReluDense.wo.weight"]),
    (T5_DIR, lambda t: {n: (x[:, :-1] if n == "encoder.block.0.layer.0.SelfAttention.q.weight"
                            else x) for n, x in t.items()},
     ["encoder.block.0.layer.0.SelfAttention.q.weight", "(64, 31)", "(64, 32)"]),
    (T5_DIR, lambda t: t | ({"encoder.block.7.layer.0.layer_norm.weight": jnp.ones(32)}
                        if "shared.weight" in t else {}),
     ["unexpected", "encoder.block.7.layer.0.layer_norm.weight"]),
    (CLIP_DIR, lambda t: {n: x for n, x in t.items()
                          if n != "text_model.final_layer_norm.bias"},
     ["missing", "final_layer_norm.bias"]),
    (CLIP_DIR, lambda t: {n: (x[:10] if n.endswith("position_embedding.weight") else x)
                          for n, x in t.items()},
     ["embeddings.position_embedding.weight", "(10, 32)", "(77, 32)"]),
])
def test_bad_checkpoint_raises_checkpoint_error_naming_the_tensor(tmp_path, src, edit,
                                                                  words):
    folder = _copy(src, tmp_path / "bad", edit=edit)
    load = load_t5 if src == T5_DIR else load_clip
    with pytest.raises(CheckpointError) as e:
        load(folder, dtype=jnp.float32)
    assert all(w in str(e.value) for w in words + [folder]), str(e.value)


def test_configs_check_themselves(tmp_path):
    with pytest.raises(ValueError, match="gated-gelu"):
        T5Config.from_hf({"feed_forward_proj": "relu", "d_model": 8})
    with pytest.raises(ValueError, match="quick_gelu"):
        CLIPTextConfig.from_hf({"hidden_act": "gelu"})
    with pytest.raises(ValueError, match="num_heads"):
        T5Config(num_heads=0)
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        CLIPTextConfig(hidden_size=100)
    with pytest.raises(CheckpointError, match="config.json.*gated-gelu"):
        load_t5(CLIP_DIR)
    with pytest.raises(CheckpointError, match="config.json.*eos_token_id"):
        load_clip(_copy(CLIP_DIR, tmp_path / "clip", drop="eos_token_id"))
    with pytest.raises(ValueError, match="model_type"):
        T5Config.from_hf({"model_type": "bart", "feed_forward_proj": "gated-gelu"})
    with pytest.raises(TypeError, match="per_layer_position_bias"):
        T5Config(per_layer_position_bias=1)
    # UMT5Config's default feed-forward is gated GELU; T5Config's is ReLU.
    small = {"vocab_size": 8, "d_model": 8, "d_kv": 4, "d_ff": 8, "num_layers": 1,
             "num_heads": 2, "relative_attention_num_buckets": 8}
    assert T5Config.from_hf(small | {"model_type": "umt5"}).per_layer_position_bias
    with pytest.raises(ValueError, match="gated-gelu"):
        T5Config.from_hf(small | {"model_type": "t5"})
    with pytest.raises(ValueError, match="float16"):
        T5Encoder(T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=8, num_layers=1,
                           num_heads=2), rngs=nnx.Rngs(0), dtype=jnp.float16)


def test_bad_input_ids_are_refused(clip, t5):
    with pytest.raises(ValueError, match="77 positions"):
        clip(jnp.zeros((1, 78), jnp.int32))
    with pytest.raises(TypeError, match="integer"):
        t5(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        t5(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask"):
        t5(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5), jnp.int32))


def test_nnx_jit_matches_eager(t5, io):
    ids = jnp.asarray(io["t5_ids"][:, :12])
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(t5, ids), t5(ids),
                               rtol=1e-5, atol=1e-5)


def test_full_size_configs_have_the_published_parameter_counts():
    assert T5_V1_1_XXL == T5Config.from_hf({
        "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
        "num_heads": 64, "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new"})
    assert UMT5_XXL == T5Config.from_hf({
        "model_type": "umt5", "vocab_size": 256384, "d_model": 4096, "d_kv": 64,
        "d_ff": 10240, "num_layers": 24, "num_heads": 64,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new"})
    assert CLIP_VIT_L14_TEXT == CLIPTextConfig.from_hf({
        "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
        "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 2})
    # umT5-XXL: T5 v1.1-XXL's layers with 23 more [32, 64] tables and a 256384-token
    # embedding: 4_762_310_656 + 23 * 2048 + (256384 - 32128) * 4096.
    for cls, cfg, count in ((T5Encoder, T5_V1_1_XXL, 4_762_310_656),
                            (T5Encoder, UMT5_XXL, 5_680_910_336),
                            (CLIPTextModel, CLIP_VIT_L14_TEXT, 123_060_480)):
        abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
        params = jax.tree.leaves(nnx.state(abstract, nnx.Param))
        assert sum(int(np.prod(p.shape)) for p in params) == count
        assert {p.dtype for p in params} == {jnp.dtype(jnp.bfloat16)}
