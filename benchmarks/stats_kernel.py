"""The block statistics kernel (Triton) on one GPU: launch options against its bandwidth.

    python benchmarks/stats_kernel.py [--shapes flux-1024,flux-2048,seq-32k]
        [--block-sizes 64,128] [--warps 4,8] [--stages 1,2,3] [--runs 1,0.5,0.25]
        [--per-program 8,15]

Per shape and block size it times the statistics kernel (bf16, D = 128, with the moment
norms, `bthd`) for every combination of warps, pipeline stages and run length (blocks per
program: multiples of the default rule and any given with --per-program),
checks each variant's output against the default's, and reports milliseconds and the
bandwidth of reading q, k and v once, next to XLA's own reduction over the same bytes.
Writes stats_kernel.json to $OUT (or .) and the five fastest variants per case to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.attention import SHAPES  # noqa: E402
from pisa_jax._blocks import ceil_div, num_blocks  # noqa: E402
from pisa_jax.cli import comma_list  # noqa: E402
from pisa_jax.kernels.pallas_triton import block_statistics as kernel  # noqa: E402
from pisa_jax.kernels.pallas_triton.config import statistics_config  # noqa: E402
from pisa_jax.metrics import relative_error, time_per_call  # noqa: E402

D = 128


def sweep(name: str, block_size: int, warps, stages, runs, per_program=()) -> dict:
    t, h = SHAPES[name]
    q, k, v = [jax.random.normal(key, (1, t, h, D), jnp.bfloat16)
               for key in jax.random.split(jax.random.PRNGKey(t), 3)]
    gbytes = 3 * q.size * q.dtype.itemsize / 1e9
    xla = jax.jit(lambda *xs: sum(jnp.sum(x.astype(jnp.float32), axis=1) for x in xs))
    xla_ms = time_per_call(xla, q, k, v) * 1e3
    base = statistics_config(D, block_size, q.dtype)
    rule = kernel.default_blocks_per_program(num_blocks(t, block_size), h)   # batch 1

    def run(config):
        return jax.jit(functools.partial(kernel.block_statistics, block_size=block_size,
                                         with_norms=True, layout="bthd", interpret=False,
                                         config=config))

    want = run(base)(q, k, v)
    rows = []
    nt = num_blocks(t, block_size)
    lengths = sorted({min(nt, max(1, round(rule * f))) for f in runs}
                     | {min(nt, n) for n in per_program})
    for w, s, n in itertools.product(warps, stages, lengths):
        config = dataclasses.replace(base, num_warps=w, num_stages=s, blocks_per_program=n)
        try:
            fn = run(config)
            got = fn(q, k, v)
            err = max(float(relative_error(getattr(got, f), getattr(want, f)))
                      for f in ("q_mean", "k_mean", "v_sum", "moment", "moment_norms"))
            ms = time_per_call(fn, q, k, v) * 1e3
        except Exception as e:  # a variant that does not build is reported, not fatal
            rows.append(dict(warps=w, stages=s, blocks_per_program=n,
                             error=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        rows.append(dict(warps=w, stages=s, blocks_per_program=n,
                         programs=h * ceil_div(nt, n), ms=ms, gb_s=gbytes / ms * 1e3, rel_err_to_default=err))
    ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    default_ms = time_per_call(run(base), q, k, v) * 1e3
    print(f"{name} block {block_size}: default ({base.num_warps} warps, {base.num_stages} "
          f"stages, {rule} blocks per program) {default_ms:.3f} ms, "
          f"{gbytes / default_ms * 1e3:.0f} GB/s; XLA reduction over q, k, v {xla_ms:.3f} ms "
          f"({gbytes / xla_ms * 1e3:.0f} GB/s)", flush=True)
    for r in ok[:5]:
        print(f"   {r['warps']} warps {r['stages']} stages "
              f"{r['blocks_per_program']:3d} blocks/program ({r['programs']} programs): "
              f"{r['ms']:.3f} ms "
              f"{r['gb_s']:.0f} GB/s (to default {r['rel_err_to_default']:.1e})", flush=True)
    for r in rows:
        if "error" in r:
            print("   failed:", r, flush=True)
    return dict(default_ms=default_ms, default_blocks_per_program=rule, xla_reduce_ms=xla_ms,
                gbytes=gbytes, variants=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=("flux-1024", "flux-2048", "seq-32k"),
                   type=comma_list(str, f"names from {', '.join(SHAPES)}", SHAPES.__contains__))
    p.add_argument("--block-sizes", default=(64, 128),
                   type=comma_list(int, "block sizes from 64, 128", (64, 128).__contains__))
    p.add_argument("--warps", default=(4, 8),
                   type=comma_list(int, "warp counts from 2, 4, 8, 16", (2, 4, 8, 16).__contains__))
    p.add_argument("--stages", default=(1, 2, 3),
                   type=comma_list(int, "stage counts from 1 to 4", range(1, 5).__contains__))
    p.add_argument("--runs", default=(1.0, 0.5, 0.25),
                   type=comma_list(float, "positive numbers", lambda x: x > 0),
                   help="blocks per program as multiples of the default rule")
    p.add_argument("--per-program", default=(),
                   type=comma_list(int, "positive integers", lambda x: x > 0),
                   help="blocks per program to time as well (capped at the block count)")
    args = p.parse_args(argv)
    out = {"device": jax.devices()[0].device_kind, "results": {}}
    for name in args.shapes:
        for bs in args.block_sizes:
            out["results"][f"{name} b{bs}"] = sweep(name, bs, args.warps, args.stages, args.runs,
                                                       args.per_program)
    path = os.path.join(os.environ.get("OUT", "."), "stats_kernel.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
