"""Wan2.1 in Flax against diffusers' WanTransformer3DModel (float32), and the converter.

Fixtures were made by tests/fixtures/make_wan_fixtures.py with diffusers 0.42.1: a tiny
random checkpoint in the official Wan2.1 layout (every norm weight and bias random), the
same weights saved by diffusers (sharded, with index), and diffusers' outputs on two
latent shapes whose token grids (3x5x7, 5x5x9) leave partial tiles.
"""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from models.checkpoint import CheckpointError, TensorFiles, safetensors_files
from models.wan import load_wan
from models.wan.convert import (convert, diffusers_layout, iter_diffusers_state,
                                main as convert_main, official_name)
from tests.helpers import broken_copy, relative_error

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
OFFICIAL = os.path.join(FIXTURES, "wan_official.safetensors")
DIFFUSERS = os.path.join(FIXTURES, "wan_diffusers")
IO = dict(np.load(os.path.join(FIXTURES, "wan_io.npz")))


def _check(model, tags="ab", tol=1e-4, **kw):
    for tag in tags:
        out = model(IO[f"{tag}_hidden_states"], IO[f"{tag}_timestep"],
                    IO[f"{tag}_encoder_hidden_states"], **kw)
        assert out.shape == IO[f"{tag}_expected"].shape
        assert relative_error(out, IO[f"{tag}_expected"]) <= tol


def _official_folder(tmp_path, text_len=512):
    """The official release layout: config.json with dim / num_heads, and the weights."""
    folder = tmp_path / "official"
    folder.mkdir()
    shutil.copy(OFFICIAL, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(
        {"_class_name": "WanModel", "model_type": "t2v", "dim": 32, "num_heads": 2,
         "num_layers": 2, "ffn_dim": 64, "freq_dim": 32, "in_dim": 16, "out_dim": 16,
         "text_len": text_len, "eps": 1e-6}))
    return str(folder)


@pytest.mark.parametrize("source", ["diffusers", "official_file", "official_folder"])
def test_matches_diffusers_in_float32(source, tmp_path):
    path, kw = {"diffusers": (DIFFUSERS, {}), "official_file": (OFFICIAL, {"num_heads": 2}),
                "official_folder": (None, {})}[source]
    model = load_wan(path or _official_folder(tmp_path), dtype=jnp.float32, attention="dense",
                     **kw)
    assert model.config.num_heads == 2 and model.config.num_layers == 2
    assert model.config.text_len == 512                 # diffusers' configs have none: 512
    _check(model)


def test_pisa_model_at_density_one_matches_diffusers():
    model = load_wan(DIFFUSERS, dtype=jnp.float32, dense_layers=0, density=1.0, block_size=16,
                     tile=(1, 4, 4))
    assert model.token_order((5, 5, 9)) is not None
    _check(model, tags="b")


def test_official_names_are_the_inverse_of_diffusers_mapping():
    diffusers_names = set(json.load(open(os.path.join(
        DIFFUSERS, "diffusion_pytorch_model.safetensors.index.json")))["weight_map"])
    mapped = {official_name(n) for n in diffusers_names}
    assert mapped == set(load_file(OFFICIAL)) and len(mapped) == len(diffusers_names)
    assert official_name("blocks.3.norm2.weight") == "blocks.3.norm3.weight"
    assert official_name("scale_shift_table") == "head.modulation"
    assert official_name("blocks.0.scale_shift_table") == "blocks.0.modulation"


def test_diffusers_layout_inverts_the_conversion():
    tensors = {}
    for f in safetensors_files(DIFFUSERS):
        tensors |= load_file(f)
    model = load_wan(DIFFUSERS, dtype=jnp.float32, attention="dense")
    converted = dict(iter_diffusers_state(tensors, model.config, dtype=jnp.float32))
    plan = diffusers_layout(model.config, tensors)
    assert {name for name, _ in plan.values()} == set(tensors) and set(plan) == set(converted)
    assert plan["patch_embedding.kernel"][1] == (4, 3, 0, 1, 2)
    for path, (name, axes) in plan.items():
        back = np.asarray(converted[path])
        np.testing.assert_array_equal(back if axes is None else back.transpose(axes),
                                      tensors[name], err_msg=path)
    with pytest.raises(CheckpointError, match=r"missing \['blocks.0.ffn.0.bias'\], "
                                              r"unexpected \['extra'\]"):
        diffusers_layout(model.config, (set(tensors) - {"blocks.0.ffn.net.0.proj.bias"})
                         | {"extra"})


def test_converted_checkpoint_loads_to_the_same_model(tmp_path):
    out_dir = str(tmp_path / "converted")
    convert(DIFFUSERS, out_dir, dtype=jnp.float32, progress=lambda *_: None)
    assert sorted(os.listdir(tmp_path)) == ["converted"]        # no temporary left over
    assert len(safetensors_files(out_dir)) >= 1
    model = load_wan(out_dir, dtype=jnp.float32, attention="dense")
    _check(model, tags="a")


def test_bfloat16_model_stays_close_to_float32():
    model = load_wan(DIFFUSERS, attention="dense")
    out = model(IO["a_hidden_states"], IO["a_timestep"], IO["a_encoder_hidden_states"])
    assert model.blocks[0].self_attn.q.kernel.dtype == jnp.bfloat16
    assert model.blocks[0].modulation.dtype == jnp.float32          # kept, as diffusers does
    assert relative_error(out, IO["a_expected"]) <= 1e-2           # measured 4.3e-3


