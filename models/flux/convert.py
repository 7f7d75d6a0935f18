"""FLUX.1 weights: official checkpoints -> this project's Flax layout, and loading.

    python -m models.flux.convert SRC OUT [--axes-dim 16,56,56] [--dtype bf16]

SRC is one of
  * a Black Forest Labs single file (`flux1-dev.safetensors` layout, with or without the
    `model.diffusion_model.` prefix);
  * a diffusers transformer folder (`config.json` and one or several safetensors shards
    with their index JSON);
  * a diffusers pipeline folder (with `transformer/` inside).
OUT becomes a folder with `config.json` and `model-XXXXX.safetensors` shards whose names
are the Flax parameter paths (`double_blocks.0.img_attn.qkv.kernel`, kernels `[in, out]`).

Conversion streams tensor by tensor, refuses missing, unexpected or mis-shaped tensors by
name before reading any, and leaves nothing behind on failure (`models.conversion`'s
`plan_stream` and `write_converted`, shared by every model).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from models.checkpoint import (DTYPES, CheckpointError, TensorDict, TensorFiles, fill_model,
                               flat_params, read_json, safetensors_files)
from models.conversion import (add_conversion_arguments, checked_config, locate_checkpoint,
                               plan_stream, run_conversion, same_layout, torch_layout,
                               write_converted)
from models.flux.config import FluxConfig
from models.flux.model import Flux, check_dtype, default_policies
from pisa_jax.cli import comma_list

BFL_PREFIX = "model.diffusion_model."
FORMAT = "pisa-jax-flux"


def _source_kind(src: str) -> tuple[str, str]:
    """('bfl' | 'diffusers' | 'converted', path of the file or folder)."""
    where, path, meta = locate_checkpoint(
        src, "a single file, a diffusers transformer folder (config.json + safetensors), a "
             "pipeline folder (transformer/) nor a converted checkpoint")
    if where == "folder":
        return ("converted" if meta.get("format") == FORMAT else "diffusers"), path
    return ("bfl" if where == "file" else "diffusers"), path


# ------------------------------------------------------------------ hyperparameters

def _config(source: str, make) -> FluxConfig:
    return checked_config(source, make, "FLUX")


def config_from_diffusers(folder: str, axes_dim=None) -> FluxConfig:
    path = os.path.join(folder, "config.json")
    c = read_json(path)
    if c.get("patch_size", 1) != 1:
        raise CheckpointError(f"{path}: only patch_size 1 (packed latents) is supported; got "
                              f"{c['patch_size']}")
    return _config(path, lambda: _diffusers_config(c, axes_dim))


def _diffusers_config(c: dict, axes_dim) -> FluxConfig:
    heads, hd = c.get("num_attention_heads", 24), c.get("attention_head_dim", 128)
    return FluxConfig(
        in_channels=c.get("in_channels", 64),
        out_channels=c.get("out_channels") or c.get("in_channels", 64),
        vec_in_dim=c.get("pooled_projection_dim", 768),
        context_in_dim=c.get("joint_attention_dim", 4096),
        hidden_size=heads * hd, num_heads=heads,
        depth=c.get("num_layers", 19), depth_single_blocks=c.get("num_single_layers", 38),
        axes_dim=tuple(axes_dim or c.get("axes_dims_rope", (16, 56, 56))),
        guidance_embed=bool(c.get("guidance_embeds", False)))


def config_from_bfl(files: TensorFiles, axes_dim=None, source: str = "checkpoint") -> FluxConfig:
    names = files.names()
    need = ["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight",
            "double_blocks.0.img_attn.norm.query_norm.scale", "double_blocks.0.img_mlp.0.weight",
            "final_layer.linear.weight"]
    missing = [n for n in need if n not in names]
    if missing:
        raise CheckpointError(f"{source}: not a FLUX single-file checkpoint: missing {missing}")
    hidden, in_ch = files.shape("img_in.weight")
    head_dim = files.shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    count = lambda p: len({n.split(".")[1] for n in names if n.startswith(p)})
    return _config(source, lambda: FluxConfig(
        in_channels=in_ch, out_channels=files.shape("final_layer.linear.weight")[0],
        vec_in_dim=files.shape("vector_in.in_layer.weight")[1],
        context_in_dim=files.shape("txt_in.weight")[1], hidden_size=hidden,
        mlp_ratio=files.shape("double_blocks.0.img_mlp.0.weight")[0] / hidden,
        num_heads=hidden // head_dim, depth=count("double_blocks."),
        depth_single_blocks=count("single_blocks."),
        axes_dim=tuple(axes_dim or (16, 56, 56)),
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in names,
        guidance_embed="guidance_in.in_layer.weight" in names))


# -------------------------------------------------------------------- name mapping

def _diffusers_recipe(cfg: FluxConfig) -> dict[str, tuple[list[str], Callable]]:
    """BFL name -> (diffusers names, how to combine them), PyTorch `[out, in]` layout."""
    cat = lambda *xs: jnp.concatenate(xs, axis=0)
    one = lambda x: x
    swap = lambda x: jnp.concatenate(jnp.split(x, 2, axis=0)[::-1], axis=0)
    r: dict[str, tuple[list[str], Callable]] = {}

    def linear(bfl, dif, fn=one, parts=None):
        for s in ("weight", "bias"):
            r[f"{bfl}.{s}"] = ([f"{d}.{s}" for d in (parts or [dif])], fn)

    linear("img_in", "x_embedder")
    linear("txt_in", "context_embedder")
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if cfg.guidance_embed:
        embedders.append(("guidance_in", "guidance_embedder"))
    for bfl, dif in embedders:
        linear(f"{bfl}.in_layer", f"time_text_embed.{dif}.linear_1")
        linear(f"{bfl}.out_layer", f"time_text_embed.{dif}.linear_2")
    for i in range(cfg.depth):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        linear(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        linear(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        linear(f"{b}.img_attn.qkv", None, cat, [f"{d}.attn.to_{x}" for x in "qkv"])
        linear(f"{b}.txt_attn.qkv", None, cat, [f"{d}.attn.add_{x}_proj" for x in "qkv"])
        linear(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        linear(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
        linear(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        linear(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        linear(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        linear(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
        for stream, (qn, kn) in (("img", ("norm_q", "norm_k")),
                                 ("txt", ("norm_added_q", "norm_added_k"))):
            r[f"{b}.{stream}_attn.norm.query_norm.scale"] = ([f"{d}.attn.{qn}.weight"], one)
            r[f"{b}.{stream}_attn.norm.key_norm.scale"] = ([f"{d}.attn.{kn}.weight"], one)
    for i in range(cfg.depth_single_blocks):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        linear(f"{b}.linear1", None, cat,
               [f"{d}.attn.to_{x}" for x in "qkv"] + [f"{d}.proj_mlp"])
        linear(f"{b}.linear2", f"{d}.proj_out")
        linear(f"{b}.modulation.lin", f"{d}.norm.linear")
        r[f"{b}.norm.query_norm.scale"] = ([f"{d}.attn.norm_q.weight"], one)
        r[f"{b}.norm.key_norm.scale"] = ([f"{d}.attn.norm_k.weight"], one)
    # diffusers' final norm splits (scale, shift); the reference splits (shift, scale).
    linear("final_layer.adaLN_modulation.1", "norm_out.linear", swap)
    linear("final_layer.linear", "proj_out")
    return r


def iter_converted(src: str, *, dtype=jnp.bfloat16, axes_dim=None
                   ) -> tuple[FluxConfig, Iterator[tuple[str, jax.Array]]]:
    """The config and a stream of (Flax path, array) for any supported SRC.

    Every check that can be made from names and shapes alone (missing, unexpected,
    mis-shaped tensors) runs before the first tensor is yielded.
    """
    check_dtype(dtype)
    kind, path = _source_kind(src)
    source_name = torch_layout
    if kind == "converted":
        cfg_path = os.path.join(path, "config.json")
        meta = read_json(cfg_path)
        cfg = _config(cfg_path, lambda: FluxConfig(
            **{k: v for k, v in meta.items() if k not in ("format", "dtype")}))
        shards = sorted(glob.glob(os.path.join(path, "model-*.safetensors")))
        if not shards:
            raise CheckpointError(f"{path}: a converted checkpoint without its "
                                  "model-*.safetensors shards")
        files = TensorFiles(shards)
        source_name = same_layout
    elif kind == "bfl":
        files = TensorFiles([path], strip_prefix=BFL_PREFIX)
    else:
        cfg = config_from_diffusers(path, axes_dim)
        files = TensorFiles(safetensors_files(path))
    try:
        if kind == "bfl":
            cfg = config_from_bfl(files, axes_dim, source=path)
        recipe = (_diffusers_recipe(cfg) if kind == "diffusers"
                  else {n: ([n], lambda x: x) for n in files.names()})
    except BaseException:
        files.close()
        raise
    return cfg, _plan(files, recipe, cfg, dtype, source_name)


def iter_diffusers_state(tensors: dict, cfg: FluxConfig, *, dtype=jnp.bfloat16,
                         to_array: Callable = jnp.asarray):
    """(Flax path, array) stream from an in-memory diffusers state dict."""
    return _plan(TensorDict(tensors, to_array), _diffusers_recipe(cfg), cfg, dtype)


def _plan(files, recipe, cfg: FluxConfig, dtype, source_name=torch_layout):
    """`plan_stream` for the FLUX model of `cfg` (checks names and shapes up front)."""
    try:
        abstract = nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    except BaseException:
        files.close()
        raise
    return plan_stream(files, flat_params(abstract), recipe, dtype=dtype, model="FLUX",
                       source_name=source_name)


# ------------------------------------------------------------------------- writing

def convert(src: str, out: str, *, dtype=jnp.bfloat16, axes_dim=None, progress=print) -> str:
    """Converts SRC into the folder OUT (must not exist); returns OUT.

    Raises `CheckpointError` naming the file for an unreadable, empty, truncated or
    mismatched source, a bad `axes_dim`, or an output that exists or cannot be written
    (checked before any work). The source files are closed when it returns or fails.
    """
    return write_converted(out, lambda: iter_converted(src, dtype=dtype, axes_dim=axes_dim),
                           format=FORMAT, dtype=dtype, progress=progress)


def load_flux(path: str, *, dtype=jnp.bfloat16, attention: str = "pisa", policies=None,
              axes_dim=None, **policy_options) -> Flux:
    """A `Flux` model from a converted checkpoint or an official one (converted in memory).

    Args:
      path: converted folder, BFL single file, diffusers transformer or pipeline folder.
      dtype: parameter and compute dtype (default bfloat16).
      attention: "pisa" (the published per-layer setting) or "dense".
      policies: explicit per-layer `AttentionPolicy` tuple (overrides `attention`).
      policy_options: passed to `pisa_jax.layer_policies` (density, dense_layers, ...);
        refused with `attention="dense"` or `policies`, where they would do nothing.
      axes_dim: rotary embedding dims per id axis, for checkpoints whose config does not
        give them (a BFL single file); default (16, 56, 56), the released models'.
    Raises:
      CheckpointError naming the file for a missing, unreadable, empty, truncated or
      mismatched checkpoint; TypeError / ValueError for bad arguments. The files are
      closed when it returns.
    """
    dtype = check_dtype(dtype)
    if policies is not None and (policy_options or attention != "pisa"):
        given = sorted(policy_options) + ([f"attention={attention!r}"] if attention != "pisa"
                                          else [])
        raise ValueError(f"policies= sets every layer; the options {given} would do nothing")
    cfg, tensors = iter_converted(path, dtype=dtype, axes_dim=axes_dim)
    with tensors:
        if policies is None:
            policies = default_policies(cfg, attention, **policy_options)
        return model_from_tensors(cfg, tensors, dtype=dtype, policies=policies)


def model_from_tensors(cfg: FluxConfig, tensors, *, dtype, policies) -> Flux:
    """A `Flux` whose parameters are filled from a (Flax path, array) stream."""
    abstract = nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                           policies=policies))
    return fill_model(abstract, tensors)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_conversion_arguments(p, "BFL single file, diffusers transformer or pipeline folder")
    p.add_argument("--axes-dim", default=None,
                   type=comma_list(int, "three comma-separated positive even integers",
                                   lambda a: a > 0 and a % 2 == 0),
                   help="rotary embedding dims per id axis, summing to the head dim, e.g. "
                        "16,56,56 (default: from the source's config, else 16,56,56)")


def register(sub) -> argparse.ArgumentParser:
    """Adds the `convert` subcommand to an argparse subparsers object."""
    p = sub.add_parser("convert", help="convert FLUX.1 weights to the Flax layout",
                       description="Convert FLUX.1 weights to pisa-jax's Flax layout.")
    _add_arguments(p)
    p.set_defaults(func=lambda args: run(args, p))
    return p


def run(args, parser: argparse.ArgumentParser) -> int:
    if args.axes_dim is not None and len(args.axes_dim) != 3:
        parser.error(f"argument --axes-dim: expected three values (one per id axis), got "
                     f"{','.join(map(str, args.axes_dim))}")
    return run_conversion(lambda: convert(args.src, args.out, dtype=DTYPES[args.dtype],
                                          axes_dim=args.axes_dim), args.out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.flux.convert",
                                description="Convert FLUX.1 weights to pisa-jax's Flax layout.")
    _add_arguments(p)
    return run(p.parse_args(argv), p)


if __name__ == "__main__":
    sys.exit(main())
