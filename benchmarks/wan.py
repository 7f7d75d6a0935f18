"""Wan2.1 transformer forward: this project (dense, PISA) against diffusers, the attention
share of the forward, and PISA's error against dense per 3D tile shape.

    python benchmarks/wan.py [--shapes 14b-720p,1.3b-480p] [--batch 2] [--out DIR]
        [--no-diffusers] [--tiles-only] [--tile-grid F,H,W] [--tiny]

Per shape (random bf16 weights; drawn in diffusers' `WanTransformer3DModel` and copied
through the converter's diffusers mapping when diffusers is importable, so both run the
same weights): one forward's median time for diffusers (PyTorch SDPA), our dense and our
PISA forward (density 0.15, first 4 layers dense), compile times, peak memory, the time of
dense attention alone at that shape times the number of layers (the attention share of
the dense forward), and relative differences between the outputs. Batch 2 is one
classifier-free-guidance step. Tile errors: PISA (density 0.15, biased selection) against
dense attention on structured q, k, v (smooth random fields over the video grid with
Wan's 3D rotary embedding), tokens in tile-major order per tile shape.
`--tiny` runs everything at toy sizes on any device (a quick test runs it on the CPU).
Writes `wan.json` to --out and tables to stdout.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # share the GPU with torch

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import pisa_jax as pj  # noqa: E402
from benchmarks.attention import timeit  # noqa: E402
from benchmarks.flux import torch_median_ms  # noqa: E402
from models.wan import WAN_T2V_1_3B, WAN_T2V_14B, Wan, WanConfig, default_policies  # noqa: E402
from models.wan.convert import iter_diffusers_state, model_from_tensors  # noqa: E402
from models.wan.layers import apply_rope, rope_angles  # noqa: E402
from pisa_jax.metrics import relative_error as rel  # noqa: E402
from pisa_jax.tokens import tile_order  # noqa: E402

N_TXT = 512
TINY = WanConfig(dim=64, num_heads=2, num_layers=5, ffn_dim=128, text_dim=32, freq_dim=32)
# name -> (config, latent [F, H, W]); 81 frames -> 21 latent frames, 8x spatial VAE.
SHAPES = {"14b-720p": (WAN_T2V_14B, (21, 90, 160)), "1.3b-480p": (WAN_T2V_1_3B, (21, 60, 104)),
          "tiny": (TINY, (3, 12, 16))}
# Correlation lengths (tokens) of the structured inputs: isotropic, then per axis (F, H, W)
# with frames rougher (fast motion) and smoother (slow motion) than space.
LENGTHS = (3.0, 8.0, (1.5, 4.0, 4.0), (8.0, 3.0, 3.0))
TILES = ((4, 4, 4), (1, 8, 8), (2, 4, 8), (2, 8, 4), (4, 2, 8), (1, 4, 16), (2, 2, 16))


# ------------------------------------------------------------------- tile shapes

def structured_qkv(grid, heads: int, head_dim: int, *, length: float, seed: int = 0,
                   dtype=jnp.float32):
    """q, k, v `[1, T, H, D]` in raster order: smooth random fields over the grid.

    Each field mixes 16 random plane waves whose wave vectors have length about
    `1 / length` per token along each axis (`length`: one number, or one per axis), plus
    5% white noise; q and k then get
    Wan's 3D rotary embedding (head dim split as in `WanConfig.rope_dims`).
    """
    rng = np.random.default_rng(seed)
    pos = np.stack(np.unravel_index(np.arange(int(np.prod(grid))), grid), -1).astype(float)
    fields = []
    for _ in range(3):
        waves = rng.normal(size=(3, 16)) / np.broadcast_to(np.asarray(length, float), 3)[:, None]
        basis = np.cos(pos @ waves + rng.uniform(0, 2 * np.pi, 16))
        mix = rng.normal(size=(heads, 16, head_dim)) / 4.0
        fields.append(np.einsum("tf,hfd->thd", basis, mix)[None]
                      + 0.05 * rng.standard_normal((1, len(pos), heads, head_dim)))
    d = head_dim
    angles = rope_angles(jnp.asarray(pos, jnp.int32), (d - 4 * (d // 6), 2 * (d // 6),
                                                       2 * (d // 6)), 10_000.0)
    rope = (jnp.cos(angles), jnp.sin(angles))
    q, k, v = (jnp.asarray(2.0 * x if i < 2 else x, jnp.float32) for i, x in enumerate(fields))
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return tuple(x.astype(dtype) for x in (q, k, v))


def tile_errors(grid, *, heads: int = 2, head_dim: int = 128, lengths=LENGTHS,
                density: float = 0.15, tiles=TILES, implementation: str = "auto",
                dtype=jnp.float32) -> dict:
    """Relative error of PISA against dense per tile shape (and raster order), per length."""
    fn = jax.jit(functools.partial(pj.piecewise_sparse_attention, density=density,
                                   use_bias=True, implementation=implementation))
    dense = jax.jit(pj.dense_attention)
    out = {}
    for length in lengths:
        q, k, v = structured_qkv(grid, heads, head_dim, length=length, dtype=dtype)
        ref = np.asarray(dense(q, k, v), np.float32)
        row = {"raster": rel(np.asarray(fn(q, k, v), np.float32), ref)}
        for tile in tiles:
            for first in (True, False):
                order = tile_order(grid, tile, full_tiles_first=first)
                o = fn(q[:, order], k[:, order], v[:, order])[:, np.argsort(order)]
                name = "x".join(map(str, tile)) + ("" if first else " (partial in place)")
                row[name] = rel(np.asarray(o, np.float32), ref)
        out["length " + ",".join(f"{x:g}" for x in np.atleast_1d(length))] = row
    return out


def print_tile_errors(errors: dict) -> None:
    names = list(next(iter(errors.values())))
    print(f"\n{'order':>28} " + " ".join(f"{k[7:]:>12}" for k in errors) + "        mean")
    for n in sorted(names, key=lambda n: np.mean([e[n] for e in errors.values()])):
        vals = [e[n] for e in errors.values()]
        print(f"{n:>28} " + " ".join(f"{x:12.4f}" for x in vals) + f" {np.mean(vals):11.4f}")


# ---------------------------------------------------------------------- forwards

def inputs(cfg: WanConfig, latent, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return dict(hidden_states=rng.standard_normal((batch, cfg.in_channels, *latent)),
                timestep=np.full((batch,), 700.0),
                encoder_hidden_states=rng.standard_normal((batch, 8 if cfg is TINY else N_TXT,
                                                           cfg.text_dim)))


def diffusers_model(cfg: WanConfig, device: str):
    import torch
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
            attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
            out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers).eval()
    torch.set_default_dtype(torch.float32)
    return model


def bench_shape(name: str, batch: int, use_diffusers: bool, reps: int) -> dict:
    cfg, latent = SHAPES[name]
    io = inputs(cfg, latent, batch)
    grid = tuple(s // p for s, p in zip(latent, cfg.patch_size))
    r = {"batch": batch, "latent": list(latent), "tokens": int(np.prod(grid))}
    policies = default_policies(cfg, "pisa")
    ref = None
    if use_diffusers:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tmodel = diffusers_model(cfg, device)
        targs = {k: torch.from_numpy(v).to(device, torch.bfloat16) for k, v in io.items()}

        @torch.no_grad()
        def run():
            return tmodel(**targs, return_dict=False)[0]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            r["diffusers_ms"] = torch_median_ms(run, reps)
            r["diffusers_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            t0 = time.perf_counter()
            run()
            r["diffusers_ms"] = 1e3 * (time.perf_counter() - t0)
        ref = run().float().cpu().numpy()
        to_array = lambda x: jnp.array(jax.dlpack.from_dlpack(x.detach().contiguous()), copy=True)
        model = model_from_tensors(cfg, iter_diffusers_state(
            tmodel.state_dict(), cfg, dtype=jnp.bfloat16, to_array=to_array),
            dtype=jnp.bfloat16, policies=policies)
        del tmodel, targs
        if device == "cuda":
            torch.cuda.empty_cache()
    else:
        model = Wan(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, policies=policies)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnames="dense")
    def forward(state, io, dense):
        return nnx.merge(graphdef, state)(io["hidden_states"], io["timestep"],
                                          io["encoder_hidden_states"], dense=dense)

    jio = {k: jnp.asarray(v, jnp.float32 if k == "timestep" else jnp.bfloat16)
           for k, v in io.items()}
    outs = {}
    for mode in ("dense", "pisa"):
        t0 = time.perf_counter()
        compiled = forward.lower(state, jio, dense=mode == "dense").compile()
        r[f"{mode}_compile_s"] = time.perf_counter() - t0
        r[f"{mode}_temp_gib"] = compiled.memory_analysis().temp_size_in_bytes / 2**30
        outs[mode] = np.asarray(compiled(state, jio), np.float32)
        r[f"{mode}_ms"] = 1e3 * timeit(compiled, state, jio, reps=reps, target_s=0.0)
        print(f"{name}: ours {mode} {r[f'{mode}_ms']:.1f} ms", flush=True)
    r["pisa_speedup_over_dense"] = r["dense_ms"] / r["pisa_ms"]
    r["pisa_vs_dense_rel"] = rel(outs["pisa"], outs["dense"])
    if ref is not None:
        r["dense_vs_diffusers_rel"] = rel(outs["dense"], ref)
    stats = jax.devices()[0].memory_stats() or {}
    r["jax_peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30

    # Attention alone at this shape, once per layer: the part PISA can speed up.
    shape = (batch, r["tokens"], cfg.num_heads, cfg.head_dim)
    q, k, v = (jax.random.normal(key, shape, jnp.bfloat16)
               for key in jax.random.split(jax.random.PRNGKey(1), 3))
    r["attention_dense_ms_per_layer"] = 1e3 * timeit(jax.jit(pj.dense_attention), q, k, v,
                                                     reps=reps)
    pisa = jax.jit(functools.partial(pj.piecewise_sparse_attention, density=0.15, use_bias=True))
    r["attention_pisa_ms_per_layer"] = 1e3 * timeit(pisa, q, k, v, reps=reps)
    r["attention_share_of_dense"] = (cfg.num_layers * r["attention_dense_ms_per_layer"]
                                     / r["dense_ms"])
    del q, k, v, state, model
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="14b-720p,1.3b-480p")
    p.add_argument("--batch", type=int, default=2, help="2 = one CFG step (cond + uncond)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    p.add_argument("--no-diffusers", action="store_true", help="our forwards only, JAX weights")
    p.add_argument("--tiles-only", action="store_true", help="only the tile-shape errors")
    p.add_argument("--tile-grid", default=None,
                   help="F,H,W token grid for the tile errors (default: each shape's grid)")
    p.add_argument("--tiny", action="store_true", help="toy sizes (CPU): a smoke run")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; expected names from {list(SHAPES)[:2]}")
    if args.batch < 1:
        p.error(f"--batch must be positive; got {args.batch}")
    grids = {}
    if args.tile_grid:
        try:
            grids["custom"] = tuple(int(x) for x in args.tile_grid.split(","))
        except ValueError:
            p.error(f"--tile-grid: expected F,H,W integers, got {args.tile_grid!r}")
        if len(grids["custom"]) != 3 or min(grids["custom"]) < 1:
            p.error(f"--tile-grid: expected 3 positive integers, got {args.tile_grid!r}")
    else:
        for s in shapes:
            cfg, latent = SHAPES[s]
            grids[s] = tuple(n // q for n, q in zip(latent, cfg.patch_size))
    on_gpu = jax.default_backend() == "gpu"
    try:
        import diffusers  # noqa: F401
        has_diffusers = not args.no_diffusers
    except ImportError:
        has_diffusers = False
    os.makedirs(args.out, exist_ok=True)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "diffusers": has_diffusers, "tile_errors": {}, "shapes": {}}

    def save():
        with open(os.path.join(args.out, "wan.json"), "w") as f:
            json.dump(results, f, indent=1)

    for gname, grid in grids.items():
        heads = 40 if on_gpu and not args.tiny else 2
        errs = tile_errors(grid, heads=heads, head_dim=128 if not args.tiny else 32,
                           tiles=TILES if not args.tiny else TILES[:3],
                           dtype=jnp.bfloat16 if on_gpu else jnp.float32)
        results["tile_errors"][f"{gname} {'x'.join(map(str, grid))}"] = errs
        print(f"tile errors at {gname} grid {grid} (heads {heads}):")
        print_tile_errors(errs)
        save()
    if args.tiles_only:
        return
    for name in shapes:
        results["shapes"][name] = bench_shape(name, args.batch, has_diffusers, args.reps)
        save()
    print(f"\n{'shape':>10} {'diffusers ms':>13} {'dense ms':>9} {'PISA ms':>8} "
          f"{'PISA/dense':>10} {'attn share':>10} {'peak GiB':>9}")
    for name, r in results["shapes"].items():
        print(f"{name:>10} {r.get('diffusers_ms', float('nan')):13.1f} {r['dense_ms']:9.1f} "
              f"{r['pisa_ms']:8.1f} {r['pisa_speedup_over_dense']:9.2f}x "
              f"{r['attention_share_of_dense']:10.2f} {r['jax_peak_gib']:9.1f}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
