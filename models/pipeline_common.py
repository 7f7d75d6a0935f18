"""What the FLUX and Wan pipelines share: their argument checks, the compiled step loop
(dense steps first, then sparse) with the Euler sampler on it, and a base class that holds
the components on a device mesh and compiles each stage once per shape.

`CompiledStages` keeps each component as an NNX graph and a state replicated over the
pipeline's devices; a stage is a `jax.jit` of a function that `_per_device` maps over the
batch with `shard_map`. `_run` lowers and compiles a stage on its first call per shape
(counting the time in `last_timings["compile"]`) and reuses it after. A progress
callback is compiled into the loop always (so calls with and without one share an
executable) and is called from the first device only: each call stalls its device until
Python answers, and calls from several devices would queue on one interpreter.
"""

from __future__ import annotations

import collections
import math
import numbers
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float

# ------------------------------------------------------------------------ checks


def check_real(value, name: str = "guidance_scale") -> float:
    """A finite real number (Python or NumPy, or a 0-d array) as a float."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not ok and isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0:
        ok = (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating))
    if not ok:
        raise TypeError(f"{name} must be a real number; got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite; got {float(value)}")
    return float(value)


def check_prompt(prompt, name: str = "prompt") -> list[str]:
    """A string or a non-empty list of strings, as a list."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"{name} must be a string or a list of strings; got "
                        f"{type(prompt).__name__}")
    if not prompts:
        raise ValueError(f"{name} must be a string or a non-empty list of strings; got an "
                         "empty list")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{name} must hold strings only; got {bad}")
    return list(prompts)