def test_bfloat16_conversion_keeps_precise_tensors_float32_and_text_len(tmp_path):
    out_dir = str(tmp_path / "bf16")
    convert(_official_folder(tmp_path, text_len=64), out_dir, progress=lambda *_: None)
    with TensorFiles(safetensors_files(out_dir)) as files:
        on_disk = {n: files.get(n).dtype for n in files.names()}
    assert on_disk["blocks.1.modulation"] == jnp.float32 == on_disk["head.modulation"]
    assert on_disk["blocks.0.norm3.weight"] == jnp.float32 == on_disk["time_embedding.0.kernel"]
    assert on_disk["blocks.0.self_attn.norm_q.weight"] == jnp.float32
    assert on_disk["blocks.0.self_attn.q.kernel"] == jnp.bfloat16 == on_disk["head.head.kernel"]
    meta = json.loads(open(os.path.join(out_dir, "config.json")).read())
    assert meta["text_len"] == 64 and meta["dtype"] == "bfloat16"
    model = load_wan(out_dir, attention="dense")
    assert model.config.text_len == 64 and model.head.modulation.dtype == jnp.float32
    direct = load_wan(DIFFUSERS, attention="dense")
    args = (IO["a_hidden_states"], IO["a_timestep"], IO["a_encoder_hidden_states"])
    np.testing.assert_array_equal(model(*args), direct(*args))


def test_float16_is_refused_before_reading(tmp_path, capsys):
    with pytest.raises(ValueError, match="dtype must be bfloat16 or float32 .*got float16"):
        load_wan(DIFFUSERS, dtype=jnp.float16)
    assert convert_main([DIFFUSERS, str(tmp_path / "o"), "--dtype", "fp16"]) == 1
    assert "float16" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("edit,pattern", [
    (lambda t: t.pop("blocks.1.cross_attn.norm_k.weight"),
     r"missing: \['blocks.1.cross_attn.norm_k.weight'\]"),
    (lambda t: t.update(extra=np.ones(3, np.float32)), r"unexpected: \['extra'\]"),
    (lambda t: t.update({"blocks.0.ffn.2.weight": np.ones((32, 60), np.float32)}),
     r"blocks.0.ffn.2.weight has shape \(32, 60\); the model expects \(32, 64\)"),
    (lambda t: t.update({"blocks.1.modulation": np.ones((1, 5, 32), np.float32)}),
     r"blocks.1.modulation has shape \(1, 5, 32\); the model expects \(1, 6, 32\)"),
    (lambda t: t.update({"patch_embedding.weight": np.ones((32, 16, 1, 2, 3), np.float32)}),
     r"head.head.bias has shape \(64,\); the model expects \(60,\)"),   # patch from the file
])
def test_converter_refuses_bad_checkpoints_and_leaves_nothing(tmp_path, edit, pattern):
    bad = broken_copy(OFFICIAL, tmp_path, edit)
    with pytest.raises(CheckpointError, match=pattern):
        convert(bad, str(tmp_path / "out"), num_heads=2, progress=lambda *_: None)
    assert sorted(os.listdir(tmp_path)) == ["broken.safetensors"]


def test_converter_refuses_image_to_video_and_foreign_folders(tmp_path, capsys):
    i2v = tmp_path / "i2v"
    shutil.copytree(DIFFUSERS, i2v)
    cfg = json.loads((i2v / "config.json").read_text()) | {"image_dim": 1280}
    (i2v / "config.json").write_text(json.dumps(cfg))
    assert convert_main([str(i2v), str(tmp_path / "o1")]) == 1
    assert "image-to-video" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    assert convert_main([str(tmp_path / "other"), str(tmp_path / "o2")]) == 1
    assert "neither a diffusers" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert convert_main([OFFICIAL, str(tmp_path / "exists"), "--num-heads", "2"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["exists", "i2v", "other"]


def test_configs_that_do_not_check_out_are_named_by_file(tmp_path, capsys):
    assert convert_main([OFFICIAL, str(tmp_path / "o1"), "--num-heads", "3"]) == 1
    assert (f"{OFFICIAL}: not a valid Wan2.1 configuration (dim (32) must be a multiple of "
            f"num_heads (3))") in capsys.readouterr().err
    converted = tmp_path / "converted"
    convert(DIFFUSERS, str(converted), dtype=jnp.float32, progress=lambda *_: None)
    meta = json.loads((converted / "config.json").read_text())
    (converted / "config.json").write_text(json.dumps(meta | {"dims": 32}))
    with pytest.raises(CheckpointError, match=r"config.json: not a valid Wan2.1 configuration "
                                              r"\(.*unexpected keyword argument 'dims'\)"):
        load_wan(str(converted), dtype=jnp.float32, attention="dense")
    (converted / "config.json").write_text(json.dumps(meta))
    for shard in safetensors_files(str(converted)):
        os.remove(shard)
    with pytest.raises(CheckpointError, match="converted: no .safetensors files"):
        load_wan(str(converted), dtype=jnp.float32, attention="dense")
    assert sorted(os.listdir(tmp_path)) == ["converted"]


def test_converter_cli_writes_a_loadable_folder(tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(DIFFUSERS, pipe / "transformer")
    out = tmp_path / "wan"
    assert convert_main([str(pipe), str(out), "--dtype", "fp32"]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "pisa-jax-wan" and meta["dtype"] == "float32"
    _check(load_wan(str(out), dtype=jnp.float32, attention="dense"), tags="b")
