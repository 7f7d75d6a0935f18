"""Argument checks of the FLUX pipeline, as pure functions: `FluxPipeline.__call__` runs
them, and the command line runs them before loading any weights."""

from __future__ import annotations

import math
import numbers

import jax
import numpy as np

MAX_SEQUENCE_LENGTH = 512             # what FLUX.1's T5 was trained with


def check_arguments(*, height: int | None = None, width: int | None = None,
                    num_inference_steps: int | None = None, dense_steps: int | None = None,
                    max_sequence_length: int | None = None, guidance_scale=None,
                    multiple: int = 16) -> None:
    """The size and step checks of `FluxPipeline.__call__`, without a pipeline (the CLI
    runs them before loading anything); an argument left None is not checked.

    height, width: >= 1 and multiples of `multiple` (FLUX: the VAE's 8, then 2x2 patches);
    num_inference_steps >= 1; dense_steps in [0, num_inference_steps] (>= 0 when the step
    count is not given); max_sequence_length in [1, 512]; guidance_scale a finite real
    number. Raises TypeError / ValueError naming the argument.
    """
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            _check_int(name, value, 1, multiple=multiple)
    if num_inference_steps is not None:
        _check_int("num_inference_steps", num_inference_steps, 1)
    if dense_steps is not None:
        _check_int("dense_steps", dense_steps, 0, num_inference_steps)
    if max_sequence_length is not None:
        _check_int("max_sequence_length", max_sequence_length, 1, MAX_SEQUENCE_LENGTH)
    if guidance_scale is not None:
        _real(guidance_scale)


def _real(value, name: str = "guidance_scale") -> float:
    """A finite real number (Python or NumPy, or a 0-d array) as a float."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not ok and isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0:
        ok = (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating))
    if not ok:
        raise TypeError(f"{name} must be a real number; got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite; got {float(value)}")
    return float(value)


def _check_prompt(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompt must be a string or a list of strings; got "
                        f"{type(prompt).__name__}")
    if not prompts:
        raise ValueError("prompt must be a string or a non-empty list of strings; got an "
                         "empty list")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompt must hold strings only; got {bad}")
    return list(prompts)


def _check_int(name: str, value, lo: int, hi: int | None = None, multiple: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    if value < lo or (hi is not None and value > hi):
        want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {want}; got {value}")
    if value % multiple:
        raise ValueError(f"{name} must be a multiple of {multiple} (the VAE's downsampling, "
                         f"then 2x2 patches); got {value}")


def _check_seed(seed, b: int) -> np.ndarray:
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        seeds = np.arange(b, dtype=np.int64) + int(seed)
    elif isinstance(seed, (list, tuple)) and all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seed):
        if len(seed) != b:
            raise ValueError(f"seed must be an int or one int per prompt ({b}); got "
                             f"{len(seed)} seeds")
        seeds = np.asarray(seed, np.int64)
    else:
        raise TypeError(f"seed must be an int or a list of ints; got {seed!r}")
    if (seeds < 0).any() or (seeds >= 2**32).any():
        raise ValueError(f"seed must be in [0, 2**32); got {seed}")
    return seeds.astype(np.uint32)
