"""Flow-matching sampling for FLUX.1 as plain functions: the time schedule and Euler steps.

`schedule` gives the sigmas of diffusers' `FlowMatchEulerDiscreteScheduler` as
`FluxPipeline` configures it, computed the same way (float32). `euler_loop` is the
traceable loop the pipeline compiles once (two `fori_loop`s: the first `dense_steps`
steps with dense attention, then the rest with each layer's policy). `denoise` runs the
steps one by one from the host with one compiled step function, for callers that hold a
bare `Flux` model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from models.pipeline_common import euler_loop  # noqa: F401  (part of this module's API)


def schedule(num_steps: int, image_tokens: int, *, shift: bool = True,
             base_shift: float = 0.5, max_shift: float = 1.15, base_tokens: int = 256,
             max_tokens: int = 4096, constant_shift: float = 1.0) -> np.ndarray:
    """`num_steps + 1` sigmas (float32) from 1 down to 0, as diffusers computes them.

    The sigmas start as `linspace(1, 1/num_steps, num_steps)`. With `shift` (FLUX.1-dev,
    `use_dynamic_shifting`), they are bent towards 1 by `mu`, which is linear in the number
    of image tokens (`base_shift` at `base_tokens`, `max_shift` at `max_tokens`):
    `s -> e^mu / (e^mu + 1/s - 1)`. Without it (FLUX.1-schnell) the constant shift
    `s -> c s / (1 + (c - 1) s)` applies (`constant_shift=1`: none). A final 0 is appended.

    Raises ValueError for `num_steps < 1` or `image_tokens < 1`.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    if image_tokens < 1:
        raise ValueError(f"image_tokens must be >= 1; got {image_tokens}")
    sigmas = np.linspace(1.0, 1.0 / num_steps, int(num_steps)).astype(np.float32)
    if shift:
        slope = (max_shift - base_shift) / (max_tokens - base_tokens)
        mu = image_tokens * slope + (base_shift - slope * base_tokens)
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    else:
        sigmas = constant_shift * sigmas / (1 + (constant_shift - 1) * sigmas)
    return np.append(sigmas.astype(np.float32), np.float32(0.0))


def pack_latents(z: Float[Array, "b h w c"]) -> Float[Array, "b l c4"]:
    """`[B, h, w, C]` (channels last) -> `[B, (h/2)(w/2), 4C]`, diffusers' and BFL's
    packing: each token is a 2x2 patch, features ordered (channel, dy, dx).

    Raises `ValueError` unless `z` is 4-D with even, non-zero h and w.
    """
    if jnp.ndim(z) != 4 or z.shape[1] % 2 or z.shape[2] % 2 or 0 in z.shape[1:3]:
        raise ValueError(f"z must be [B, h, w, C] (channels last) with h and w even and "
                         f"non-zero; got shape {list(jnp.shape(z))}")
    b, h, w, c = z.shape
    z = z.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return z.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(x: Float[Array, "b l c4"], h: int, w: int) -> Float[Array, "b h w c"]:
    """Inverse of `pack_latents`: `[B, (h/2)(w/2), 4C]` -> `[B, h, w, C]`.

    Raises `ValueError` unless h and w are even and positive, `x` is 3-D with
    `(h/2)(w/2)` tokens and its feature count a multiple of 4.
    """
    if not (isinstance(h, (int, np.integer)) and isinstance(w, (int, np.integer)) and h > 0 and w > 0
            and h % 2 == 0 and w % 2 == 0):
        raise ValueError(f"h and w must be even positive ints; got h={h!r}, w={w!r}")
    if jnp.ndim(x) != 3 or x.shape[1] != (h // 2) * (w // 2) or x.shape[2] % 4:
        raise ValueError(f"x must be [B, {(h // 2) * (w // 2)}, 4C] for h={h}, w={w}; got "
                         f"shape {list(jnp.shape(x))}")
    b, _, c4 = x.shape
    x = x.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h, w, c4 // 4)


def image_ids(rows: int, cols: int) -> np.ndarray:
    """`[rows*cols, 3]` float32 ids (0, row, col) of the packed tokens, in raster order."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([np.zeros_like(r), r, c], -1).astype(np.float32)


@nnx.jit(static_argnames="dense")
def _step(model, img, img_ids, txt, txt_ids, t, y, guidance, dt, *, dense):
    v = model(img, img_ids, txt, txt_ids, t, y, guidance, dense=dense)
    return img + dt * v.astype(img.dtype)


def denoise(model, img, img_ids, txt, txt_ids, y, times, *, guidance=None,
            dense_steps: int = 0, progress=None) -> jax.Array:
    """Euler steps of the velocity field from `times[0]` to `times[-1]`, one by one.

    Args:
      model: a `models.flux.Flux`.
      img: `[B, L_img, C]` noise (packed latents); the other inputs as in `Flux.__call__`.
      times: the schedule, e.g. `schedule(num_steps, L_img)`.
      guidance: raw guidance scale, a float or `[B]` (dev), None for schnell.
      dense_steps: how many first steps attend densely in every layer.
      progress: optional callable `progress(step, num_steps)`, called after each step.

    Raises `ValueError` for `times` that is not 1-D with at least 2 values, or
    `dense_steps` outside [0, number of steps].

    The step function is compiled once per shape and reused across calls; for a loop
    compiled as a whole, use `models.flux.FluxPipeline` or `euler_loop`.
    """
    times = np.asarray(times, np.float32)
    n = len(times) - 1
    if times.ndim != 1 or n < 1:
        raise ValueError(f"times must be 1-D with at least 2 values (steps + 1); got shape "
                         f"{list(times.shape)}")
    if not 0 <= dense_steps <= n:
        raise ValueError(f"dense_steps must be in [0, {n}] (the number of steps); got "
                         f"{dense_steps}")
    if guidance is not None:        # the model checks it is a number or [B]
        guidance = jnp.asarray(guidance, jnp.float32)
    img = jnp.asarray(img, jnp.float32)
    b = img.shape[0]
    for i in range(n):
        t = jnp.full((b,), times[i], jnp.float32)
        img = _step(model, img, img_ids, txt, txt_ids, t, y, guidance,
                    jnp.float32(times[i + 1] - times[i]), dense=i < dense_steps)
        if progress is not None:
            progress(i + 1, n)
    return img
