"""Argument checks of the public boundary: each names the argument, what was expected
and what was given. Used by `pisa_jax.api` and `pisa_jax.nn`."""

from __future__ import annotations

import math
import numbers
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pisa_jax._blocks import LAYOUTS, default_scale, head_axis, num_blocks, token_axis

ORDERS = (1, 0, -1)
# Names of `implementation=`; what each runs is `pisa_jax.kernels.dispatch`'s table.
IMPLEMENTATIONS = ("auto", "triton", "mosaic", "reference")
# Old names still taken, with a DeprecationWarning: old -> new.
RENAMED_IMPLEMENTATIONS = {"pallas": "triton"}


def check_choice(name: str, value, allowed) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def real_number(name: str, value, expected: str) -> float:
    """A Python float from a real number or a concrete 0-d array (numpy or JAX).

    Options such as `density` and `scale` set static sizes and constants: a traced value
    (an argument of a jitted function) cannot be used, and is refused with that reason.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {expected}; got {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a concrete number ({expected}), known when the call "
                        f"is traced; got a traced array of shape {value.shape}: pass it as a "
                        "static argument or a Python number")
    dtype = getattr(value, "dtype", None)
    if (dtype is not None and getattr(value, "shape", None) == ()
            and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))):
        return float(value)
    raise TypeError(f"{name} must be {expected}; got {value!r}")


def check_qkv(q, k, v, layout: str, *, self_attention: bool) -> tuple[int, int, int, int]:
    """Returns (B, T, H, D) after checking ranks, sizes, dtypes and shapes."""
    check_choice("layout", layout, LAYOUTS)
    dims = "[B, T, H, D]" if layout == "bthd" else "[B, H, T, D]"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array; got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions {dims} for layout {layout!r}; "
                             f"got shape {tuple(x.shape)}")
        if 0 in x.shape:
            raise ValueError(f"{name} must have at least one element along each dimension "
                             f"{dims}; got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype; got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape {dims}; got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    ta, ha = token_axis(layout), head_axis(layout)
    if self_attention and q.shape[ta] != k.shape[ta]:
        raise ValueError(f"q and k/v must have the same sequence length (self-attention); "
                         f"got {q.shape[ta]} and {k.shape[ta]} (layout {layout!r})")
    if (q.shape[0], q.shape[ha], q.shape[3]) != (k.shape[0], k.shape[ha], k.shape[3]):
        raise ValueError(f"q and k/v must agree in batch, heads and head dim {dims}; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    return q.shape[0], q.shape[ta], q.shape[ha], q.shape[3]


def check_implementation(implementation, *, stacklevel: int = 3) -> str:
    """The implementation's current name; an old name warns (DeprecationWarning, shown at
    the caller `stacklevel - 1` frames up) and is translated."""
    if isinstance(implementation, str) and implementation in RENAMED_IMPLEMENTATIONS:
        new = RENAMED_IMPLEMENTATIONS[implementation]
        warnings.warn(f"implementation={implementation!r} is deprecated: use "
                      f"implementation={new!r} (the same kernels)", DeprecationWarning,
                      stacklevel=stacklevel)
        return new
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    return implementation


def check_density(density) -> float:
    density = real_number("density", density, "a real number in (0, 1]")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1]; got {density!r}")
    return density


def check_block_size(block_size) -> int:
    if (isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral)
            or block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a power of two >= 16; got {block_size!r}")
    return int(block_size)


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return default_scale(head_dim, None)
    scale = real_number("scale", scale, "None or a finite positive number")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be None or a finite positive number; got {scale!r}")
    return scale


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


def check_statistics(stats, b: int, t: int, h: int, d: int) -> None:
    """Shapes of `stats` against q's (B, T, H, D). What the shapes cannot show (statistics
    of other values of the same shape) is not checked."""
    from pisa_jax._types import BlockStatistics
    if not isinstance(stats, BlockStatistics):
        raise TypeError(f"stats must be a BlockStatistics; got {type(stats).__name__}")
    nt = num_blocks(t, stats.block_size)
    want = {"q_mean": (b, h, nt, d), "k_mean": (b, h, nt, d), "v_sum": (b, h, nt, d),
            "moment": (b, h, d, d)}
    got = {name: tuple(getattr(stats, name).shape) for name in want}
    if stats.num_tokens != t or got != want:
        raise ValueError(
            f"stats must come from q, k, v of [B, T, H, D] = [{b}, {t}, {h}, {d}]; they were "
            f"computed for T = {stats.num_tokens} and have q_mean {got['q_mean']}, moment "
            f"{got['moment']} (expected {want['q_mean']} and {want['moment']})")


def check_selection(selection, b: int, h: int, nt: int) -> None:
    """Shapes and dtype always; index ranges and repeats when the indices are concrete
    (outside `jit`: a device-side summary of three numbers is read back)."""
    from pisa_jax._types import Selection
    if not isinstance(selection, Selection):
        raise TypeError(f"selection must be a Selection; got {type(selection).__name__}")
    idx = selection.indices
    shape = tuple(idx.shape)
    if (selection.num_blocks != nt or len(shape) != 4 or shape[:3] != (b, h, nt)
            or not 1 <= shape[3] <= nt):
        raise ValueError(f"selection must have indices [B, H, NT, K] = [{b}, {h}, {nt}, K] with "
                         f"1 <= K <= {nt} for these statistics' block size; got {shape} for "
                         f"NT = {selection.num_blocks}")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"selection.indices must be integers; got {idx.dtype}")
    if isinstance(idx, jax.core.Tracer):
        return
    lo, hi, repeated = (int(x) for x in _index_summary(idx))
    if lo < 0 or hi >= nt:
        raise ValueError(f"selection.indices must lie in [0, {nt}); got values from {lo} to {hi}")
    if repeated:
        raise ValueError("selection.indices must be distinct within each query block's row; "
                         "got a row with a repeated block")


@jax.jit
def _index_summary(indices):
    s = jnp.sort(indices, axis=-1)
    return s.min(), s.max(), jnp.any(s[..., 1:] == s[..., :-1])
