"""Block size 64 against 128: the Mosaic and Triton attention kernels on one Hopper GPU.

    python benchmarks/mosaic_blocks.py [--shapes flux-2048,seq-32k] [--no-checks]
        (writes probe128.json to $OUT or .)

First the block-128 Mosaic kernel against the float32 reference with the same selection
(small shapes, partial blocks, both layouts, orders 1 / 0 / -1), then the exact path
(order -1) and the attention (order 1) at flux-2048 and seq-32k for block sizes 64 and
128 with either backend, and cuDNN dense attention (bf16, D = 128, density 0.15 with bias).
"""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import jax, jax.numpy as jnp
import pisa_jax as pj
from pisa_jax.kernels.pallas_mosaic_gpu import MosaicConfig, piecewise_attention as mosaic
import functools
from pisa_jax.kernels.pallas_triton.piecewise_attention import piecewise_attention as _triton
triton = functools.partial(_triton, interpret=False)
from pisa_jax.metrics import relative_error, time_per_call
import argparse
from benchmarks.attention import SHAPES
ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--shapes", default="flux-2048,seq-32k", help=f"of {', '.join(SHAPES)}")
ap.add_argument("--no-checks", action="store_true", help="skip the checks against the reference")
args = ap.parse_args()
unknown = set(args.shapes.split(",")) - set(SHAPES)
if unknown:
    ap.error(f"--shapes: unknown {sorted(unknown)}; expected names from {', '.join(SHAPES)}")
out = {"checks": [], "timing": {}}
def qkv(t, h, d, layout, seed):
    shape = (1, t, h, d) if layout == "bthd" else (1, h, t, d)
    return [jax.random.normal(k, shape, jnp.bfloat16) for k in jax.random.split(jax.random.PRNGKey(seed), 3)]
CHECKS = ((941, 2, 64, "bthd"), (2245, 2, 128, "bhtd"), (4608, 2, 128, "bthd"))
for (t, h, d, layout) in (() if args.no_checks else CHECKS):
    q, k, v = qkv(t, h, d, layout, t)
    st = pj.block_statistics(q, k, v, block_size=128, with_norms=True, layout=layout, implementation="reference")
    se = pj.select_blocks(st, density=0.15, use_bias=True, implementation="reference")
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    rst = pj.block_statistics(*f32, block_size=128, with_norms=True, layout=layout, implementation="reference")
    for order in (1, 0, -1):
        o = jax.jit(lambda q, k, v, st, se: mosaic(q, k, v, st, se, scale=d ** -0.5, order=order, layout=layout))(q, k, v, st, se)
        ref = pj.piecewise_attention(*f32, rst, se, order=order, layout=layout, implementation="reference")
        e = float(relative_error(o, ref))
        out["checks"].append(dict(t=t, d=d, layout=layout, order=order, rel_err=e))
        print("check", t, d, layout, order, f"{e:.2e}", flush=True)
for name in args.shapes.split(","):
    t, h = SHAPES[name]
    D = 128
    q, k, v = qkv(t, h, D, "bthd", t)
    r = {}
    cud = jax.jit(lambda q, k, v: pj.dense_attention(q, k, v, implementation="cudnn"))
    r["cudnn_ms"] = time_per_call(cud, q, k, v) * 1e3
    dense = cud(q, k, v)
    for bs in (64, 128):
        st = jax.jit(lambda q, k, v: pj.block_statistics(q, k, v, block_size=bs, with_norms=True))(q, k, v)
        se = jax.jit(lambda s: pj.select_blocks(s, density=0.15, use_bias=True))(st)
        kk = se.indices.shape[-1]; flops = 4.0 * t * kk * bs * D * h
        for impl in ("mosaic", "triton"):
            op = jax.jit(lambda q, k, v, impl=impl: pj.piecewise_sparse_attention(
                q, k, v, density=0.15, block_size=bs, use_bias=True, implementation=impl))
            r[f"b{bs} {impl} whole op ms"] = ms = time_per_call(op, q, k, v) * 1e3
            print(name, bs, impl, "whole op", f"{ms:.3f} ms", flush=True)
        variants = [("mosaic", mosaic), ("triton", triton)]
        if bs == 128:   # the block-128 kernel's launch options
            variants += [(f"mosaic {label}", functools.partial(mosaic, config=cfg))
                         for label, cfg in (("ping-pong", MosaicConfig(ping_pong=True)),)]
        for impl, fn in variants:
            for order in (-1, 1):
                f = jax.jit(lambda q, k, v, st, se, fn=fn, order=order: fn(q, k, v, st, se, scale=D ** -0.5, order=order, layout="bthd"))
                ms = time_per_call(f, q, k, v, st, se) * 1e3
                r[f"b{bs} {impl} order {order} ms"] = ms
                if order == 1:
                    r[f"b{bs} {impl} order 1 error vs dense"] = float(relative_error(f(q, k, v, st, se), dense))
                if order == -1:
                    r[f"b{bs} {impl} exact TFLOP/s"] = flops / ms / 1e9
                print(name, bs, impl, order, f"{ms:.3f} ms", f"{flops/ms/1e9:.0f} TFLOP/s" if order == -1 else "", flush=True)
    print(name, "cudnn", f"{r['cudnn_ms']:.3f}", flush=True)
    out["timing"][name] = r
    json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "probe128.json"), "w"), indent=1)
