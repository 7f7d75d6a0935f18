"""FLUX.1 (dev, schnell) in Flax NNX on PISA attention, with weight conversion."""

import jax.numpy as jnp

from models.flux.config import FLUX_DEV, FLUX_SCHNELL, FluxConfig
from models.flux.model import Flux, default_policies
from models.flux.sampling import denoise, schedule

__all__ = ["FLUX_DEV", "FLUX_SCHNELL", "Flux", "FluxConfig", "default_policies", "denoise",
           "load_flux", "schedule"]


def load_flux(path, *, dtype=jnp.bfloat16, attention: str = "pisa", policies=None,
              **policy_options):
    """Loads a converted checkpoint, or an official one directly (converted in memory).

    See `models.flux.convert.load_flux` for the arguments.
    """
    from models.flux.convert import load_flux as _load
    return _load(path, dtype=dtype, attention=attention, policies=policies, **policy_options)
