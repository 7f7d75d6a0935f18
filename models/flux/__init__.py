"""FLUX.1 (dev, schnell) in Flax NNX on PISA attention, with weight conversion."""

import jax.numpy as jnp

from models.flux.autoencoder import FLUX_AE, AutoEncoder, AutoEncoderConfig, load_autoencoder
from models.flux.config import FLUX_DEV, FLUX_SCHNELL, FluxConfig
from models.flux.model import Flux, default_policies
from models.flux.sampling import denoise, euler_loop, schedule

__all__ = ["FLUX_AE", "AutoEncoder", "AutoEncoderConfig", "load_autoencoder", "FLUX_DEV", "FLUX_SCHNELL", "Flux", "FluxConfig", "FluxPipeline", "default_policies",
           "denoise", "euler_loop", "load_flux", "schedule"]


def load_flux(path, *, dtype=jnp.bfloat16, attention: str = "pisa", policies=None,
              **policy_options):
    """Loads a converted checkpoint, or an official one directly (converted in memory).

    See `models.flux.convert.load_flux` for the arguments.
    """
    from models.flux.convert import load_flux as _load
    return _load(path, dtype=dtype, attention=attention, policies=policies, **policy_options)


def __getattr__(name):
    # The pipeline pulls in the text encoders and the VAE: imported on first use.
    if name == "FluxPipeline":
        from models.flux.pipeline import FluxPipeline
        return FluxPipeline
    raise AttributeError(f"module 'models.flux' has no attribute {name!r}")
