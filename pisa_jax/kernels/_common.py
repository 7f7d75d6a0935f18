"""Helpers shared by the Pallas kernels: input preparation, block specs, launch configs."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pisa_jax._blocks import pad_tokens

LOG2E = 1.4426950408889634


# Where the device does not report its multiprocessor count (CPU interpret mode): an
# H100's / H200's, so that interpret mode partitions work as on the target.
_DEFAULT_MULTIPROCESSORS = 132


@functools.cache
def multiprocessor_count() -> int:
    """Streaming multiprocessors of the default device (`core_count` of a JAX GPU device),
    or `_DEFAULT_MULTIPROCESSORS` where the device does not say."""
    count = getattr(jax.devices()[0], "core_count", None)
    return count if isinstance(count, int) and count > 0 else _DEFAULT_MULTIPROCESSORS


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Triton launch parameters of one kernel.

    `zeroth_chunk` is read by the attention kernel only: the zeroth-order pass visits
    block summaries `zeroth_chunk` at a time (a power of two). With
    `indices_in_registers` the exact path reads its index list once as a vector instead
    of one scalar load per step.
    """

    num_warps: int = 4
    num_stages: int = 2
    zeroth_chunk: int = 64
    indices_in_registers: bool = False

    def __post_init__(self):
        for name in ("num_warps", "num_stages", "zeroth_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LaunchConfig.{name}: expected a positive int, got {value!r}")
        if self.zeroth_chunk & (self.zeroth_chunk - 1):
            raise ValueError(f"LaunchConfig.zeroth_chunk: expected a power of two, got "
                             f"{self.zeroth_chunk}")
        if not isinstance(self.indices_in_registers, bool):
            raise ValueError("LaunchConfig.indices_in_registers: expected a bool, got "
                             f"{self.indices_in_registers!r}")


def supported_head_dim(d: int) -> int:
    """Triton tiles need power-of-two sizes: head dims are zero-padded up to one."""
    if d > 256:
        raise ValueError(f"the Pallas kernels take head dims up to 256; got D = {d}")
    return max(16, pl.next_power_of_2(d))


def prepare(x: jax.Array, block_size: int, layout: str) -> jax.Array:
    """Zero-pads the token axis to whole blocks and the head dim to a power of two.

    Zero padding is exact here: padded keys are masked in the kernels and padded head
    channels add nothing to any dot product. Whole-block, power-of-two inputs are
    passed through untouched (no copy).
    """
    x = pad_tokens(x, block_size, layout)
    d_pad = supported_head_dim(x.shape[-1]) - x.shape[-1]
    if d_pad:
        x = jnp.pad(x, [(0, 0)] * 3 + [(0, d_pad)])
    return x


def token_block_spec(layout: str, rows: int, d: int, index) -> pl.BlockSpec:
    """Spec of a `[rows, D]` slab of one (batch, head) in either layout, no transposes.

    `index(*grid_ids)` returns (batch, head, row block).
    """
    if layout == "bthd":
        return pl.BlockSpec((None, rows, None, d),
                            lambda *g: (index(*g)[0], index(*g)[2], index(*g)[1], 0))
    return pl.BlockSpec((None, None, rows, d),
                        lambda *g: (index(*g)[0], index(*g)[1], index(*g)[2], 0))


def dot_precision(dtype) -> dict:
    """float32 inputs get true float32 products; half types use the tensor cores as is."""
    return dict(allow_tf32=False) if jnp.dtype(dtype) == jnp.float32 else {}


def inference_only(fn):
    """Wraps a kernel call so that differentiating it fails with a clear message.

    The kernels have no backward pass (PISA here is an inference method); without this,
    JAX would fail deep inside `pallas_call` with an unrelated error.
    """

    @jax.custom_jvp
    def wrapped(*args):
        return fn(*args)

    @wrapped.defjvp
    def _jvp(primals, tangents):
        raise TypeError(
            f"{getattr(fn, '__name__', 'this PISA kernel')} is inference-only and cannot be "
            "differentiated; use implementation='reference' for gradients")

    return functools.wraps(fn)(wrapped)
