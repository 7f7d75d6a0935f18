"""What every kernel backend shares: the exp2 constant, the inference-only guard and the
device facts (multiprocessor count, shared memory, compute capability) read from the
device rather than written down."""

from __future__ import annotations

import functools

import jax

LOG2E = 1.4426950408889634

# Where the device does not report a fact (the CPU, where the kernels run in interpret
# mode): an H100's / H200's, so that interpret mode partitions work as on the target.
_DEFAULT_MULTIPROCESSORS = 132
_DEFAULT_SHARED_MEMORY = 227 * 1024     # opt-in shared memory per block on Hopper


@functools.cache
def multiprocessor_count() -> int:
    """Streaming multiprocessors of the default device (`core_count` of a JAX GPU device),
    or `_DEFAULT_MULTIPROCESSORS` where the device does not say."""
    count = getattr(jax.devices()[0], "core_count", None)
    return count if isinstance(count, int) and count > 0 else _DEFAULT_MULTIPROCESSORS


@functools.cache
def shared_memory_per_block() -> int:
    """Bytes of shared memory one block (CTA) may use on the default device
    (`shared_memory_per_block_optin` of a JAX GPU device), or Hopper's where the device
    does not say."""
    size = getattr(jax.devices()[0], "shared_memory_per_block_optin", None)
    return size if isinstance(size, int) and size > 0 else _DEFAULT_SHARED_MEMORY


def compute_capability() -> str | None:
    """`"9.0"` and the like for an NVIDIA GPU as the default device, otherwise None."""
    if jax.default_backend() != "gpu":
        return None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    return cc if isinstance(cc, str) and cc else None


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
