"""Pallas Mosaic GPU kernels (Hopper): the piecewise attention forward."""

from pisa_jax.kernels.pallas_mosaic_gpu.config import MosaicConfig
from pisa_jax.kernels.pallas_mosaic_gpu.piecewise_attention import piecewise_attention

__all__ = ["MosaicConfig", "piecewise_attention"]
