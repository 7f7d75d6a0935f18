"""Wan2.1 transformer weights: official or diffusers checkpoints -> this project's Flax layout.

    python -m models.wan.convert SRC OUT [--num-heads N] [--dtype bf16]

SRC is one of
  * an official Wan2.1 checkpoint: a folder with the official `config.json` (`dim`,
    `num_heads`, ...) and its safetensors files (sharded with an index JSON or single),
    or one `.safetensors` file in that layout (`blocks.0.self_attn.q.weight`,
    `head.modulation`, ...; a `model.diffusion_model.` prefix is removed). A single file
    carries no head count: it is `--num-heads`, else dim / 128 (both released models);
  * a diffusers transformer folder (`config.json` of `WanTransformer3DModel` and its
    safetensors shards with their index JSON), or a pipeline folder with `transformer/`.
OUT gets the Flax parameter paths as tensor names (`blocks.0.self_attn.q.kernel`, kernels
`[in, out]`) in `model-XXXXX.safetensors` shards, and a `config.json`.

This file holds Wan's names and configs; the checks, streaming and atomic writing are
`models.conversion.plan_stream` and `write_converted`, shared with FLUX.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.checkpoint import (DTYPES, CheckpointError, TensorDict, TensorFiles, fill_model,
                               flat_params, read_json, safetensors_files)
from models.conversion import (Recipe, add_conversion_arguments, checked_config,
                               locate_checkpoint,
                               plan_stream, run_conversion, same_layout, torch_layout,
                               write_converted)
from models.wan.config import WanConfig
from models.wan.model import Wan, check_dtype, default_policies

PREFIX = "model.diffusion_model."
FORMAT = "pisa-jax-wan"
HEAD_DIM = 128      # both released Wan2.1 models; a single file does not record it

# diffusers name pieces -> official ones (the inverse of diffusers' single-file mapping;
# diffusers' affine cross-attention norm is `norm2`, the official code's `norm3`).
_RENAMES = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"\.attn1\.", ".self_attn."), (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".o."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."), (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^scale_shift_table$", "head.modulation"), (r"^proj_out\.", "head.head."),
]


def official_name(diffusers_name: str) -> str:
    """The official Wan2.1 name of a diffusers `WanTransformer3DModel` tensor."""
    name = diffusers_name
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def _source_kind(src: str) -> tuple[str, str]:
    """('official' | 'diffusers' | 'converted', path of the file or folder)."""
    where, path, meta = locate_checkpoint(
        src, "a single file, a diffusers transformer folder (config.json + safetensors), a "
             "pipeline folder (transformer/), an official Wan2.1 folder nor a converted "
             "checkpoint")
    if where != "folder":
        return ("official" if where == "file" else "diffusers"), path
    if meta.get("format") == FORMAT:
        return "converted", path
    if "num_attention_heads" in meta:
        return "diffusers", path
    if "dim" in meta and "num_heads" in meta:
        return "official", path
    raise CheckpointError(f"{os.path.join(path, 'config.json')}: neither a diffusers "
                          "WanTransformer3DModel config (num_attention_heads) nor an official "
                          "Wan2.1 one (dim, num_heads)")


# ------------------------------------------------------------------ hyperparameters

def _config(source: str, make) -> WanConfig:
    return checked_config(source, make, "Wan2.1")


def config_from_diffusers(folder: str) -> WanConfig:
    c = read_json(os.path.join(folder, "config.json"))
    if c.get("image_dim") is not None or c.get("added_kv_proj_dim") is not None:
        raise CheckpointError(f"{folder}: image-to-video checkpoints (image_dim "
                              f"{c.get('image_dim')}) are not supported yet; text-to-video only")
    if c.get("qk_norm", "rms_norm_across_heads") not in ("rms_norm_across_heads", None):
        raise CheckpointError(f"{folder}: qk_norm {c['qk_norm']!r} is not supported; expected "
                              "'rms_norm_across_heads' or null")
    heads, hd = c.get("num_attention_heads", 40), c.get("attention_head_dim", 128)
    return WanConfig(
        dim=heads * hd, num_heads=heads, num_layers=c.get("num_layers", 40),
        ffn_dim=c.get("ffn_dim", 13824), in_channels=c.get("in_channels", 16),
        out_channels=c.get("out_channels") or c.get("in_channels", 16),
        text_dim=c.get("text_dim", 4096), freq_dim=c.get("freq_dim", 256),
        patch_size=tuple(c.get("patch_size", (1, 2, 2))), eps=c.get("eps", 1e-6),
        qk_norm=c.get("qk_norm", "rms_norm_across_heads") is not None,
        cross_attn_norm=bool(c.get("cross_attn_norm", True)))


def config_from_official(files, meta: dict | None, num_heads: int | None) -> WanConfig:
    names = files.names()
    need = ["patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
            "blocks.0.ffn.0.weight", "head.head.weight"]
    missing = [n for n in need if n not in names]
    if missing:
        raise CheckpointError(f"not an official Wan2.1 checkpoint: missing {missing}")
    if meta and meta.get("model_type", "t2v") != "t2v":
        raise CheckpointError(f"model_type {meta['model_type']!r} is not supported yet; "
                              "text-to-video ('t2v') only")
    dim, in_ch, *patch = files.shape("patch_embedding.weight")
    heads = num_heads or (meta or {}).get("num_heads") or max(1, dim // HEAD_DIM)
    return WanConfig(
        dim=dim, num_heads=heads,
        num_layers=len({n.split(".")[1] for n in names if n.startswith("blocks.")}),
        ffn_dim=files.shape("blocks.0.ffn.0.weight")[0], in_channels=in_ch,
        out_channels=files.shape("head.head.weight")[0] // (patch[0] * patch[1] * patch[2]),
        text_dim=files.shape("text_embedding.0.weight")[1],
        freq_dim=files.shape("time_embedding.0.weight")[1], patch_size=tuple(patch),
        eps=(meta or {}).get("eps", 1e-6), text_len=(meta or {}).get("text_len", 512),
        qk_norm="blocks.0.self_attn.norm_q.weight" in names,
        cross_attn_norm="blocks.0.norm3.weight" in names)


# -------------------------------------------------------------------- name mapping

def _plan(files, recipe, cfg: WanConfig, dtype, source_name=torch_layout):
    """`plan_stream` for the Wan model of `cfg` (checks names and shapes up front)."""
    try:
        abstract = nnx.eval_shape(lambda: Wan(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                              policies=default_policies(cfg, "dense")))
    except BaseException:
        files.close()
        raise
    # Each tensor in its parameter's dtype: the modulation, norms and time embedding stay
    # float32 in a bfloat16 model.
    return plan_stream(files, flat_params(abstract), recipe, dtype=None, model="Wan",
                       source_name=source_name)


def _recipe(files, rename=lambda n: n) -> Recipe:
    """Official (or Flax) name -> ([source name], as is) for every tensor of `files`."""
    return {rename(n): ([n], lambda x: x) for n in files.names()}


def iter_converted(src: str, *, dtype=jnp.bfloat16, num_heads: int | None = None
                   ) -> tuple[WanConfig, Iterator[tuple[str, jax.Array]]]:
    """The config and a stream of (Flax path, array) for any supported SRC."""
    check_dtype(dtype)
    kind, path = _source_kind(src)
    if kind == "converted":
        cfg_path = os.path.join(path, "config.json")
        meta = read_json(cfg_path)
        cfg = _config(cfg_path, lambda: WanConfig(
            **{k: v for k, v in meta.items() if k not in ("format", "dtype")}))
        files = TensorFiles(safetensors_files(path))
        return cfg, _plan(files, _recipe(files), cfg, dtype, same_layout)
    if kind == "official":
        single = os.path.isfile(path)
        files = TensorFiles([path] if single else safetensors_files(path), strip_prefix=PREFIX)
        meta = None if single else read_json(os.path.join(path, "config.json"))
        try:
            cfg = _config(path, lambda: config_from_official(files, meta, num_heads))
        except BaseException:
            files.close()
            raise
        return cfg, _plan(files, _recipe(files), cfg, dtype)
    cfg = _config(os.path.join(path, "config.json"), lambda: config_from_diffusers(path))
    files = TensorFiles(safetensors_files(path))
    return cfg, _plan(files, _recipe(files, official_name), cfg, dtype)


def iter_diffusers_state(tensors: dict, cfg: WanConfig, *, dtype=jnp.bfloat16,
                         to_array=jnp.asarray):
    """(Flax path, array) stream from an in-memory diffusers state dict."""
    files = TensorDict(tensors, to_array)
    return _plan(files, _recipe(files, official_name), cfg, dtype)


def diffusers_layout(cfg: WanConfig, diffusers_names) -> dict[str, tuple[str, tuple | None]]:
    """Flax path -> (diffusers name, axes) to put each Flax parameter in diffusers' layout:
    `diffusers_tensor = flax_array.transpose(axes)` (axes None: as is). The inverse of the
    diffusers conversion, e.g. to copy this model's weights into `WanTransformer3DModel`.

    Raises CheckpointError unless `diffusers_names` are exactly the model's parameters.
    """
    abstract = nnx.eval_shape(lambda: Wan(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32,
                                          policies=default_policies(cfg, "dense")))
    by_official = {official_name(n): n for n in diffusers_names}
    plan, missing = {}, []
    for flax_path, value in flat_params(abstract).items():
        name, axes = torch_layout(flax_path, len(value.shape))
        if name not in by_official:
            missing.append(name)
            continue
        inverse = None if axes is None else tuple(int(i) for i in np.argsort(axes))
        plan[flax_path] = (by_official.pop(name), inverse)
    if missing or by_official:
        raise CheckpointError(f"diffusers names do not match the Wan model: missing "
                              f"{sorted(missing)[:20]}, unexpected {sorted(by_official.values())[:20]}")
    return plan


# ------------------------------------------------------------------------- writing

def convert(src: str, out: str, *, dtype=jnp.bfloat16, num_heads: int | None = None,
            progress=print) -> str:
    """Converts SRC into the folder OUT (must not exist); returns OUT.

    `dtype` is that of the projections; the parameters `Wan` keeps in float32 are written
    in float32. Raises `CheckpointError` naming the file for an unreadable or mismatched
    source, or an output that exists or cannot be written (checked before any work), and
    ValueError for a `dtype` the model does not run in (`check_dtype`: float16).
    """
    check_dtype(dtype)
    return write_converted(out, lambda: iter_converted(src, dtype=dtype, num_heads=num_heads),
                           format=FORMAT, dtype=dtype, progress=progress)


def load_wan(path: str, *, dtype=jnp.bfloat16, attention: str = "pisa", policies=None,
             tile=None, num_heads: int | None = None, **policy_options) -> Wan:
    """A `Wan` model from a converted checkpoint or an official / diffusers one.

    Args:
      path: converted folder, official Wan2.1 folder or single file, diffusers
        transformer or pipeline folder.
      dtype: dtype of the projections (bfloat16, the default, or float32; float16 is
        refused); modulation, norms and the time embedding stay float32.
      attention: "pisa" (the published per-layer setting) or "dense".
      policies: explicit per-layer `AttentionPolicy` tuple (overrides `attention`).
      tile: (frames, height, width) of one block's tile (default: the measured best).
      num_heads: head count of an official single file (default dim / 128).
      policy_options: passed to `pisa_jax.layer_policies` (density, dense_layers, ...).
    Raises `CheckpointError` for a checkpoint that does not match the model, ValueError
    for a float16 `dtype` (activations can pass its range).
    """
    cfg, tensors = iter_converted(path, dtype=dtype, num_heads=num_heads)
    policies = policies or default_policies(cfg, attention, **policy_options)
    return model_from_tensors(cfg, tensors, dtype=dtype, policies=policies, tile=tile)


def model_from_tensors(cfg: WanConfig, tensors, *, dtype, policies, tile=None) -> Wan:
    """A `Wan` whose parameters are filled from a (Flax path, array) stream."""
    abstract = nnx.eval_shape(lambda: Wan(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                          policies=policies, tile=tile))
    return fill_model(abstract, tensors)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.wan.convert",
                                description="Convert Wan2.1 transformer weights to pisa-jax's "
                                            "Flax layout.")
    add_conversion_arguments(p, "official Wan2.1 folder or file, diffusers transformer or "
                                "pipeline folder")
    p.add_argument("--num-heads", type=int, default=None,
                   help="head count of an official single file (default: dim / 128)")
    args = p.parse_args(argv)
    if args.num_heads is not None and args.num_heads < 1:
        p.error(f"--num-heads must be positive; got {args.num_heads}")
    return run_conversion(lambda: convert(args.src, args.out, dtype=DTYPES[args.dtype],
                                          num_heads=args.num_heads), args.out)


if __name__ == "__main__":
    sys.exit(main())
