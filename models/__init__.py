"""Model code built on pisa_jax."""
