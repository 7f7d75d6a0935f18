"""Public entry points: argument checks once, here, then dispatch to an implementation.

Implementations (`implementation=`), chosen through the table in
`pisa_jax.kernels.dispatch`: "reference" (plain jax.numpy, `pisa_jax.reference`),
"triton" (the Pallas Triton kernels; `interpret=True` runs them on the CPU), "mosaic"
(the attention on Pallas Mosaic GPU, Hopper only; statistics and top-k on Triton) and
"auto" (per shape on a GPU, the reference elsewhere). "pallas" is the old name of
"triton" and warns.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pisa_jax import reference
from pisa_jax._blocks import from_bhtd, num_blocks, to_bhtd
from pisa_jax._checks import (ORDERS, check_block_size, check_bool, check_choice, check_density,
                              check_forced, check_qkv, check_scale, check_selection,
                              check_statistics)
from pisa_jax._types import BlockStatistics, Selection
from pisa_jax.kernels.dispatch import AttentionInputs, resolve
from pisa_jax.selection import select_from_statistics

DENSE_IMPLEMENTATIONS = ("auto", "reference", "xla", "cudnn")

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
      ValueError / TypeError naming the argument for bad input, and for an explicit
      implementation that cannot run here or take the inputs (float64 with "triton",
      "mosaic" off a Hopper GPU); "auto" falls back instead. With "mosaic" the statistics
      run on the Triton kernel.
    """
    check_qkv(q, k, v, layout, self_attention=True)
    block_size = check_block_size(block_size)
    with_norms = check_bool("with_norms", with_norms)
    backend, interpret = resolve(implementation, interpret, dtype=q.dtype)
    return backend.statistics(q, k, v, block_size=block_size, with_norms=with_norms,
                              layout=layout, interpret=interpret)


def select_blocks(
    stats: BlockStatistics, *, density: float = 0.15, scale: float | None = None,
    use_bias: bool = False, forced_blocks: Sequence[int] | None = None,
    implementation: str = "auto", interpret: bool | None = None,
) -> Selection:
    """Key blocks each query block attends to exactly (`top_k = max(1, floor(density*NT))`).

    Forced blocks are always selected and use up slots. `scale` defaults to `D**-0.5`.
    The result can be reused by `piecewise_attention` across layers or sampling steps.
    Scores are formed in XLA; the top-k is XLA's `lax.top_k` ("reference": indices by
    descending score) or, for 128 blocks or more, the Triton top-k kernel ("triton" and
    "mosaic", "auto" on a GPU: the same set, indices in ascending block order). The order
    of the indices does not change any output.
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
    backend, interpret = resolve(implementation, interpret)
    return select_from_statistics(stats, density=density, scale=scale, use_bias=use_bias,
                                  forced_blocks=forced, top_k_kernel=backend.top_k_kernel,
                                  interpret=interpret)


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
    backend, interpret = resolve(implementation, interpret, dtype=q.dtype,
                                 attention=AttentionInputs(stats.block_size, d, t))
    return backend.attention(q, k, v, stats, selection, scale=scale, order=order,
                             layout=layout, interpret=interpret)


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
      implementation: "auto" (off a GPU the reference; on a GPU, per shape, the faster
        kernel backend that takes the inputs: `pisa_jax.kernels.dispatch`), "triton"
        (bfloat16, float16, float32), "mosaic" (the attention on Pallas Mosaic GPU,
        statistics and top-k on Triton; Hopper GPUs, bfloat16/float16, block_size 64 or
        128, head dim <= 128) or "reference" (any float dtype, float64 included). "pallas" is
        the old name of "triton" (DeprecationWarning).
      interpret: run the Triton kernels in interpret mode (default: when not on a GPU).
    Returns:
      An array of q's shape, dtype and layout.
    Raises:
      ValueError / TypeError naming the argument, what was expected and what was given;
      for an explicit implementation that cannot run here or take these inputs, the
      reason and the alternatives ("auto" never raises for that: it falls back).
    """
    b, t, h, d = check_qkv(q, k, v, layout, self_attention=True)
    density = check_density(density)
    block_size = check_block_size(block_size)
    check_choice("order", order, ORDERS)
    scale = check_scale(scale, d)
    forced = check_forced(forced_blocks, num_blocks(t, block_size))
    use_bias = check_bool("use_bias", use_bias)
    backend, interpret = resolve(implementation, interpret, dtype=q.dtype,
                                 attention=AttentionInputs(block_size, d, t))
    # Checked once above: the stages below are the unchecked internals.
    stats = backend.statistics(q, k, v, block_size=block_size, with_norms=use_bias,
                               layout=layout, interpret=interpret)
    selection = select_from_statistics(stats, density=density, scale=scale, use_bias=use_bias,
                                       forced_blocks=forced, top_k_kernel=backend.top_k_kernel,
                                       interpret=interpret)
    return backend.attention(q, k, v, stats, selection, scale=scale, order=order,
                             layout=layout, interpret=interpret)


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
