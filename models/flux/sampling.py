"""Flow-matching sampling for FLUX.1 as plain functions: a time schedule and an Euler loop.

The loop can run its first `dense_steps` steps with dense attention (the PISA paper keeps
the first few steps dense) and the rest with each layer's policy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def schedule(num_steps: int, image_tokens: int, *, shift: bool = True,
             base_shift: float = 0.5, max_shift: float = 1.15) -> np.ndarray:
    """`num_steps + 1` times from 1 to 0.

    With `shift` (FLUX.1-dev), times are bent towards 1 by `mu`, which grows linearly in
    the number of image tokens from `base_shift` at 256 tokens to `max_shift` at 4096:
    `t -> e^mu / (e^mu + 1/t - 1)`. FLUX.1-schnell uses `shift=False`.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    t = np.linspace(1.0, 0.0, num_steps + 1)
    if shift:
        mu = base_shift + (max_shift - base_shift) * (image_tokens - 256) / (4096 - 256)
        with np.errstate(divide="ignore"):
            t = np.where(t > 0, math.exp(mu) / (math.exp(mu) + 1.0 / np.maximum(t, 1e-12) - 1.0), 0.0)
    return t.astype(np.float32)


def denoise(model, img, img_ids, txt, txt_ids, y, times, *, guidance=None,
            dense_steps: int = 0, progress=None) -> jax.Array:
    """Euler steps of the velocity field from `times[0]` to `times[-1]`.

    Args:
      model: a `models.flux.Flux`.
      img: `[B, L_img, C]` noise (packed latents); the other inputs as in `Flux.__call__`.
      times: the schedule, e.g. `schedule(num_steps, L_img)`.
      guidance: raw guidance scale, a float or `[B]` (dev), None for schnell.
      dense_steps: how many first steps attend densely in every layer.
      progress: optional callable `progress(step, num_steps)`.
    """
    b = img.shape[0]
    if guidance is not None:
        guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,))
    step = nnx.jit(lambda m, x, t, dense: m(x, img_ids, txt, txt_ids, t, y, guidance,
                                             dense=dense), static_argnums=3)
    n = len(times) - 1
    for i in range(n):
        t = jnp.full((b,), times[i], jnp.float32)
        v = step(model, img, t, i < dense_steps)
        img = img + (times[i + 1] - times[i]) * v.astype(img.dtype)
        if progress is not None:
            progress(i + 1, n)
    return img
