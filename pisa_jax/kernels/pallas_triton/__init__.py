"""Pallas kernels on the Triton backend (NVIDIA GPUs; interpret mode on the CPU): one
kernel and its wrapper per file (`block_statistics`, `piecewise_attention`, `top_k`),
launch parameters in `config`."""

from pisa_jax.kernels.pallas_triton.config import LaunchConfig

__all__ = ["LaunchConfig"]
