"""Measures used by the demo, the benchmarks and the tests: relative error and time per call."""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np


def relative_error(out, ref) -> float:
    """`||out - ref|| / ||ref||` in float64 (Frobenius norm over all elements)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: out {out.shape}, ref {ref.shape}")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def time_per_call(fn, *args, reps: int = 7, target_s: float = 0.05) -> float:
    """Median seconds per call of `fn(*args)` after a first (compiling) call.

    Each of `reps` repetitions queues enough calls back to back to last about `target_s`
    (1 to 200) and waits for the last one, so short calls are not timed by their launch
    latency alone. Raises ValueError for `reps` < 1 or a negative `target_s`.
    """
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be an integer >= 1; got {reps!r}")
    if not target_s >= 0:
        raise ValueError(f"target_s must be a number >= 0 (seconds); got {target_s!r}")
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    iters = max(1, min(200, int(target_s / max(one, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)
