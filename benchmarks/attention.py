"""PISA kernels against dense attention on one GPU, side by side in one run.

    python benchmarks/attention.py [--shapes flux-1024,flux-2048,seq-32k,wan-720p]
        [--densities 0.10,0.15,0.25] [--sweep] [--out benchmarks/out]

Times (median of repeated calls after warm-up, bf16, batch 1, D = 128): JAX cuDNN dense
attention, Pallas Triton flash attention (best of 3 block configs), and the whole PISA op
(statistics + selection + attention) with and without biased selection on the Triton
backend and, where Pallas Mosaic GPU runs (Hopper), with `implementation="mosaic"` (its
rows are skipped with the reason elsewhere), plus the time of each stage at density 0.15
and the op's extra device memory. Writes a table to stdout, `attention.json` and
`attention.png` to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import pisa_jax as pj  # noqa: E402
from pisa_jax.cli import comma_list  # noqa: E402
from pisa_jax.kernels.dispatch import mosaic_unavailable  # noqa: E402
from pisa_jax.kernels.pallas_triton import LaunchConfig  # noqa: E402
from pisa_jax.kernels.pallas_triton import block_statistics as stats_kernel  # noqa: E402
from pisa_jax.kernels.pallas_triton import piecewise_attention as attn_kernel  # noqa: E402
from pisa_jax.metrics import time_per_call  # noqa: E402

SHAPES = {"flux-1024": (4608, 24), "flux-2048": (16896, 24), "seq-32k": (32768, 24),
          "wan-720p": (75776, 40)}
# The published Triton kernel's times (ms) and cuDNN's, from the same day (ANCHORS.md).
PUBLISHED_SPEEDUP_015 = {"flux-1024": "~1.0x", "flux-2048": "2.7x", "seq-32k": "3.4x",
                         "wan-720p": "2.6-2.9x"}
D = 128


# Median seconds per call, calls queued back to back (the library's own timing loop).
timeit = time_per_call


def inputs(t, h, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(k, (1, t, h, D), jnp.bfloat16) for k in ks]


def dense_flops(t, h):
    return 4.0 * t * t * D * h


FLASH_CONFIGS = ((128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3))


def pallas_flash_rows(q, k, v, configs=FLASH_CONFIGS):
    """Pallas Triton flash attention per (block_q, block_k, warps, stages): ms per config."""
    from jax.experimental.pallas.ops.gpu import attention as flash
    rows = []
    for bq, bk, warps, stages in configs:
        fn = jax.jit(lambda q, k, v, bq=bq, bk=bk, w=warps, s=stages: flash.mha(
            q, k, v, None, sm_scale=D ** -0.5,
            block_sizes=flash.BlockSizes(block_q=bq, block_k=bk), num_warps=w, num_stages=s))
        try:
            ms = timeit(fn, q, k, v) * 1e3
        except Exception as e:  # a config Triton cannot build is skipped, not fatal
            print(f"  pallas flash {bq}x{bk} w{warps} s{stages} failed: {type(e).__name__}")
            continue
        rows.append({"block_q": bq, "block_k": bk, "num_warps": warps, "num_stages": stages,
                     "ms": ms})
    return rows


def pallas_flash(q, k, v):
    """Best of FLASH_CONFIGS (ms), or None if none built."""
    return min((r["ms"] for r in pallas_flash_rows(q, k, v)), default=None)


def attention_kernel_fn(config, order=1):
    """The piecewise attention kernel alone, jitted, for precomputed stats and selection."""
    return jax.jit(lambda q, k, v, st, se: attn_kernel.piecewise_attention(
        q, k, v, st, se, scale=D ** -0.5, order=order, layout="bthd", interpret=False,
        config=config))


def pisa_fn(density, use_bias, config=None):
    def run(q, k, v):
        stats = stats_kernel.block_statistics(q, k, v, block_size=64, with_norms=use_bias,
                                              layout="bthd", interpret=False)
        sel = pj.select_blocks(stats, density=density, use_bias=use_bias)
        return attn_kernel.piecewise_attention(q, k, v, stats, sel, scale=D ** -0.5, order=1,
                                               layout="bthd", interpret=False, config=config)
    return jax.jit(run)


def mosaic_fn(density, use_bias):
    """The whole op through the public API with the Mosaic GPU attention kernel."""
    return jax.jit(lambda q, k, v: pj.piecewise_sparse_attention(
        q, k, v, density=density, use_bias=use_bias, implementation="mosaic"))


def stage_times(q, k, v, density, use_bias, implementation="triton"):
    impl = dict(implementation=implementation)
    st = jax.jit(lambda q, k, v: pj.block_statistics(q, k, v, with_norms=use_bias, **impl))
    stats = st(q, k, v)
    se = jax.jit(lambda s: pj.select_blocks(s, density=density, use_bias=use_bias, **impl))
    sel = se(stats)
    at = jax.jit(lambda q, k, v, s, c: pj.piecewise_attention(q, k, v, s, c, **impl))
    exact_only = jax.jit(lambda q, k, v, s, c: pj.piecewise_attention(q, k, v, s, c, order=-1,
                                                                      **impl))
    return {"statistics_ms": timeit(st, q, k, v) * 1e3,
            "selection_ms": timeit(se, stats) * 1e3,
            "attention_ms": timeit(at, q, k, v, stats, sel) * 1e3,
            "exact_path_ms": timeit(exact_only, q, k, v, stats, sel) * 1e3}


def extra_memory(q, k, v, density, use_bias):
    compiled = pisa_fn(density, use_bias).lower(q, k, v).compile()
    mem = compiled.memory_analysis()
    qkv = 3 * q.size * q.dtype.itemsize
    return {"temp_bytes": int(mem.temp_size_in_bytes), "qkv_bytes": int(qkv),
            "fraction_of_qkv": mem.temp_size_in_bytes / qkv}


def mosaic_rows(q, k, v, densities):
    """Whole op with implementation="mosaic" per density (ms), and its stages at 0.15 with
    bias; a failure is reported in the results, not raised, so the other rows survive."""
    try:
        rows = {str(dn): {("bias" if b else "no_bias"): timeit(mosaic_fn(dn, b), q, k, v) * 1e3
                          for b in (False, True)} for dn in densities}
        return {"pisa_mosaic": rows,
                "mosaic_stages_d0.15_bias": stage_times(q, k, v, 0.15, True, "mosaic")}
    except Exception as e:   # noqa: BLE001 - reported next to the figures
        msg = f"{type(e).__name__}: {e}"
        print(f"  Mosaic rows failed: {msg[:500]}", flush=True)
        return {"mosaic_error": msg[:5000]}


# Launch configurations tried by --sweep: (warps, stages, zeroth chunk, indices in registers).
SWEEP = [(4, 3, 64, True), (4, 2, 64, False), (4, 3, 32, True), (4, 3, 16, True)]


def sweep(q, k, v, configs=SWEEP):
    """Whole op and the attention kernel alone at density 0.15 with bias, per config."""
    stats = stats_kernel.block_statistics(q, k, v, block_size=64, with_norms=True,
                                          layout="bthd", interpret=False)
    sel = pj.select_blocks(stats, density=0.15, use_bias=True)
    rows, first = [], None
    for warps, stages, chunk, in_registers in configs:
        cfg = LaunchConfig(num_warps=warps, num_stages=stages, zeroth_chunk=chunk,
                           indices_in_registers=in_registers)
        kernel_only = attention_kernel_fn(cfg)
        try:
            out = kernel_only(q, k, v, stats, sel)
            kernel_ms = timeit(kernel_only, q, k, v, stats, sel) * 1e3
            ms = timeit(pisa_fn(0.15, True, cfg), q, k, v) * 1e3
        except Exception as e:
            print(f"  config {cfg} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        # Every config computes the same thing: its output against the first config's.
        first = out if first is None else first
        a, b = out.astype(jnp.float32), first.astype(jnp.float32)
        diff = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        rows.append({**dataclasses.asdict(cfg), "ms": ms, "attention_kernel_ms": kernel_ms,
                     "relative_difference_to_first": diff})
        print(f"  sweep {cfg}: whole op {ms:.3f} ms, attention kernel {kernel_ms:.3f} ms, "
              f"difference to the first config {diff:.2e}", flush=True)
    return rows


def sweep_statistics(q, k, v, configs=((4, 1), (4, 2), (8, 1), (8, 2), (8, 3))):
    rows = []
    for warps, stages in configs:
        cfg = LaunchConfig(num_warps=warps, num_stages=stages)
        fn = jax.jit(lambda q, k, v, cfg=cfg: stats_kernel.block_statistics(
            q, k, v, block_size=64, with_norms=True, layout="bthd", interpret=False, config=cfg))
        try:
            ms = timeit(fn, q, k, v) * 1e3
        except Exception as e:
            print(f"  statistics {cfg} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        rows.append({**dataclasses.asdict(cfg), "ms": ms})
        print(f"  statistics w{warps} s{stages}: {ms:.3f} ms", flush=True)
    return rows


def plot(results, path, device=None):
    """Speedup over cuDNN per shape and density; `device` names the GPU in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    dens = sorted({float(d) for r in results.values() for d in r["pisa"]})
    series = [(f"Triton d={dn}" + (" bias" if b else ""), "pisa", str(dn), b)
              for dn in dens for b in (False, True)]
    if any("pisa_mosaic" in r for r in results.values()):
        series += [(f"Mosaic d={dn} bias", "pisa_mosaic", str(dn), True) for dn in dens]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(series)
    for n, (label, key, dn, bias) in enumerate(series):
        ys = [results[s]["cudnn_ms"] / results[s][key][dn]["bias" if bias else "no_bias"]
              if key in results[s] else 0.0 for s in names]
        ax.bar(np.arange(len(names)) + (n - len(series) / 2) * width + width / 2, ys, width,
               label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("speedup over JAX cuDNN dense")
    device = device or jax.devices()[0].device_kind
    ax.set_title(f"PISA (Pallas Triton, Mosaic GPU) on {device}, bf16, D=128")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--densities", default=(0.10, 0.15, 0.25),
                   type=comma_list(float, "comma-separated numbers in (0, 1]",
                                   lambda d: 0 < d <= 1))
    p.add_argument("--sweep", action="store_true", help="also time launch configs")
    p.add_argument("--sweep-only", action="store_true",
                   help="time launch configs only (no density grid, stages or memory)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = p.parse_args(argv)
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; expected names from {list(SHAPES)}")
    densities = list(args.densities)
    os.makedirs(args.out, exist_ok=True)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    no_mosaic = mosaic_unavailable()
    if no_mosaic and not args.sweep_only:
        print(f"Mosaic rows skipped: {no_mosaic}", flush=True)

    results = {}
    for name in shapes:
        t, h = SHAPES[name]
        q, k, v = inputs(t, h)
        cudnn = jax.jit(lambda q, k, v: pj.dense_attention(q, k, v, implementation="cudnn"))
        r = {"T": t, "H": h, "cudnn_ms": timeit(cudnn, q, k, v) * 1e3}
        r["cudnn_tflops"] = dense_flops(t, h) / r["cudnn_ms"] / 1e9
        if args.sweep_only:
            print(f"{name}: cuDNN {r['cudnn_ms']:.3f} ms", flush=True)
            r["sweep_d0.15_bias"] = sweep(q, k, v)
            r["sweep_statistics"] = sweep_statistics(q, k, v)
            results[name] = r
            continue
        r["pallas_flash_ms"] = pallas_flash(q, k, v)
        r["pisa"] = {}
        for dn in densities:
            r["pisa"][str(dn)] = {
                ("bias" if b else "no_bias"): timeit(pisa_fn(dn, b), q, k, v) * 1e3
                for b in (False, True)}
        if not no_mosaic:
            r.update(mosaic_rows(q, k, v, densities))
        r["stages_d0.15_bias"] = stage_times(q, k, v, 0.15, True)
        r["memory_d0.15_bias"] = extra_memory(q, k, v, 0.15, True)
        if args.sweep:
            r["sweep_d0.15_bias"] = sweep(q, k, v)
            r["sweep_statistics"] = sweep_statistics(q, k, v)
        results[name] = r
        print(json.dumps({name: r}), flush=True)
        del q, k, v

    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                   "results": results}, f, indent=1)
    if args.sweep_only:
        return
    plot(results, os.path.join(args.out, "attention.png"))

    print(f"\n{'shape':10} {'cuDNN ms':>9} {'flash ms':>9} " + " ".join(
        f"{'d=' + str(d) + ('b' if b else ''):>9}" for d in densities for b in (False, True))
        + "  speedup@0.15b  mosaic@0.15b  published@0.15")
    for name, r in results.items():
        cells = " ".join(f"{r['pisa'][str(d)]['bias' if b else 'no_bias']:9.3f}"
                         for d in densities for b in (False, True))
        best = r["pisa"].get("0.15", {}).get("bias")
        sp = f"{r['cudnn_ms'] / best:12.2f}x" if best else " " * 13
        mosaic = r.get("pisa_mosaic", {}).get("0.15", {}).get("bias")
        msp = f"{r['cudnn_ms'] / mosaic:11.2f}x" if mosaic else f"{'n/a':>12}"
        flash = f"{r['pallas_flash_ms']:9.3f}" if r["pallas_flash_ms"] else "      n/a"
        print(f"{name:10} {r['cudnn_ms']:9.3f} {flash} {cells}  {sp}  {msp}  "
              f"{PUBLISHED_SPEEDUP_015[name]:>12}")
    print("\nstages at d=0.15 with bias (ms) and extra memory:")
    for name, r in results.items():
        s, m = r["stages_d0.15_bias"], r["memory_d0.15_bias"]
        print(f"{name:10} stats {s['statistics_ms']:.3f}  select {s['selection_ms']:.3f}  "
              f"attention {s['attention_ms']:.3f} (exact only {s['exact_path_ms']:.3f})  "
              f"extra mem {m['temp_bytes'] / 2**20:.0f} MiB = "
              f"{100 * m['fraction_of_qkv']:.1f}% of qkv")
        if "mosaic_stages_d0.15_bias" in r:
            s = r["mosaic_stages_d0.15_bias"]
            print(f"{'':10} Mosaic attention {s['attention_ms']:.3f} "
                  f"(exact only {s['exact_path_ms']:.3f})")


if __name__ == "__main__":
    main()
