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
OUT becomes a folder with `config.json` and `model-XXXXX.safetensors` shards whose names
are the Flax parameter paths (`blocks.0.self_attn.q.kernel`, kernels `[in, out]`).

Conversion streams tensor by tensor (the source is read lazily, the output is written in
shards), refuses missing, unexpected or mis-shaped tensors by name, and writes into a
temporary folder renamed to OUT only at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.checkpoint import (DTYPES, CheckpointError, TensorDict, TensorFiles,
                               atomic_folder, check_writable_output, fill_model, flat_params,
                               read_json, safetensors_files, write_sharded)
from models.wan.config import WanConfig
from models.wan.model import Wan, default_policies

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
    if os.path.isfile(src):
        if not src.endswith(".safetensors"):
            raise CheckpointError(f"expected a .safetensors single file or a folder; got {src}")
        return "official", src
    if not os.path.isdir(src):
        raise CheckpointError(f"no such file or folder: {src}")
    cfg = os.path.join(src, "config.json")
    if os.path.isfile(cfg):
        meta = read_json(cfg)
        if meta.get("format") == FORMAT:
            return "converted", src
        if "num_attention_heads" in meta:
            return "diffusers", src
        if "dim" in meta and "num_heads" in meta:
            return "official", src
        raise CheckpointError(f"{cfg}: neither a diffusers WanTransformer3DModel config "
                              "(num_attention_heads) nor an official Wan2.1 one (dim, num_heads)")
    if os.path.isfile(os.path.join(src, "transformer", "config.json")):
        return "diffusers", os.path.join(src, "transformer")
    raise CheckpointError(f"{src} is neither a single file, a diffusers transformer folder "
                          "(config.json + safetensors), a pipeline folder (transformer/), an "
                          "official Wan2.1 folder nor a converted checkpoint")


# ------------------------------------------------------------------ hyperparameters

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
        eps=(meta or {}).get("eps", 1e-6), qk_norm="blocks.0.self_attn.norm_q.weight" in names,
        cross_attn_norm="blocks.0.norm3.weight" in names)


# -------------------------------------------------------------------- name mapping

def _flax_to_official(path: str, ndim: int) -> tuple[str, tuple | None]:
    """('X.weight', axes to transpose the official tensor with) for 'X.kernel'."""
    if path.endswith(".kernel"):
        # Linear [out, in] -> [in, out]; Conv3d [out, in, t, h, w] -> [t, h, w, in, out].
        return path[: -len("kernel")] + "weight", (1, 0) if ndim == 2 else (2, 3, 4, 1, 0)
    return path, None


def _planned_stream(files, rename: dict[str, str], cfg: WanConfig, dtype, converted=False):
    """(Flax path, array) stream; every name and shape check runs before the first tensor."""
    abstract = nnx.eval_shape(lambda: Wan(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                          policies=default_policies(cfg, "dense")))
    plan, missing = {}, []
    for flax_path, value in flat_params(abstract).items():
        name, axes = ((flax_path, None) if converted
                      else _flax_to_official(flax_path, len(value.shape)))
        if name not in rename:
            missing.append(name)
            continue
        plan[flax_path] = (rename[name], axes, tuple(value.shape))
    unexpected = sorted(files.names() - {src for src, _, _ in plan.values()})
    if missing or unexpected:
        raise CheckpointError(
            "checkpoint does not match the Wan model inferred from it: "
            + "; ".join(f"{what}: {names[:20]}{' ...' if len(names) > 20 else ''}"
                        for what, names in (("missing", sorted(missing)),
                                            ("unexpected", unexpected)) if names))
    for flax_path, (src, axes, shape) in plan.items():
        got = files.shape(src)
        want = shape if axes is None else tuple(shape[axes.index(i)] for i in range(len(axes)))
        if got != want:
            raise CheckpointError(f"tensor {src} has shape {got}; the model expects {want}")

    def stream():
        for flax_path, (src, axes, _) in plan.items():
            x = files.get(src)
            yield flax_path, (x if axes is None else jnp.transpose(x, axes)).astype(dtype)

    return stream()


def iter_converted(src: str, *, dtype=jnp.bfloat16, num_heads: int | None = None
                   ) -> tuple[WanConfig, Iterator[tuple[str, jax.Array]]]:
    """The config and a stream of (Flax path, array) for any supported SRC."""
    kind, path = _source_kind(src)
    if kind == "converted":
        meta = read_json(os.path.join(path, "config.json"))
        cfg = WanConfig(**{k: v for k, v in meta.items() if k not in ("format", "dtype")})
        files = TensorFiles(sorted(glob.glob(os.path.join(path, "model-*.safetensors"))))
        return cfg, _planned_stream(files, {n: n for n in files.names()}, cfg, dtype, True)
    if kind == "official":
        single = os.path.isfile(path)
        files = TensorFiles([path] if single else safetensors_files(path), strip_prefix=PREFIX)
        meta = None if single else read_json(os.path.join(path, "config.json"))
        cfg = config_from_official(files, meta, num_heads)
        return cfg, _planned_stream(files, {n: n for n in files.names()}, cfg, dtype)
    files = TensorFiles(safetensors_files(path))
    cfg = config_from_diffusers(path)
    return cfg, _planned_stream(files, {official_name(n): n for n in files.names()}, cfg, dtype)


def iter_diffusers_state(tensors: dict, cfg: WanConfig, *, dtype=jnp.bfloat16,
                         to_array=jnp.asarray):
    """(Flax path, array) stream from an in-memory diffusers state dict."""
    return _planned_stream(TensorDict(tensors, to_array),
                           {official_name(n): n for n in tensors}, cfg, dtype)


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
        name, axes = _flax_to_official(flax_path, len(value.shape))
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
    """Converts SRC into the folder OUT (must not exist); returns OUT."""
    check_writable_output(out)
    with jax.default_device(jax.devices("cpu")[0]):     # conversion needs no accelerator
        cfg, tensors = iter_converted(src, dtype=dtype, num_heads=num_heads)
        with atomic_folder(out) as tmp:
            n_tensors, n_shards = write_sharded(tmp, tensors, progress=progress)
            meta = json.loads(cfg.to_json()) | {"format": FORMAT,
                                                "dtype": jnp.dtype(dtype).name}
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(meta, f, indent=1)
    progress(f"wrote {n_tensors} tensors in {n_shards} shard(s) to {out}")
    return out


def load_wan(path: str, *, dtype=jnp.bfloat16, attention: str = "pisa", policies=None,
             tile=None, num_heads: int | None = None, **policy_options) -> Wan:
    """A `Wan` model from a converted checkpoint or an official / diffusers one.

    Args:
      path: converted folder, official Wan2.1 folder or single file, diffusers
        transformer or pipeline folder.
      dtype: parameter and compute dtype (default bfloat16).
      attention: "pisa" (the published per-layer setting) or "dense".
      policies: explicit per-layer `AttentionPolicy` tuple (overrides `attention`).
      tile: (frames, height, width) of one block's tile (default: the measured best).
      num_heads: head count of an official single file (default dim / 128).
      policy_options: passed to `pisa_jax.layer_policies` (density, dense_layers, ...).
    Raises `CheckpointError` for a checkpoint that does not match the model.
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
    p.add_argument("src", help="official Wan2.1 folder or file, diffusers transformer or "
                               "pipeline folder")
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="head count of an official single file (default: dim / 128)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    if args.num_heads is not None and args.num_heads < 1:
        p.error(f"--num-heads must be positive; got {args.num_heads}")
    try:
        convert(args.src, args.out, dtype=DTYPES[args.dtype], num_heads=args.num_heads)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
