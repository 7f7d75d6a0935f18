"""The Mosaic GPU attention kernel against the Triton kernel and cuDNN, on one Hopper GPU.

    python benchmarks/mosaic.py [--shapes flux-1024,flux-2048,seq-32k,wan-720p]
        [--out mosaic.json] [--no-timing] [--memory-only [--block-size 64|128]]

Per shape (bf16, batch 1, D = 128, density 0.15 with biased selection, layout bthd):
correctness first (the Mosaic output against a float32 reference with the same
selection, over a few query-row windows of two heads, and against the Triton kernel over
everything), then times (median of repeated calls): cuDNN dense, the attention kernel alone
(Triton, Mosaic; also the exact path alone, order -1), and the whole op (statistics +
selection + attention) with either kernel. --memory-only: the whole op's extra device
memory with either kernel instead (XLA's plan of the compiled op). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import pisa_jax as pj  # noqa: E402
from pisa_jax import reference  # noqa: E402
from pisa_jax._blocks import block_lengths  # noqa: E402
from benchmarks.attention import D, SHAPES, timeit  # noqa: E402
from pisa_jax.cli import int_at_least, writable_file  # noqa: E402
from pisa_jax.kernels.pallas_mosaic_gpu import MosaicConfig  # noqa: E402
from pisa_jax.kernels.pallas_mosaic_gpu import piecewise_attention as mosaic_attention  # noqa: E402
from pisa_jax.kernels.pallas_triton import piecewise_attention as triton_kernel  # noqa: E402
from pisa_jax.metrics import relative_error  # noqa: E402

SCALE = D ** -0.5


@functools.partial(jax.jit, static_argnames=("head", "first", "rows", "order"))
def reference_rows(q, k, v, stats, selection, head: int, first: int, rows: int, order: int):
    """PISA_SPEC section 3 in float32 for query rows [first, first + rows) of one head
    (batch 0, bthd inputs): the reference's formula on a window, so long sequences fit."""
    bs, t = stats.block_size, q.shape[1]
    qf = q[0, first:first + rows, head].astype(jnp.float32)
    kf, vf = k[0, :, head].astype(jnp.float32), v[0, :, head].astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    chosen = selection.mask()[0, head][(first + jnp.arange(rows)) // bs]       # [rows, NT]
    a = jnp.where(chosen[:, jnp.arange(t) // bs], SCALE * jnp.dot(qf, kf.T, precision=hi),
                  -jnp.inf)
    m = a.max(-1)
    if order >= 0:
        bl = jnp.where(chosen, -jnp.inf, SCALE * jnp.dot(qf, stats.k_mean[0, head].T,
                                                          precision=hi))
        m = jnp.maximum(m, bl.max(-1))
    ea = jnp.exp(a - m[:, None])
    num, den = jnp.dot(ea, vf, precision=hi), ea.sum(-1)
    if order >= 0:
        eb = jnp.exp(bl - m[:, None])
        lengths = jnp.asarray(block_lengths(t, bs), jnp.float32)
        g = eb @ lengths
        num = num + jnp.dot(eb, stats.v_sum[0, head], precision=hi)
        den = den + g
        if order == 1:
            first_order = SCALE * jnp.dot(qf, stats.moment[0, head], precision=hi)
            num = num + (g / t)[:, None] * first_order
    return num / den[:, None]


def check(name, q, k, v, stats_half, sel, order, mosaic_out, triton_out):
    """Relative errors of the Mosaic output: windows vs float32 reference, all vs Triton."""
    t, h = q.shape[1], q.shape[2]
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_stats = jax.jit(lambda q, k, v: reference.block_statistics(
        *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), block_size=64, with_norms=False))(*f32)
    windows = [(hd, r0) for hd in (0, h - 1) for r0 in (0, t - 700)]
    errs = []
    for hd, r0 in windows:
        ref = reference_rows(q, k, v, ref_stats, sel, head=hd, first=r0, rows=700, order=order)
        errs.append(relative_error(mosaic_out[0, r0:r0 + 700, hd], ref))
    finite = bool(jnp.all(jnp.isfinite(mosaic_out.astype(jnp.float32))))
    r = {"max_rel_err_vs_f32_reference": max(errs), "rel_err_windows": errs, "finite": finite}
    if triton_out is not None:
        a, b = mosaic_out.astype(jnp.float32), triton_out.astype(jnp.float32)
        r["rel_diff_vs_triton"] = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    print(f"{name} order {order}: max rel err vs f32 reference (4 windows x 700 rows) "
          f"{max(errs):.2e}, vs Triton (all) {r.get('rel_diff_vs_triton', float('nan')):.2e}, "
          f"finite {finite}", flush=True)
    return r


def run_shape(name, timing: bool, config):
    t, h = SHAPES[name]
    ks = jax.random.split(jax.random.PRNGKey(t), 3)
    q, k, v = [jax.random.normal(x, (1, t, h, D), jnp.bfloat16) for x in ks]
    stats_fn = jax.jit(lambda q, k, v: pj.block_statistics(q, k, v, with_norms=True))
    select_fn = jax.jit(lambda s: pj.select_blocks(s, density=0.15, use_bias=True))
    stats = stats_fn(q, k, v)
    sel = select_fn(stats)
    kernels = {
        "triton": lambda order: jax.jit(lambda q, k, v, st, se: triton_kernel.piecewise_attention(
            q, k, v, st, se, scale=SCALE, order=order, layout="bthd", interpret=False)),
        "mosaic": lambda order: jax.jit(lambda q, k, v, st, se: mosaic_attention(
            q, k, v, st, se, scale=SCALE, order=order, layout="bthd", config=config)),
        "mosaic_ping_pong": lambda order: jax.jit(lambda q, k, v, st, se: mosaic_attention(
            q, k, v, st, se, scale=SCALE, order=order, layout="bthd",
            config=MosaicConfig(ping_pong=True))),
    }
    r = {"T": t, "H": h, "num_selected": int(sel.indices.shape[-1]), "checks": {}}
    triton_out = kernels["triton"](1)(q, k, v, stats, sel)
    for which, order in (("mosaic", 1), ("mosaic", -1), ("mosaic_ping_pong", 1)):
        t0 = time.perf_counter()
        mo = jax.block_until_ready(kernels[which](order)(q, k, v, stats, sel))
        compile_s = time.perf_counter() - t0
        key = f"{which} order {order}"
        r["checks"][key] = check(f"{name} {which}", q, k, v, stats, sel, order, mo,
                                 triton_out if order == 1 else None)
        r["checks"][key]["first_call_s"] = compile_s
    if timing:
        cudnn = jax.jit(lambda q, k, v: pj.dense_attention(q, k, v, implementation="cudnn"))
        r["cudnn_ms"] = timeit(cudnn, q, k, v) * 1e3
        for which, make in kernels.items():
            r[f"{which}_attention_ms"] = timeit(make(1), q, k, v, stats, sel) * 1e3
            r[f"{which}_exact_path_ms"] = timeit(make(-1), q, k, v, stats, sel) * 1e3
            if which == "mosaic_ping_pong":   # whole op: the other stages as timed for mosaic
                continue
            kernel = make(1)
            whole = jax.jit(lambda q, k, v, kernel=kernel: kernel(
                q, k, v, *(lambda s: (s, select_fn(s)))(stats_fn(q, k, v))))
            r[f"{which}_whole_op_ms"] = timeit(whole, q, k, v) * 1e3
        exact_flops = 4.0 * t * r["num_selected"] * 64 * D * h
        r["cudnn_tflops"] = 4.0 * t * t * D * h / r["cudnn_ms"] / 1e9
        for which in kernels:
            r[f"{which}_exact_path_tflops"] = exact_flops / r[f"{which}_exact_path_ms"] / 1e9
        r["mosaic_ping_pong_whole_op_ms_derived"] = (
            r["mosaic_whole_op_ms"] - r["mosaic_attention_ms"] + r["mosaic_ping_pong_attention_ms"])
        for which in ("triton", "mosaic"):
            r[f"{which}_whole_op_speedup_over_cudnn"] = r["cudnn_ms"] / r[f"{which}_whole_op_ms"]
        print(f"{name}: cuDNN {r['cudnn_ms']:.3f} ms | attention kernel Triton "
              f"{r['triton_attention_ms']:.3f} Mosaic {r['mosaic_attention_ms']:.3f} ms | "
              f"exact path Triton {r['triton_exact_path_ms']:.3f} "
              f"({r['triton_exact_path_tflops']:.0f} TFLOP/s) Mosaic "
              f"{r['mosaic_exact_path_ms']:.3f} ({r['mosaic_exact_path_tflops']:.0f}) | whole op "
              f"Triton {r['triton_whole_op_ms']:.3f} ({r['triton_whole_op_speedup_over_cudnn']:.2f}x)"
              f" Mosaic {r['mosaic_whole_op_ms']:.3f} "
              f"({r['mosaic_whole_op_speedup_over_cudnn']:.2f}x) | ping-pong: attention "
              f"{r['mosaic_ping_pong_attention_ms']:.3f} exact path "
              f"{r['mosaic_ping_pong_exact_path_ms']:.3f} "
              f"({r['mosaic_ping_pong_exact_path_tflops']:.0f})", flush=True)
    return r


def memory_rows(name, block_size=64):
    """The whole op's extra device memory, Triton and Mosaic: XLA's temporary bytes for the
    compiled op (lowered from shapes only; nothing runs) over the bytes of q, k and v."""
    t, h = SHAPES[name]
    spec = jax.ShapeDtypeStruct((1, t, h, D), jnp.bfloat16)
    qkv = 3 * t * h * D * 2
    r = {"qkv_bytes": qkv, "block_size": block_size}
    for impl in ("triton", "mosaic"):
        op = jax.jit(functools.partial(pj.piecewise_sparse_attention, density=0.15,
                                       use_bias=True, block_size=block_size,
                                       implementation=impl))
        temp = op.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes
        r[impl] = {"temp_bytes": int(temp), "fraction_of_qkv": temp / qkv}
    print(f"{name}, block {block_size}: extra memory of the whole op, Triton {r['triton']['fraction_of_qkv']:.1%}"
          f", Mosaic {r['mosaic']['fraction_of_qkv']:.1%} of q, k and v", flush=True)
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--out", default="mosaic.json", type=writable_file)
    p.add_argument("--no-timing", action="store_true", help="correctness checks only")
    p.add_argument("--memory-only", action="store_true",
                   help="only the whole op's extra device memory, Triton and Mosaic")
    p.add_argument("--block-size", type=int, default=64, choices=(64, 128),
                   help="block size of the memory measurement (--memory-only)")
    p.add_argument("--stages", type=int_at_least(1), default=None,
                   help="pipeline stages per warpgroup (default: the deepest that fits)")
    p.add_argument("--query-blocks-per-cta", type=int, default=2, choices=(1, 2))
    args = p.parse_args(argv)
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; expected names from {list(SHAPES)}")
    config = None
    if args.stages is not None or args.query_blocks_per_cta != 2:
        config = MosaicConfig(stages=2 if args.stages is None else args.stages,
                              query_blocks_per_cta=args.query_blocks_per_cta)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, config {config}",
          flush=True)
    results = {}
    for name in shapes:
        try:
            results[name] = (memory_rows(name, args.block_size) if args.memory_only else
                             run_shape(name, not args.no_timing, config))
        except Exception as e:   # report and go on: one failing shape must not hide the rest
            msg = f"{type(e).__name__}: {e}"
            print(f"{name} FAILED: {msg[:3000]}", flush=True)
            results[name] = {"error": msg[:20000]}
        with open(args.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                       "config": str(config), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
