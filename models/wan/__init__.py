"""Wan2.1 text-to-video transformer (1.3B, 14B) in Flax NNX on PISA attention, with
weight conversion, flow-matching sampling (Euler; diffusers' UniPC) and the video
autoencoder."""

import jax.numpy as jnp

from models.wan.autoencoder import (WAN_VAE, WanAutoencoder, WanAutoencoderConfig,
                                    from_transformer_layout, load_wan_autoencoder,
                                    to_transformer_layout)
from models.wan.config import DEFAULT_TILE, WAN_T2V_1_3B, WAN_T2V_14B, WanConfig
from models.wan.model import Wan, check_dtype, default_policies, pad_text
from models.wan.sampling import FLOW_SHIFT, denoise, euler_step, schedule
from models.wan.unipc import UniPCConfig, UniPCSchedule, unipc_loop, unipc_sigmas

__all__ = ["DEFAULT_TILE", "FLOW_SHIFT", "UniPCConfig", "UniPCSchedule", "WAN_T2V_14B",
           "WAN_T2V_1_3B", "WAN_VAE", "Wan", "WanAutoencoder", "WanAutoencoderConfig",
           "WanConfig", "WanPipeline", "check_dtype", "default_policies", "denoise",
           "euler_step", "from_transformer_layout", "load_wan", "load_wan_autoencoder",
           "pad_text", "schedule", "to_transformer_layout", "unipc_loop", "unipc_sigmas"]


def load_wan(path, *, dtype=jnp.bfloat16, attention: str = "pisa", policies=None, tile=None,
             num_heads=None, **policy_options):
    """Loads a converted checkpoint, or an official / diffusers one (converted in memory).

    See `models.wan.convert.load_wan` for the arguments.
    """
    from models.wan.convert import load_wan as _load
    return _load(path, dtype=dtype, attention=attention, policies=policies, tile=tile,
                 num_heads=num_heads, **policy_options)


def __getattr__(name):
    # The pipeline pulls in the text encoder and the tokenizer: imported on first use.
    if name == "WanPipeline":
        from models.wan.pipeline import WanPipeline
        return WanPipeline
    raise AttributeError(f"module 'models.wan' has no attribute {name!r}")
