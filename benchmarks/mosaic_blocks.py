"""Block size 64 against 128: the Mosaic and Triton attention kernels on one Hopper GPU.

    python benchmarks/mosaic_blocks.py [--shapes flux-2048,seq-32k] [--no-checks]
        (writes probe128.json to $OUT or .)
    python benchmarks/mosaic_blocks.py --shapes flux-2048,seq-32k --scaling 0.05,0.15,0.3,0.6,1.0
        (the block-128 exact path against its work per CTA; writes scaling128.json)

First the block-128 Mosaic kernel against the float32 reference with the same selection
(small shapes, partial blocks, both layouts, orders 1 / 0 / -1), then per shape, for
block sizes 64 and 128 and either backend: the whole op, the exact path (order -1) and
the attention (order 1, also its relative error to cuDNN's dense output), and cuDNN
dense attention (bf16, D = 128, density 0.15 with bias).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import pisa_jax as pj  # noqa: E402
from benchmarks.attention import SHAPES  # noqa: E402
from pisa_jax.kernels.pallas_mosaic_gpu import MosaicConfig  # noqa: E402
from pisa_jax.kernels.pallas_mosaic_gpu import piecewise_attention as mosaic  # noqa: E402
from pisa_jax.kernels.pallas_triton.piecewise_attention import (  # noqa: E402
    piecewise_attention as triton_attention)
from pisa_jax.cli import comma_list  # noqa: E402
from pisa_jax.metrics import relative_error, time_per_call  # noqa: E402

triton = functools.partial(triton_attention, interpret=False)
CHECKS = ((941, 2, 64, "bthd"), (2245, 2, 128, "bhtd"), (4608, 2, 128, "bthd"))
D = 128


def qkv(t, h, d, layout, seed):
    shape = (1, t, h, d) if layout == "bthd" else (1, h, t, d)
    return [jax.random.normal(k, shape, jnp.bfloat16)
            for k in jax.random.split(jax.random.PRNGKey(seed), 3)]


def checks() -> list[dict]:
    """The block-128 Mosaic kernel against the float32 reference, same selection."""
    rows = []
    for t, h, d, layout in CHECKS:
        q, k, v = qkv(t, h, d, layout, t)
        stats = functools.partial(pj.block_statistics, block_size=128, with_norms=True,
                                  layout=layout, implementation="reference")
        st = stats(q, k, v)
        se = pj.select_blocks(st, density=0.15, use_bias=True, implementation="reference")
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        rst = stats(*f32)
        for order in (1, 0, -1):
            run = jax.jit(functools.partial(mosaic, scale=d ** -0.5, order=order, layout=layout))
            ref = pj.piecewise_attention(*f32, rst, se, order=order, layout=layout,
                                         implementation="reference")
            e = float(relative_error(run(q, k, v, st, se), ref))
            rows.append(dict(t=t, d=d, layout=layout, order=order, rel_err=e))
            print("check", t, d, layout, order, f"{e:.2e}", flush=True)
    return rows


def variants(block_size: int) -> list[tuple[str, object]]:
    """(name, attention kernel) pairs timed at `block_size`: at 128 also the block-128
    kernel without its default persistent grid, and without turns either."""
    extra = [] if block_size != 128 else [
        ("mosaic one CTA per block", functools.partial(
            mosaic, config=MosaicConfig(ping_pong=True, persistent=False))),
        ("mosaic no ping-pong", functools.partial(
            mosaic, config=MosaicConfig(ping_pong=False, persistent=False)))]
    return [("mosaic", mosaic), ("triton", triton)] + extra


def timings(name: str, block_sizes=(64, 128)) -> dict:
    t, h = SHAPES[name]
    q, k, v = qkv(t, h, D, "bthd", t)
    r = {}
    cudnn = jax.jit(functools.partial(pj.dense_attention, implementation="cudnn"))
    r["cudnn_ms"] = time_per_call(cudnn, q, k, v) * 1e3
    dense = cudnn(q, k, v)
    for bs in block_sizes:
        st = jax.jit(functools.partial(pj.block_statistics, block_size=bs, with_norms=True))(
            q, k, v)
        se = jax.jit(functools.partial(pj.select_blocks, density=0.15, use_bias=True))(st)
        flops = 4.0 * t * se.indices.shape[-1] * bs * D * h
        for impl in ("mosaic", "triton"):
            op = jax.jit(functools.partial(pj.piecewise_sparse_attention, density=0.15,
                                           block_size=bs, use_bias=True, implementation=impl))
            r[f"b{bs} {impl} whole op ms"] = ms = time_per_call(op, q, k, v) * 1e3
            print(name, bs, impl, "whole op", f"{ms:.3f} ms", flush=True)
        for impl, fn in variants(bs):
            for order in (-1, 1):
                f = jax.jit(functools.partial(fn, scale=D ** -0.5, order=order, layout="bthd"))
                ms = time_per_call(f, q, k, v, st, se) * 1e3
                r[f"b{bs} {impl} order {order} ms"] = ms
                rate = ""
                if order == 1:
                    r[f"b{bs} {impl} order 1 error vs dense"] = float(
                        relative_error(f(q, k, v, st, se), dense))
                else:
                    r[f"b{bs} {impl} exact TFLOP/s"] = flops / ms / 1e9
                    rate = f"{flops / ms / 1e9:.0f} TFLOP/s"
                print(name, bs, impl, order, f"{ms:.3f} ms", rate, flush=True)
    print(name, "cudnn", f"{r['cudnn_ms']:.3f}", flush=True)
    return r


def scaling(name: str, densities: list[float]) -> dict:
    """The block-128 Mosaic exact path (order -1) against the number of selected key
    blocks per query block: its time, FLOP rate, and the least-squares line
    `ms = fixed + per_tile * K`. `fixed` is what a CTA costs whatever its work (launch,
    query and index loads, pipeline fill and drain, the write); `per_tile` gives the rate
    of the main loop, `4 * 128 * 128 * D * NT * H / per_tile`, against cuDNN's."""
    t, h = SHAPES[name]
    q, k, v = qkv(t, h, D, "bthd", t)
    cudnn = jax.jit(functools.partial(pj.dense_attention, implementation="cudnn"))
    cudnn_ms = time_per_call(cudnn, q, k, v) * 1e3
    st = jax.jit(functools.partial(pj.block_statistics, block_size=128, with_norms=True))(
        q, k, v)
    f = jax.jit(functools.partial(mosaic, scale=D ** -0.5, order=-1, layout="bthd"))
    rows = []
    for density in densities:
        se = jax.jit(functools.partial(pj.select_blocks, density=density, use_bias=True))(st)
        num = se.indices.shape[-1]
        ms = time_per_call(f, q, k, v, st, se) * 1e3
        rows.append(dict(density=density, selected=num, ms=ms,
                         tflops=4.0 * t * num * 128 * D * h / ms / 1e9))
        print(name, f"density {density}: {num} blocks, {ms:.3f} ms, "
              f"{rows[-1]['tflops']:.0f} TFLOP/s", flush=True)
    n = len(rows)
    xs, ys = [r["selected"] for r in rows], [r["ms"] for r in rows]
    mx, my = sum(xs) / n, sum(ys) / n
    per_tile = (sum((x - mx) * (y - my) for x, y in zip(xs, ys))
                / sum((x - mx) ** 2 for x in xs))
    fixed = my - per_tile * mx
    loop_tflops = 4.0 * t * 128 * D * h / per_tile / 1e9
    cudnn_tflops = 4.0 * t * t * D * h / cudnn_ms / 1e9
    print(name, f"fixed {fixed:.3f} ms, per tile {per_tile * 1e3:.2f} us, main loop "
          f"{loop_tflops:.0f} TFLOP/s, cuDNN {cudnn_tflops:.0f} TFLOP/s", flush=True)
    return dict(rows=rows, fixed_ms=fixed, per_tile_ms=per_tile, loop_tflops=loop_tflops,
                cudnn_ms=cudnn_ms, cudnn_tflops=cudnn_tflops)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="flux-2048,seq-32k", help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--no-checks", action="store_true",
                    help="skip the checks against the reference")
    ap.add_argument("--block-sizes", default=(64, 128), help="of 64, 128 (default both)",
                    type=comma_list(int, "comma-separated block sizes of 64, 128",
                                    lambda b: b in (64, 128)))
    ap.add_argument("--scaling", default=None, metavar="DENSITIES",
                    type=comma_list(float, "comma-separated densities in (0, 1]",
                                    lambda x: 0.0 < x <= 1.0),
                    help="only the block-128 exact path against its number of selected "
                         "blocks, at these densities (e.g. 0.05,0.15,0.3,0.6,1.0)")
    args = ap.parse_args(argv)
    if args.scaling is not None and len(set(args.scaling)) < 2:
        ap.error(f"--scaling: expected at least two different densities (a line is fitted "
                 f"through them), got {','.join(map(str, args.scaling))}")
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        ap.error(f"--shapes: unknown {sorted(unknown)}; expected names from "
                 f"{', '.join(SHAPES)}")
    if args.scaling:
        out = {name: scaling(name, list(args.scaling)) for name in args.shapes.split(",")}
        with open(os.path.join(os.environ.get("OUT", "."), "scaling128.json"), "w") as f:
            json.dump(out, f, indent=1)
        return
    out = {"checks": [] if args.no_checks else checks(), "timing": {}}
    for name in args.shapes.split(","):
        out["timing"][name] = timings(name, args.block_sizes)
        with open(os.path.join(os.environ.get("OUT", "."), "probe128.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
