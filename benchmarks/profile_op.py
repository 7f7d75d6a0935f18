"""GPU time of every kernel in the whole PISA op, from a profiler trace.

    python benchmarks/profile_op.py [--shapes flux-2048,seq-32k] [--density 0.15]
        [--no-bias] [--block-size 64] [--calls 20] [--dense] [--out profile.json]

Wall-clock timing of a small stage (statistics, selection) can be bound by dispatching
it from Python; this script instead traces `--calls` calls of the jitted op (statistics +
selection + attention) and adds up each GPU kernel's own duration from the trace, so
the per-stage figures are device times and sum to the op's GPU time. With --dense it also
traces cuDNN dense attention on the same inputs and times both ops by wall clock, so the
speedup can be read both ways: GPU time over GPU time and wall clock over wall clock.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import pisa_jax as pj  # noqa: E402
from benchmarks.attention import SHAPES, inputs, timeit  # noqa: E402
from pisa_jax.cli import int_at_least  # noqa: E402


def kernel_times(fn, args, calls: int) -> tuple[dict[str, float], float]:
    """Mean GPU microseconds per call of `fn(*args)`, per kernel name, and the mean span
    per call from the first kernel's start to the last one's end (busy plus idle)."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError(f"the profiler wrote no trace under {tmp}")
        data = jax.profiler.ProfileData.from_file(paths[0])
    return gpu_kernel_times(data.planes, calls)


def gpu_kernel_times(planes, calls: int) -> tuple[dict[str, float], float]:
    """Per-kernel mean microseconds and mean span per call from a trace's planes."""
    totals: dict[str, float] = collections.defaultdict(float)
    first, last = float("inf"), 0.0
    for plane in planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            # One line per CUDA stream holds the kernels; the other lines group them.
            if not line.name.startswith("Stream"):
                continue
            for event in line.events:
                totals[event.name] += event.duration_ns / 1e3 / calls
                first = min(first, event.start_ns)
                last = max(last, event.start_ns + event.duration_ns)
    if not totals:
        lines = [(pl.name, ln.name) for pl in planes for ln in pl.lines]
        raise RuntimeError(f"the trace holds no GPU kernel events (is a GPU visible?); "
                           f"planes and lines: {lines[:40]}")
    return dict(totals), (last - first) / 1e3 / calls


def stage_of(kernel: str) -> str:
    # Mosaic GPU kernels show up in traces as "entry_mosaic_gpu_kernel", whatever their
    # call's name; in the whole op the only one is the attention kernel.
    for prefix, stage in (("pisa_block_statistics", "statistics"), ("pisa_top_k", "top-k"),
                          ("pisa_piecewise_attention", "attention kernel"),
                          ("mosaic_gpu_kernel", "attention kernel")):
        if prefix in kernel:
            return stage
    return "XLA (scores, bias, padding, bit mask, sums)"


def dense_comparison(op, args, op_gpu_ms: float, calls: int) -> dict:
    """cuDNN dense attention's GPU time (same trace method) and both ops' wall clock."""
    dense = jax.jit(lambda q, k, v: pj.dense_attention(q, k, v, implementation="cudnn"))
    dense_us, _ = kernel_times(dense, args, calls)
    dense_gpu_ms = sum(dense_us.values()) / 1e3
    op_wall_ms, dense_wall_ms = timeit(op, *args) * 1e3, timeit(dense, *args) * 1e3
    row = {"dense_gpu_ms": dense_gpu_ms, "dense_wall_ms": dense_wall_ms,
           "op_wall_ms": op_wall_ms, "speedup_gpu_time": dense_gpu_ms / op_gpu_ms,
           "speedup_wall_clock": dense_wall_ms / op_wall_ms}
    print(f"  cuDNN dense: {dense_gpu_ms:.3f} ms GPU, {dense_wall_ms:.3f} ms wall; op "
          f"{op_gpu_ms:.3f} ms GPU, {op_wall_ms:.3f} ms wall; speedup "
          f"{row['speedup_gpu_time']:.2f}x (GPU time), {row['speedup_wall_clock']:.2f}x (wall)")
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="flux-2048,seq-32k")
    p.add_argument("--density", type=float, default=0.15)
    p.add_argument("--no-bias", action="store_true")
    p.add_argument("--block-size", type=int, default=64, choices=(64, 128))
    p.add_argument("--calls", type=int_at_least(1), default=20)
    p.add_argument("--dense", action="store_true",
                   help="also trace and time cuDNN dense attention; report both speedups")
    p.add_argument("--out", default=None, help="write the per-kernel times as JSON here")
    args = p.parse_args(argv)
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        p.error(f"unknown shapes {sorted(unknown)}; expected some of {list(SHAPES)}")
    if not 0.0 < args.density <= 1.0:
        p.error(f"--density: expected a number in (0, 1]; got {args.density}")
    use_bias = not args.no_bias

    @jax.jit
    def op(q, k, v):
        st = pj.block_statistics(q, k, v, block_size=args.block_size, with_norms=use_bias)
        sel = pj.select_blocks(st, density=args.density, use_bias=use_bias)
        return pj.piecewise_attention(q, k, v, st, sel)

    results = {}
    for shape in args.shapes.split(","):
        t, h = SHAPES[shape]
        qkv = inputs(t, h)
        times, span = kernel_times(op, qkv, args.calls)
        stages: dict[str, float] = collections.defaultdict(float)
        for name, us in times.items():
            stages[stage_of(name)] += us
        total = sum(times.values())
        print(f"\n{shape} (T = {t}, H = {h}, density {args.density}, bias {use_bias}, "
              f"block {args.block_size}): {total / 1e3:.3f} ms of GPU time per call, "
              f"{span / 1e3:.3f} ms from first kernel start to last kernel end")
        for stage, us in sorted(stages.items(), key=lambda kv: -kv[1]):
            print(f"  {stage:<45} {us / 1e3:8.3f} ms  {100 * us / total:5.1f}%")
        print("  kernels:")
        for name, us in sorted(times.items(), key=lambda kv: -kv[1]):
            print(f"    {name[:60]:<60} {us:9.1f} us")
        results[shape] = {"total_ms": total / 1e3, "span_ms": span / 1e3,
                          "stages_ms": {k: v / 1e3 for k, v in stages.items()},
                          "kernels_us": times}
        if args.dense:
            results[shape]["dense"] = dense_comparison(op, qkv, total / 1e3, args.calls)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(jax.devices()[0].device_kind), "density": args.density,
                       "bias": use_bias, "block_size": args.block_size, "results": results},
                      f, indent=1)


if __name__ == "__main__":
    main()
