"""Public entry points: argument checks once, here, then dispatch to an implementation.

Implementations: "reference" (plain jax.numpy, `pisa_jax.reference`), "pallas" (the
Triton kernels in `pisa_jax.kernels`; `interpret=True` runs them on the CPU) and "auto"
(Pallas on a GPU, the reference elsewhere).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pisa_jax import reference
from pisa_jax._blocks import from_bhtd, num_blocks, to_bhtd
from pisa_jax._checks import (IMPLEMENTATIONS, ORDERS, check_block_size, check_bool,
                              check_choice, check_density, check_dtype_for, check_forced,
                              check_qkv, check_scale, check_selection, check_statistics)
from pisa_jax._types import BlockStatistics, Selection
from pisa_jax.selection import select_from_statistics

DENSE_IMPLEMENTATIONS = ("auto", "reference", "xla", "cudnn")


def _resolve(implementation: str, interpret, dtype=None) -> tuple[str, bool]:
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    if interpret is not None:
        check_bool("interpret", interpret)
    on_gpu = jax.default_backend() == "gpu"
    if implementation == "auto":
        implementation = "pallas" if on_gpu else "reference"
    if dtype is not None:
        check_dtype_for(implementation, dtype)
    if interpret is None:
        interpret = not on_gpu
    return implementation, bool(interpret)


def _statistics(q, k, v, *, block_size, with_norms, layout, impl, interpret) -> BlockStatistics:
    if impl == "pallas":
        from pisa_jax.kernels import block_statistics as kernel
        return kernel.block_statistics(q, k, v, block_size=block_size, with_norms=with_norms,
                                       layout=layout, interpret=interpret)
    return reference.block_statistics(*(to_bhtd(x, layout) for x in (q, k, v)),
                                      block_size=block_size, with_norms=with_norms)


def _attend(q, k, v, stats, selection, *, scale, order, layout, impl, interpret):
    if impl == "pallas":
        from pisa_jax.kernels import piecewise_attention as kernel
        return kernel.piecewise_attention(q, k, v, stats, selection, scale=scale, order=order,
                                          layout=layout, interpret=interpret)
    out = reference.piecewise_attention(*(to_bhtd(x, layout) for x in (q, k, v)), stats,
                                        selection, scale=scale, order=order)
    return from_bhtd(out, layout)


# ------------------------------------------------------------------------------ stages

def block_statistics(
    q: Float[Array, "..."], k: Float[Array, "..."], v: Float[Array, "..."], *,
    block_size: int = 64, with_norms: bool = False, layout: str = "bthd",
    implementation: str = "auto", interpret: bool | None = None,
) -> BlockStatistics:
    """Block-mean queries and keys, block-sum values and the global first moment.

    Args:
      q, k, v: `[B, T, H, D]` (layout "bthd") or `[B, H, T, D]` ("bhtd"), one float dtype.
      block_size: tokens per block, a power of two >= 16.
      with_norms: also return `||H_j||_F` per block (needed for biased selection).
    Returns:
      A `BlockStatistics` with `[B, H, ...]` float32 arrays (float64 for float64 input).
    Raises:
      ValueError / TypeError naming the argument for bad input (float64 with
      implementation="pallas" included: only the reference takes it).
    """
    check_qkv(q, k, v, layout, self_attention=True)
    block_size = check_block_size(block_size)
    with_norms = check_bool("with_norms", with_norms)
    impl, interpret = _resolve(implementation, interpret, q.dtype)
    return _statistics(q, k, v, block_size=block_size, with_norms=with_norms, layout=layout,
                       impl=impl, interpret=interpret)


def select_blocks(
    stats: BlockStatistics, *, density: float = 0.15, scale: float | None = None,
    use_bias: bool = False, forced_blocks: Sequence[int] | None = None,
    implementation: str = "auto", interpret: bool | None = None,
) -> Selection:
    """Key blocks each query block attends to exactly (`top_k = max(1, floor(density*NT))`).

    Forced blocks are always selected and use up slots. `scale` defaults to `D**-0.5`.
    The result can be reused by `piecewise_attention` across layers or sampling steps.
    Scores are formed in XLA; the top-k is XLA's `lax.top_k` ("reference": indices by
    descending score) or, for 128 blocks or more, the Pallas top-k kernel ("pallas", the
    default on a GPU: the same set, indices in ascending block order). The order of the
    indices does not change any output.
    """
    if not isinstance(stats, BlockStatistics):
        raise TypeError(f"stats must be a BlockStatistics; got {type(stats).__name__}")
    density = check_density(density)
    scale = check_scale(scale, stats.q_mean.shape[-1])
    forced = check_forced(forced_blocks, stats.num_blocks)
    use_bias = check_bool("use_bias", use_bias)
    if use_bias and stats.moment_norms is None:
        raise ValueError("use_bias=True needs statistics computed with with_norms=True; "
                         "got statistics without moment_norms")
    impl, interpret = _resolve(implementation, interpret)
    return select_from_statistics(stats, density=density, scale=scale, use_bias=use_bias,
                                  forced_blocks=forced, implementation=impl, interpret=interpret)


def piecewise_attention(
    q: Float[Array, "..."], k: Float[Array, "..."], v: Float[Array, "..."],
    stats: BlockStatistics, selection: Selection, *, scale: float | None = None,
    order: int = 1, layout: str = "bthd", implementation: str = "auto",
    interpret: bool | None = None,
) -> Float[Array, "..."]:
    """PISA output from precomputed statistics and selection; q's shape, dtype and layout.

    `stats` must come from `block_statistics` of q, k, v of the same shapes, and
    `selection` from `select_blocks` of statistics with the same block count. Checked:
    every shape (head dim and block count included) and, outside `jit`, that the
    selected indices lie in [0, NT) and are distinct per row (a small device-side
    reduction read back to the host). Not checkable without recomputing them: that the
    statistics were computed from these very q, k, v.
    """
    b, t, h, d = check_qkv(q, k, v, layout, self_attention=True)
    check_choice("order", order, ORDERS)
    scale = check_scale(scale, d)
    check_statistics(stats, b, t, h, d)
    check_selection(selection, b, h, num_blocks(t, stats.block_size))
    impl, interpret = _resolve(implementation, interpret, q.dtype)
    return _attend(q, k, v, stats, selection, scale=scale, order=order, layout=layout,
                   impl=impl, interpret=interpret)


# ------------------------------------------------------------------------ whole calls

def piecewise_sparse_attention(
    q: Float[Array, "..."], k: Float[Array, "..."], v: Float[Array, "..."], *,
    density: float = 0.15, block_size: int = 64, scale: float | None = None,
    order: int = 1, use_bias: bool = False, forced_blocks: Sequence[int] | None = None,
    layout: str = "bthd", implementation: str = "auto", interpret: bool | None = None,
) -> Float[Array, "..."]:
    """Piecewise sparse attention (PISA), non-causal self-attention, inference only.

    Args:
      q, k, v: `[B, T, H, D]` (layout "bthd") or `[B, H, T, D]` ("bhtd"); one float dtype
        (bfloat16, float16, float32; float64 with the reference); any T >= 1.
      density: fraction of key blocks computed exactly per query block, in (0, 1];
        `density=1` is dense attention.
      block_size: tokens per block, a power of two >= 16 (the kernels take 64 and 128).
      scale: softmax scale, default `D**-0.5`.
      order: 1 = exact + zeroth + global first order (PISA), 0 = exact + zeroth order,
        -1 = keep-or-drop (exact path only).
      use_bias: add `log(||H_j||_F + 1e-5)` to the selection scores.
      forced_blocks: key-block indices always selected (negative counts from the end).
      implementation: "pallas", "reference" or "auto" (Pallas on a GPU). "pallas" takes
        bfloat16, float16 and float32; float64 is refused with a TypeError.
      interpret: run the Pallas kernels in interpret mode (default: when not on a GPU).
    Returns:
      An array of q's shape, dtype and layout.
    Raises:
      ValueError / TypeError naming the argument, what was expected and what was given.
    """
    b, t, h, d = check_qkv(q, k, v, layout, self_attention=True)
    density = check_density(density)
    block_size = check_block_size(block_size)
    check_choice("order", order, ORDERS)
    scale = check_scale(scale, d)
    forced = check_forced(forced_blocks, num_blocks(t, block_size))
    use_bias = check_bool("use_bias", use_bias)
    impl, interpret = _resolve(implementation, interpret, q.dtype)
    # Checked once above: the stages below are the unchecked internals.
    common = dict(layout=layout, impl=impl, interpret=interpret)
    stats = _statistics(q, k, v, block_size=block_size, with_norms=use_bias, **common)
    selection = select_from_statistics(stats, density=density, scale=scale, use_bias=use_bias,
                                       forced_blocks=forced, implementation=impl,
                                       interpret=interpret)
    return _attend(q, k, v, stats, selection, scale=scale, order=order, **common)


def dense_attention(
    q: Float[Array, "..."], k: Float[Array, "..."], v: Float[Array, "..."], *,
    scale: float | None = None, layout: str = "bthd", implementation: str = "auto",
) -> Float[Array, "..."]:
    """softmax(s q k^T) v, non-causal; k/v may have another length than q.

    implementation: "auto" (cuDNN on a GPU for bfloat16/float16, XLA otherwise),
    "cudnn", "xla" or "reference" (float32 arithmetic, float64 for float64).
    """
    _, _, _, d = check_qkv(q, k, v, layout, self_attention=False)
    check_choice("implementation", implementation, DENSE_IMPLEMENTATIONS)
    scale = check_scale(scale, d)
    if implementation == "reference":
        out = reference.dense_attention(*(to_bhtd(x, layout) for x in (q, k, v)), scale=scale)
        return from_bhtd(out, layout)
    if implementation == "auto":
        half = q.dtype in (jnp.bfloat16, jnp.float16)
        implementation = "cudnn" if jax.default_backend() == "gpu" and half else "xla"
    bthd = [x if layout == "bthd" else jnp.swapaxes(x, 1, 2) for x in (q, k, v)]
    out = jax.nn.dot_product_attention(*bthd, scale=scale, implementation=implementation)
    return out if layout == "bthd" else jnp.swapaxes(out, 1, 2)
