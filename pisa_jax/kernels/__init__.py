"""Pallas (Triton backend) kernels of PISA: one kernel and its wrapper per file."""
