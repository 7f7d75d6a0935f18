"""PISA's error against dense attention per 3D tile shape, for Wan2.1's video token grids
(`python benchmarks/wan.py --tiles`).

PISA (biased selection) runs against dense attention on structured q, k, v (smooth random
fields over the video grid with Wan's 3D rotary embedding), tokens in tile-major order per
tile shape, and in raster order for comparison.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import pisa_jax as pj
from models.embeddings import rope_angles
from models.wan import DEFAULT_TILE, WanConfig
from models.wan.layers import apply_rope
from pisa_jax.metrics import relative_error as rel
from pisa_jax.tokens import tile_order

LENGTHS = (3.0, 8.0, (1.5, 4.0, 4.0), (8.0, 3.0, 3.0))
TILES = ((4, 4, 4), (1, 8, 8), (2, 4, 8), (2, 8, 4), (4, 2, 8), (1, 4, 16), (2, 2, 16))
FEW_TILES = (DEFAULT_TILE, (2, 8, 4), (1, 8, 8))


def structured_qkv(grid, heads: int, head_dim: int, *, length, seed: int = 0,
                   dtype=jnp.float32):
    """q, k, v `[1, T, H, D]` in raster order: smooth random fields over the grid.

    Each field mixes 16 random plane waves whose wave vectors have length about
    `1 / length` per token along each axis (`length`: one number, or one per axis), plus
    5% white noise; q and k then get Wan's 3D rotary embedding (head dim split as in
    `WanConfig.rope_dims`). Built on the default device.
    """
    rng = np.random.default_rng(seed)
    t = int(np.prod(grid))
    pos = jnp.stack(jnp.unravel_index(jnp.arange(t), grid), -1)
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    fields = []
    for i in range(3):
        waves = rng.normal(size=(3, 16)) / np.broadcast_to(np.asarray(length, float), 3)[:, None]
        basis = jnp.cos(pos.astype(jnp.float32) @ jnp.asarray(waves, jnp.float32)
                        + jnp.asarray(rng.uniform(0, 2 * np.pi, 16), jnp.float32))
        mix = jnp.asarray(rng.normal(size=(heads, 16, head_dim)) / 4.0, jnp.float32)
        x = (jnp.einsum("tf,hfd->thd", basis, mix)[None]
             + 0.05 * jax.random.normal(keys[i], (1, t, heads, head_dim)))
        fields.append(2.0 * x if i < 2 else x)
    rope_cfg = WanConfig(dim=head_dim, num_heads=1)        # the head dim's axis split, theta
    angles = rope_angles(pos, rope_cfg.rope_dims, rope_cfg.theta)
    rope = (jnp.cos(angles), jnp.sin(angles))
    q, k, v = fields
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return tuple(x.astype(dtype) for x in (q, k, v))


def tile_errors(grid, *, density: float, heads: int = 2, head_dim: int = 128,
                lengths=LENGTHS, tiles=FEW_TILES, both_placements: bool = False,
                implementation: str = "auto", dtype=jnp.float32) -> dict:
    """Relative error of PISA against dense per tile shape (and raster order), per length.

    Tiles are placed with the full tiles first; `both_placements` adds partial tiles left
    in place."""
    fn = jax.jit(functools.partial(pj.piecewise_sparse_attention, density=density,
                                   use_bias=True, implementation=implementation))
    dense = jax.jit(pj.dense_attention)
    out = {}
    for length in lengths:
        q, k, v = structured_qkv(grid, heads, head_dim, length=length, dtype=dtype)
        ref = np.asarray(dense(q, k, v), np.float32)
        row = {"raster": rel(np.asarray(fn(q, k, v), np.float32), ref)}
        for tile in tiles:
            for first in (True, False) if both_placements else (True,):
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


def add_arguments(p) -> None:
    """--tiles, --all-tiles and --tile-grid."""
    p.add_argument("--tiles", action="store_true",
                   help="after the forwards, PISA's error against dense per tile shape")
    p.add_argument("--all-tiles", action="store_true",
                   help="with --tiles: every tile shape, both placements of partial tiles")
    p.add_argument("--tile-grid", default=None,
                   help="F,H,W token grid for the tile errors (default: each shape's grid)")


def grids(p, args, default: dict) -> dict:
    """Name -> (F, H, W) token grid: `--tile-grid` as "custom", else `default`.

    Exits through `p.error` for a malformed `--tile-grid`, or for `--all-tiles` or
    `--tile-grid` without `--tiles` (they would do nothing)."""
    if not args.tiles and (args.all_tiles or args.tile_grid):
        p.error("--all-tiles and --tile-grid apply to the tile errors: add --tiles")
    if not args.tile_grid:
        return default
    try:
        grid = tuple(int(x) for x in args.tile_grid.split(","))
    except ValueError:
        p.error(f"--tile-grid: expected F,H,W integers, got {args.tile_grid!r}")
    if len(grid) != 3 or min(grid) < 1:
        p.error(f"--tile-grid: expected 3 positive integers, got {args.tile_grid!r}")
    return {"custom": grid}


def run(args, grids: dict, results: dict, *, density: float, save, log) -> None:
    """The tile error table of every grid, put in `results` (then `save()`) and printed."""
    on_gpu = jax.default_backend() == "gpu"
    heads = 40 if on_gpu and not args.tiny else 2
    for gname, grid in grids.items():
        log(f"tile errors at {gname} grid {grid} (heads {heads})")
        errs = tile_errors(grid, density=density, heads=heads,
                           head_dim=128 if not args.tiny else 32,
                           tiles=TILES if args.all_tiles else FEW_TILES,
                           both_placements=args.all_tiles,
                           dtype=jnp.bfloat16 if on_gpu else jnp.float32)
        results[f"{gname} {'x'.join(map(str, grid))}"] = errs
        print_tile_errors(errs)
        save()
