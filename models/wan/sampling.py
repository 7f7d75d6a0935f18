"""Flow-matching sampling for Wan2.1 as plain functions: a shifted schedule and Euler steps
with classifier-free guidance.

The conditional and unconditional passes run as one batch of 2B. One compiled step
(`euler_step`, cached per shape, attention mode and guidance) serves every step of every
call; the first `dense_steps` steps can attend densely in every layer, as the PISA paper
does. The text states are zero-padded to the model's `text_len` (512) tokens first, as
the official Wan2.1 model and diffusers' pipeline do.
"""

from __future__ import annotations

import functools
import numbers

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from models.wan.model import pad_text

# The official T2V generate script uses shift 5.0 at every size; 3.0 is diffusers' 480p advice.
FLOW_SHIFT = {"480p": 3.0, "720p": 5.0}
NUM_TRAIN_TIMESTEPS = 1000


def schedule(num_steps: int, shift: float = 5.0) -> np.ndarray:
    """`num_steps + 1` noise levels (sigmas) from 1 to 0, float32.

    Uniform levels bent towards 1 by `shift`: `s -> shift * s / (1 + (shift - 1) * s)`
    (`FLOW_SHIFT`). The model's timestep is `1000 * sigma`. Raises ValueError unless
    `num_steps` is an integer >= 1 and `shift` is positive.
    """
    if (isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral)
            or num_steps < 1):
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be positive; got {shift}")
    s = np.linspace(1.0, 0.0, num_steps + 1)
    return (shift * s / (1.0 + (shift - 1.0) * s)).astype(np.float32)


@functools.partial(nnx.jit, static_argnames=("dense", "guided"))
def euler_step(model, x, sigma, sigma_next, context, guidance_scale, *, dense: bool,
               guided: bool):
    """One Euler step `x + (sigma_next - sigma) * v` of the (guided) flow `v`.

    With `guided`, `context` holds the conditional states then the unconditional ones
    (`[2B, L, text_dim]`) and `v = v_uncond + guidance_scale * (v_cond - v_uncond)`;
    without, `context` is `[B, L, text_dim]` and `guidance_scale` is unused.
    """
    b = x.shape[0]
    xs = jnp.concatenate([x, x]) if guided else x
    t = jnp.full((xs.shape[0],), NUM_TRAIN_TIMESTEPS * sigma, jnp.float32)
    v = model(xs, t, context, dense=dense)
    if guided:
        v_cond, v_uncond = v[:b], v[b:]
        v = v_uncond + guidance_scale * (v_cond - v_uncond)
    return (x.astype(jnp.float32) + (sigma_next - sigma) * v).astype(x.dtype)


def denoise(model, noise: Float[Array, "b c f h w"], context: Float[Array, "b l d"],
            sigmas, *, negative_context: Float[Array, "b l d"] | None = None,
            guidance_scale: float = 5.0, dense_steps: int = 0,
            progress=None) -> Float[Array, "b c f h w"]:
    """Euler steps of the flow from `sigmas[0]` to `sigmas[-1]`.

    Args:
      model: a `models.wan.Wan`.
      noise: `[B, C, F, H, W]` latents at `sigmas[0]` (float32 recommended).
      context: `[B, L, text_dim]` text encoder states of the prompts (precomputed,
        unpadded or zero-padded), `L <= model.config.text_len`. They are zero-padded to
        `text_len` (512) tokens (`pad_text`), as in the official model: cross-attention
        attends over the padding too, so the result depends on it.
      sigmas: the schedule, e.g. `schedule(num_steps, FLOW_SHIFT["480p"])`.
      negative_context: `[B, L', text_dim]` states of the negative (or empty) prompts,
        padded likewise; None runs without classifier-free guidance.
      guidance_scale: classifier-free guidance scale (Wan2.1 uses 5.0).
      dense_steps: how many first steps attend densely in every layer.
      progress: optional callable `progress(step, num_steps)`.
    Raises ValueError if `context` or `negative_context` is not 3D, has more than
    `text_len` tokens, or has a batch other than `noise`'s; if `sigmas` is not 1D with at
    least 2 levels (one step); or if `dense_steps` is not an integer >= 0.
    """
    b, text_len = noise.shape[0], model.config.text_len
    guided = negative_context is not None
    for name, c in (("context", context), ("negative_context", negative_context)):
        if c is not None and (c.ndim != 3 or c.shape[0] != b):
            raise ValueError(f"{name} must have shape [{b}, L, text_dim] (one entry per noise "
                             f"batch entry); got {list(c.shape)}")
    context = pad_text(context, text_len)
    if guided:
        context = jnp.concatenate([context, pad_text(negative_context, text_len,
                                                     name="negative_context")])
    sigmas = np.asarray(sigmas, np.float32)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be 1D with at least 2 noise levels (one step); got "
                         f"shape {list(sigmas.shape)}")
    if (isinstance(dense_steps, bool) or not isinstance(dense_steps, numbers.Integral)
            or dense_steps < 0):
        raise ValueError(f"dense_steps must be an integer >= 0; got {dense_steps!r}")
    g = jnp.float32(guidance_scale)
    x = noise
    n = len(sigmas) - 1
    for i in range(n):
        x = euler_step(model, x, jnp.float32(sigmas[i]), jnp.float32(sigmas[i + 1]), context, g,
                       dense=i < dense_steps, guided=guided)
        if progress is not None:
            progress(i + 1, n)
    return x
