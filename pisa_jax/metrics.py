"""Error measure used by the demo, the benchmarks and the tests."""

from __future__ import annotations

import numpy as np


def relative_error(out, ref) -> float:
    """`||out - ref|| / ||ref||` in float64 (Frobenius norm over all elements)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: out {out.shape}, ref {ref.shape}")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
