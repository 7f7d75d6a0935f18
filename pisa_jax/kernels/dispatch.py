"""Which backend runs each PISA stage, for an `implementation=` name: one table.

  "reference"  plain `jax.numpy` (`pisa_jax.reference`) on any platform, any float dtype.
  "triton"     the Pallas Triton kernels (`pallas_triton/`) for the block statistics, the
               top-k and the attention; on a GPU, or on the CPU with `interpret=True`.
  "mosaic"     the attention kernel on Pallas Mosaic GPU (`pallas_mosaic_gpu/`, Hopper:
               compute capability 9.x, bfloat16/float16, block size 64 or 128, head dim <= 128);
               the statistics and the top-k stay on Triton.
  "auto"       off a GPU the reference; on a GPU, per shape, the backend `AUTO_TABLE`
               names (Mosaic only once `MOSAIC_VALIDATED`), falling back to Triton and
               then the reference where a backend cannot take the inputs. Never raises
               for want of a backend.
  "pallas"     the old name of "triton" (DeprecationWarning).

An explicit name that cannot run here, or cannot take the inputs, raises an error naming
the reason and the alternatives.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from pisa_jax import reference
from pisa_jax._blocks import from_bhtd, to_bhtd
from pisa_jax._checks import check_bool, check_implementation
from pisa_jax.kernels._common import compute_capability

# Per block size: ((largest T, faster attention backend), ascending in T), and the backend
# beyond the last bound. Block sizes not listed run Triton.
# Block 64, H200 2026-11-28, one run, whole op/cuDNN (d 0.15+bias, bf16), Mosaic|Triton:
# T=4608 2.11|1.91x, 16896 3.18|3.22x, 32768 3.46|3.37x, 75776 2.90|3.42x. At T=4608 in
# the FLUX.1 forward at 1024^2 (benchmarks/flux.py, same day): Mosaic 118.7 ms, Triton
# 118.2 ms, and the Mosaic forward compiles in 123 s against 34 s: Triton there.
# Block 128, H200 2026-11-29, whole op ms, Mosaic (persistent grid, turns)|Triton:
# T=4608 0.172|0.212, 16896 1.185|1.589, 32768 3.973|5.366, 75776 33.97|46.96: Mosaic at
# every measured T; beyond the measured range (and where its shared memory would run out,
# past about 0.78M tokens at density 0.15), Triton.
AUTO_TABLE = {
    64: (((24 * 1024, "triton"), (40 * 1024, "mosaic")), "triton"),
    128: (((80 * 1024, "mosaic"),), "triton"),
}

# "auto" picks Mosaic from AUTO_TABLE only when this is True: every test in
# tests/test_kernels_mosaic_gpu.py (block sizes 64 and 128), test_backend_contract.py and
# test_dispatch.py passed on the H200 (jax 0.11.2, 2026-11-28); the block-128 kernel's
# default since 2026-11-29 (persistent grid, turns; the same kernel as
# MosaicConfig(ping_pong=True, persistent=True), a CPU lowering test checks) passed its
# GPU tests that day. Set it back to False if a Mosaic GPU test fails; "auto" then runs
# Triton on every GPU.
MOSAIC_VALIDATED = True


def gpu_count() -> int:
    """How many devices this process sees (the GPUs, when on a GPU)."""
    return jax.device_count()


def plain_single_device() -> bool:
    """True when the call is traced with no mesh (no `shard_map`, no `jax.set_mesh`) in a
    process that sees one device: where "auto" may pick the Mosaic GPU kernel.

    That is where the Mosaic kernel has been tested. Elsewhere XLA (jax 0.11.2) can refuse
    to compile it: on H200s, a `shard_map` over a one-device mesh failed with "NVSHMEM is
    not supported in XLA", on a one-GPU and on a two-GPU machine alike.
    """
    return gpu_count() == 1 and jax.sharding.get_abstract_mesh().empty


def table_choice(num_tokens: int, block_size: int = 64) -> str:
    """The backend `AUTO_TABLE` names for `num_tokens` tokens in blocks of `block_size`."""
    if block_size not in AUTO_TABLE:
        return "triton"
    table, beyond = AUTO_TABLE[block_size]
    i = bisect.bisect_left([t for t, _ in table], num_tokens)
    return table[i][1] if i < len(table) else beyond


# ------------------------------------------------------------------- stage adapters

def _reference_statistics(q, k, v, *, block_size, with_norms, layout, interpret):
    return reference.block_statistics(*(to_bhtd(x, layout) for x in (q, k, v)),
                                      block_size=block_size, with_norms=with_norms)


def _triton_statistics(q, k, v, *, block_size, with_norms, layout, interpret):
    from pisa_jax.kernels.pallas_triton import block_statistics as kernel
    return kernel.block_statistics(q, k, v, block_size=block_size, with_norms=with_norms,
                                   layout=layout, interpret=interpret)


def _reference_attention(q, k, v, stats, selection, *, scale, order, layout, interpret):
    out = reference.piecewise_attention(*(to_bhtd(x, layout) for x in (q, k, v)), stats,
                                        selection, scale=scale, order=order)
    return from_bhtd(out, layout)


def _triton_attention(q, k, v, stats, selection, *, scale, order, layout, interpret):
    from pisa_jax.kernels.pallas_triton import piecewise_attention as kernel
    return kernel.piecewise_attention(q, k, v, stats, selection, scale=scale, order=order,
                                      layout=layout, interpret=interpret)


def _mosaic_attention(q, k, v, stats, selection, *, scale, order, layout, interpret):
    from pisa_jax.kernels.pallas_mosaic_gpu import piecewise_attention
    return piecewise_attention(q, k, v, stats, selection, scale=scale, order=order,
                               layout=layout, interpret=interpret)


# ------------------------------------------------------------ where each one can run

def _no_gpu() -> str | None:
    backend = jax.default_backend()
    return None if backend == "gpu" else f"there is no GPU (JAX's default backend is {backend!r})"


def _triton_unavailable(interpret: bool) -> str | None:
    return None if interpret else _no_gpu()


def mosaic_unavailable(interpret: bool = False) -> str | None:
    """Why Pallas Mosaic GPU cannot run the attention here, or None where it can."""
    if interpret:
        return ("the Mosaic GPU kernel has no interpret mode (Pallas' Mosaic GPU interpreter "
                "cannot run wgmma accumulators)")
    reason = _no_gpu()
    if reason:
        return reason
    cc = compute_capability()
    if cc is None or cc.split(".")[0] != "9":
        return (f"the GPU ({jax.devices()[0].device_kind}) has compute capability {cc}, "
                "not 9.x (Hopper)")
    return None


def _triton_limits(dtype, block_size, head_dim, interpret):
    from pisa_jax.kernels.pallas_triton.config import unsupported
    return unsupported(dtype, block_size, head_dim, interpret)


def _mosaic_limits(dtype, block_size, head_dim, interpret):
    from pisa_jax.kernels.pallas_mosaic_gpu.config import unsupported
    return unsupported(dtype, block_size, head_dim)


# ----------------------------------------------------------------------- the table

ALL_FLOATS = ("bfloat16", "float16", "float32", "float64")
TRITON_DTYPES = ("bfloat16", "float16", "float32")
MOSAIC_DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Backend:
    """What one `implementation=` name runs.

    `statistics` and `attention` have the signatures of the Triton kernels' wrappers;
    `top_k_kernel`: the selection ranks with the Triton top-k kernel (else `lax.top_k`).
    `statistics_dtypes` / `attention_dtypes`: input dtypes of those stages.
    `unavailable(interpret)`: why it cannot run on this machine, or None.
    `limits(dtype, block_size, head_dim, interpret)`: why its attention kernel cannot take
    these inputs, or None. `alternatives`: what to use instead, for its error messages.
    """

    name: str
    statistics: Callable
    attention: Callable
    top_k_kernel: bool
    statistics_dtypes: tuple[str, ...]
    attention_dtypes: tuple[str, ...]
    unavailable: Callable[[bool], str | None]
    limits: Callable[..., str | None]
    alternatives: str
    has_interpret_mode: bool = True


BACKENDS = {
    "reference": Backend("reference", _reference_statistics, _reference_attention, False,
                         ALL_FLOATS, ALL_FLOATS, lambda interpret: None, lambda *a: None,
                         ""),
    "triton": Backend("triton", _triton_statistics, _triton_attention, True,
                      TRITON_DTYPES, TRITON_DTYPES, _triton_unavailable, _triton_limits,
                      "use implementation='reference', or 'auto' (picks what can run)"),
    "mosaic": Backend("mosaic", _triton_statistics, _mosaic_attention, True,
                      TRITON_DTYPES, MOSAIC_DTYPES, mosaic_unavailable, _mosaic_limits,
                      "use implementation='triton' (interpret=True off a GPU), 'reference', "
                      "or 'auto' (picks what can run)", has_interpret_mode=False),
}


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """What the backend choice needs to know of an attention call."""

    block_size: int
    head_dim: int
    num_tokens: int


def _refusal(backend: Backend, interpret: bool, dtype, attention: AttentionInputs | None):
    """The error an explicit request of `backend` raises for these inputs, or None."""
    name = backend.name
    reason = backend.unavailable(interpret)
    if reason:
        return ValueError(f"implementation={name!r} cannot run here: {reason}; "
                          f"{backend.alternatives}")
    if dtype is not None:
        dtypes = backend.attention_dtypes if attention else backend.statistics_dtypes
        if jnp.dtype(dtype).name not in dtypes:
            return TypeError(f"implementation={name!r} takes {', '.join(dtypes)} inputs; got "
                             f"{jnp.dtype(dtype).name}: {backend.alternatives}")
    if attention is not None and dtype is not None:
        reason = backend.limits(dtype, attention.block_size, attention.head_dim, interpret)
        if reason:
            return ValueError(f"implementation={name!r}: {reason}; {backend.alternatives}")
    return None


def resolve(implementation, interpret, *, dtype=None,
            attention: AttentionInputs | None = None) -> tuple[Backend, bool]:
    """The backend for `implementation` and the interpret flag to run it with.

    `dtype` is the inputs' dtype (None: no inputs, as for the selection); `attention`
    describes the attention call when the stage runs one (it decides "auto" per shape).
    Raises ValueError for an unknown name (listing the valid ones) and, for an explicit
    name, ValueError / TypeError saying why it cannot run here or take these inputs.
    """
    # Deprecation warnings point at the public function's caller, 3 frames up from here.
    name = check_implementation(implementation, stacklevel=4)
    if interpret is not None:
        check_bool("interpret", interpret)
    on_gpu = jax.default_backend() == "gpu"
    if name != "auto" and interpret is None and not BACKENDS[name].has_interpret_mode:
        interpret = False    # only an explicit interpret=True is refused for that
    interpret = (not on_gpu) if interpret is None else bool(interpret)
    if name != "auto":
        error = _refusal(BACKENDS[name], interpret, dtype, attention)
        if error is not None:
            raise error
        return BACKENDS[name], interpret
    if not on_gpu:
        return BACKENDS["reference"], interpret
    candidates = ["triton", "reference"]
    if MOSAIC_VALIDATED and attention is not None and plain_single_device() and \
            table_choice(attention.num_tokens, attention.block_size) == "mosaic":
        candidates.insert(0, "mosaic")
    for candidate in candidates:
        if _refusal(BACKENDS[candidate], interpret, dtype, attention) is None:
            return BACKENDS[candidate], interpret
    return BACKENDS["reference"], interpret
