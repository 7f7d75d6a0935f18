"""Compile time of the PISA op on one GPU: Triton against Mosaic GPU, per call site.

    python benchmarks/compile_time.py [--calls 1,8] [--block-size 64] [--cache-dir DIR]

One jitted function applies the whole op `n` times (to different inputs, flux-1024 shape,
bf16, density 0.15 with bias), so the time to lower and to compile it shows how the cost
grows with the number of attention layers in a model. With --cache-dir the JAX persistent
compilation cache is on (run twice to see a warm cache). Prints one JSON line per case.
JAX's caches are cleared between cases, but kernels compiled by an earlier case of the
same process may still be reused: for clean figures give one --calls value per process.
"""
import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import pisa_jax as pj  # noqa: E402
from pisa_jax.cli import comma_list  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", default=(1, 8), type=comma_list(int, "positive integers",
                                                              lambda n: n > 0))
    p.add_argument("--block-size", type=int, choices=(64, 128), default=64)
    p.add_argument("--implementations", default=("triton", "mosaic"),
                   type=comma_list(str, "triton, mosaic", lambda s: s in ("triton", "mosaic")))
    p.add_argument("--cache-dir", default=None, help="JAX persistent compilation cache")
    p.add_argument("--shared-trace", action="store_true",
                   help="call the op through one jax.jit-wrapped function, so every call "
                        "site reuses one trace")
    args = p.parse_args(argv)
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    t, h, d = 4608, 24, 128
    for impl in args.implementations:
        op = functools.partial(pj.piecewise_sparse_attention, density=0.15, use_bias=True,
                               block_size=args.block_size, implementation=impl)
        if args.shared_trace:
            op = jax.jit(op)
        for n in args.calls:
            def f(x, n=n, op=op):
                # n call sites, as n attention layers would be
                return jnp.stack([op(x[i, 0], x[i, 1], x[i, 2]) for i in range(n)])
            x = jax.random.normal(jax.random.PRNGKey(n), (n, 3, 1, t, h, d), jnp.bfloat16)
            jax.clear_caches()
            t0 = time.perf_counter()
            lowered = jax.jit(f).lower(x)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            jax.block_until_ready(compiled(x))
            t3 = time.perf_counter()
            print(json.dumps(dict(implementation=impl, calls=n, block_size=args.block_size,
                                  shared_trace=args.shared_trace,
                                  cache=bool(args.cache_dir), lower_s=round(t1 - t0, 2),
                                  compile_s=round(t2 - t1, 2), first_run_s=round(t3 - t2, 2))),
                  flush=True)


if __name__ == "__main__":
    main()
