"""Argument checks of the public boundary: each names the argument, what was expected
and what was given. Used by `pisa_jax.api` and `pisa_jax.nn`."""

from __future__ import annotations

import math
import numbers

import jax.numpy as jnp

from pisa_jax._blocks import LAYOUTS, default_scale, token_axis

ORDERS = (1, 0, -1)


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")


def check_qkv(q, k, v, layout: str, *, self_attention: bool) -> tuple[int, int, int, int]:
    """Returns (B, T, H, D) after checking ranks, dtypes and shapes."""
    check_choice("layout", layout, LAYOUTS)
    dims = "[B, T, H, D]" if layout == "bthd" else "[B, H, T, D]"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array; got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions {dims} for layout {layout!r}; "
                             f"got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype; got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape {dims}; got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    ta = token_axis(layout)
    ha = 3 - ta
    if self_attention and q.shape[ta] != k.shape[ta]:
        raise ValueError(f"q and k/v must have the same sequence length (self-attention); "
                         f"got {q.shape[ta]} and {k.shape[ta]} (layout {layout!r})")
    if (q.shape[0], q.shape[ha], q.shape[3]) != (k.shape[0], k.shape[ha], k.shape[3]):
        raise ValueError(f"q and k/v must agree in batch, heads and head dim {dims}; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    return q.shape[0], q.shape[ta], q.shape[ha], q.shape[3]


def check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"density must be a real number in (0, 1]; got {density!r}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1]; got {density!r}")
    return float(density)


def check_block_size(block_size) -> int:
    if (isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral)
            or block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a power of two >= 16; got {block_size!r}")
    return int(block_size)


def check_scale(scale, head_dim: int) -> float:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be None or a finite positive number; got {scale!r}")
    return default_scale(head_dim, scale)


def check_forced(forced_blocks, nt: int) -> tuple[int, ...]:
    if forced_blocks is None:
        return ()
    try:
        items = tuple(forced_blocks)
    except TypeError:
        raise TypeError(f"forced_blocks must be None or a sequence of block indices; "
                        f"got {forced_blocks!r}") from None
    for j in items:
        if isinstance(j, bool) or not isinstance(j, numbers.Integral):
            raise TypeError(f"forced_blocks must hold integers; got {j!r} in {items!r}")
        if not -nt <= j < nt:
            raise ValueError(f"forced_blocks must lie in [0, {nt}) for {nt} blocks "
                             f"(negative counts from the end); got {j} in {items!r}")
    return tuple(sorted({int(j) % nt for j in items}))
