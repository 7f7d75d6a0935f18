"""PISA kernels, one folder per backend (as tokamax lays them out).

- `pallas_triton/`: Pallas on Triton: block statistics, top-k and piecewise attention
  (GPU; interpret mode runs them on the CPU).
- `pallas_mosaic_gpu/`: Pallas on Mosaic GPU (Hopper): the piecewise attention.
- `dispatch.py`: which backend runs each stage for an `implementation=` name, and the
  per-shape table that `"auto"` reads.

Each backend keeps its launch config beside its kernels; `_common.py` holds what they
share (device facts read from the device, the inference-only guard).
"""