def check_int(name: str, value, lo: int, hi: int | None = None, multiple: int = 1) -> None:
    """An integer in [lo, hi] (hi None: no bound) and a multiple of `multiple` (image sides:
    the VAE's downsampling times the transformer's 2x2 patches)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    if value < lo or (hi is not None and value > hi):
        want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {want}; got {value}")
    if value % multiple:
        raise ValueError(f"{name} must be a multiple of {multiple} (the VAE's downsampling, "
                         f"then 2x2 patches); got {value}")


def check_seed(seed, b: int) -> np.ndarray:
    """`seed` (an int: seed + i for item i; or one int per item) as `[b]` uint32."""
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


def check_latents(latents, shape: tuple, axes: str) -> np.ndarray | None:
    """Given starting latents as float32 NumPy, after checking them against `shape`
    (`axes` says what each axis is, for the error); None when none were given."""
    if latents is None:
        return None
    latents = np.asarray(latents, np.float32)
    if latents.shape != tuple(shape):
        raise ValueError(f"latents must have shape {list(shape)} ({axes}); got "
                         f"{list(latents.shape)}")
    return latents


# ------------------------------------------------------------------------ sampling

def step_loop(step: Callable, carry, num_steps: int, *, dense_steps: int = 0,
              on_step: Callable | None = None):
    """`carry = step(i, carry, dense)` for i in [0, num_steps), the final carry.

    The first `dense_steps` steps run in one `fori_loop` with `dense=True`, the rest in a
    second one with `dense=False`, so `step` (and the model in it) is traced once per value
    of `dense`. `on_step(i)` (optional) is called inside the loop after step i (e.g.
    through `jax.debug.callback`). Raises ValueError unless `dense_steps` is an integer in
    [0, num_steps].
    """
    if isinstance(dense_steps, (bool, np.bool_)) or not isinstance(
            dense_steps, numbers.Integral) or not 0 <= dense_steps <= num_steps:
        raise ValueError(f"dense_steps must be in [0, {num_steps}] (the number of steps), an "
                         f"integer; got {dense_steps!r}")

    def body(dense):
        def one(i, carry):
            carry = step(i, carry, dense)
            if on_step is not None:
                on_step(i)
            return carry
        return one

    if dense_steps:
        carry = jax.lax.fori_loop(0, dense_steps, body(True), carry)
    if dense_steps < num_steps:
        carry = jax.lax.fori_loop(dense_steps, num_steps, body(False), carry)
    return carry


def euler_loop(velocity: Callable, x: Float[Array, "b ..."], sigmas: Float[Array, "n1"],
               *, dense_steps: int = 0, on_step: Callable | None = None
               ) -> Float[Array, "b ..."]:
    """Euler steps `x += (sigmas[i+1] - sigmas[i]) * velocity(x, sigmas[i], dense)`.

    Traceable (call it under `jax.jit`); the number of steps is `len(sigmas) - 1`.
    `velocity(x [B, ...] float32, sigma [B] float32, dense: bool)` is given the step's
    sigma itself (`sigmas[i]`, from 1 down), not a model timestep: a model that takes
    `1000 * sigma` scales it in `velocity`. It is traced once per value of `dense`; the
    steps run in `step_loop` (`dense_steps` first steps dense, `on_step(i)` after step i).
    `x` stays float32. Raises ValueError for `sigmas` that is not 1-D with at least 2
    values, or `dense_steps` that is not an integer in [0, steps].
    """
    if jnp.ndim(sigmas) != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 values (steps + 1); got shape "
                         f"{list(jnp.shape(sigmas))}")
    b = x.shape[0]

    def step(i, x, dense):
        t = jnp.full((b,), sigmas[i], jnp.float32)
        v = velocity(x, t, dense).astype(jnp.float32)
        return x + (sigmas[i + 1] - sigmas[i]) * v

    return step_loop(step, x.astype(jnp.float32), sigmas.shape[0] - 1,
                     dense_steps=dense_steps, on_step=on_step)


# ------------------------------------------------------------------------ pipelines

class StageClock:
    """Wall time of each stage without the compile time `_run` adds to `timings`."""

    def __init__(self, timings: dict):
        self.timings, self.t, self.compiled = timings, time.perf_counter(), timings["compile"]

    def lap(self, stage: str) -> None:
        now, compiled = time.perf_counter(), self.timings["compile"]
        self.timings[stage] = now - self.t - (compiled - self.compiled)
        self.t, self.compiled = now, compiled


class CompiledStages:
    """Components on a device mesh, stages compiled once per shape (see the module
    docstring). Subclasses call `_hold` in `__init__` and set `self._jits`."""

    def _hold(self, modules: dict[str, nnx.Module],
              devices: Sequence[jax.Device] | None) -> None:
        """Splits each module into graph and state, the state replicated over `devices`
        (default: every local device)."""
        self.devices = list(devices or jax.local_devices())
        self.mesh = Mesh(np.array(self.devices), ("batch",))
        replicated = NamedSharding(self.mesh, P())
        self._graphs, self._states = {}, {}
        for name, module in modules.items():
            self._graphs[name], state = nnx.split(module)
            self._states[name] = jax.device_put(state, replicated)
        self.traces: collections.Counter = collections.Counter()
        self.last_timings: dict[str, float] = {}
        self.load_seconds = 0.0
        self._compiled: dict[tuple, object] = {}
        self._jits: dict[str, Callable] = {}
        self._progress: Callable | None = None
        self._progress_error: Exception | None = None
        self._done = 0

    def _per_device(self, fn, in_specs, out_specs):
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)

    def _report_step(self, i) -> None:
        """Traced inside the loop: calls `_on_step(i)` on the host from the first device."""
        jax.lax.cond(jax.lax.axis_index("batch") == 0,
                     lambda: jax.debug.callback(self._on_step, i), lambda: None)

    def _on_step(self, i):
        if self._progress is None or int(i) + 1 <= self._done:
            return
        self._done = int(i) + 1
        try:
            self._progress(self._done)
        except Exception as e:
            # Raised after the loop (from a host callback it would come out of the
            # compiled loop as a JaxRuntimeError); the callback is not called again.
            self._progress_error, self._progress = e, None

    def _check_progress(self, progress) -> None:
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a callable (given the number of steps done) "
                            f"or None; got {progress!r}")

    def _run_loop(self, progress, name: str, *args, **static):
        """`_run` of a stage whose loop reports steps to `progress`; an exception raised
        by `progress` is raised here, after the loop."""
        self._progress, self._done, self._progress_error = progress, 0, None
        try:
            out = self._run(name, *args, **static)
        finally:
            self._progress = None
        if self._progress_error is not None:
            error, self._progress_error = self._progress_error, None
            raise error
        return out

    def _start(self, seeds, latents, pad: int, shape, guidance: float):
        """(starting latents, per-sample guidance), the batch padded by `pad` copies of its
        last sample and split over the devices: noise from `seeds` (a "noise" stage taking
        `shape`, one sample's shape) or the given `latents`."""
        shard = NamedSharding(self.mesh, P("batch"))
        if latents is None:
            seeds = np.concatenate([seeds, seeds[-1:].repeat(pad)])
            x = self._run("noise", jax.device_put(seeds, shard), shape=shape)
        else:
            x = np.concatenate([latents, latents[-1:].repeat(pad, 0)])
        g = np.full((len(x),), guidance, np.float32)
        return jax.device_put(x, shard), jax.device_put(g, shard)

    def _run(self, name: str, *args, **static):
        """Runs stage `name`, lowering and compiling it on the first call per shape."""
        key = (name, tuple(sorted(static.items())),
               tuple((x.shape, str(x.dtype)) for a in args if not isinstance(a, nnx.State)
                     for x in jax.tree.leaves(a)))
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = self._jits[name].lower(*args, **static).compile()
            self.last_timings["compile"] = (self.last_timings.get("compile", 0.0)
                                            + time.perf_counter() - t0)
        return jax.block_until_ready(self._compiled[key](*args))


def component_paths(path: str | None, given: dict, components: Sequence[str],
                    model: str) -> dict[str, str]:
    """Where each of `components` is: `given[name]` (relative to `path` unless it exists
    as given or is absolute) or `path/name`. Raises `CheckpointError` naming what is
    missing (`model` names the pipeline in the message, e.g. "FLUX.1")."""
    from models.checkpoint import CheckpointError
    if path is not None and not os.path.isdir(path):
        raise CheckpointError(f"pipeline folder {path}: no such folder")
    out = {}
    for name in components:
        p = given.get(name)
        if p is not None and path is not None and not os.path.isabs(p) and not os.path.exists(p):
            p = os.path.join(path, p)
        elif p is None:
            if path is None:
                raise CheckpointError(f"no path for the {name} component: give the pipeline "
                                      f"folder or {name}=")
            p = os.path.join(path, name)
        if not os.path.exists(p):
            raise CheckpointError(f"missing {name} component: {p} does not exist (a {model} "
                                  f"pipeline folder holds {', '.join(components)})")
        out[name] = p
    return out
