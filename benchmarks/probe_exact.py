"""Where the exact path and the selection spend their time, on one shape.

    python benchmarks/probe_exact.py [--shape seq-32k] [--out probe.json]
    python benchmarks/probe_exact.py --shape wan-720p --selection

Default: times the attention kernel with only the exact path (order -1) for the
benchmark's selection, the same selection sorted, and one where every query block
selects the same first blocks (every key load an L2 hit), with the index row read per
step or once, against Pallas Triton dense flash attention per block config.
--selection: times `select_blocks` with the top-k kernel and with `lax.top_k` while
scoring 1, 2, 4, 8 or all heads at a time, and the whole op's extra memory for each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import pisa_jax as pj  # noqa: E402
from benchmarks.attention import (SHAPES, attention_kernel_fn, dense_flops,  # noqa: E402
                                  inputs, pallas_flash_rows, timeit)
from pisa_jax.kernels.pallas_triton import LaunchConfig  # noqa: E402
from pisa_jax.kernels.pallas_triton import block_statistics as stats_kernel  # noqa: E402


def selection_probe(t, h):
    import pisa_jax.selection as selection
    from benchmarks.attention import extra_memory
    q, k, v = inputs(t, h)
    stats = jax.jit(lambda q, k, v: pj.block_statistics(q, k, v, with_norms=True))(q, k, v)
    nt = stats.num_blocks
    default = selection._SCORE_ELEMENTS   # overridden per run, restored at the end
    for heads in (1, 2, 4, 8, h):
        selection._SCORE_ELEMENTS = heads * nt * nt
        for impl in ("triton", "reference"):
            fn = jax.jit(lambda s, impl=impl: pj.select_blocks(s, density=0.15, use_bias=True,
                                                               implementation=impl))
            ms = timeit(fn, stats) * 1e3
            print(json.dumps({"heads_per_step": heads, "implementation": impl,
                              "selection_ms": ms}), flush=True)
        mem = extra_memory(q, k, v, 0.15, True)
        print(json.dumps({"heads_per_step": heads, **mem}), flush=True)
    selection._SCORE_ELEMENTS = default


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="seq-32k", choices=list(SHAPES))
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--selection", action="store_true",
                   help="only time the selection with 1, 2, 4, 8 heads scored at a time")
    args = p.parse_args(argv)
    if args.selection:
        return selection_probe(*SHAPES[args.shape])
    t, h = SHAPES[args.shape]
    q, k, v = inputs(t, h)
    stats = stats_kernel.block_statistics(q, k, v, block_size=64, with_norms=True,
                                          layout="bthd", interpret=False)
    sel = pj.select_blocks(stats, density=0.15, use_bias=True)
    nt, top = sel.indices.shape[-2:]
    selections = {
        "benchmark": sel,
        "sorted": pj.Selection(jnp.sort(sel.indices, axis=-1), nt),
        "same_for_all": pj.Selection(jnp.broadcast_to(jnp.arange(top, dtype=jnp.int32),
                                                      sel.indices.shape), nt),
    }
    exact_flops = dense_flops(t, h) * top / nt
    res = {"shape": args.shape, "selected": top, "blocks": nt, "exact": [], "flash": []}
    for in_regs in (False, True):
        for stages in (2, 3):
            cfg = LaunchConfig(num_stages=stages, indices_in_registers=in_regs)
            for name, s in selections.items():
                ms = timeit(attention_kernel_fn(cfg, order=-1), q, k, v, stats, s) * 1e3
                row = {**dataclasses.asdict(cfg), "selection": name, "ms": ms,
                       "tflops": exact_flops / ms / 1e9}
                res["exact"].append(row)
                print(json.dumps(row), flush=True)
    for row in pallas_flash_rows(q, k, v, ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3),
                                           (128, 128, 8, 2), (64, 128, 4, 2))):
        row["tflops"] = dense_flops(t, h) / row["ms"] / 1e9
        res["flash"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
