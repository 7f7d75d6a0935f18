"""Pieces shared by the text encoders: an embedding table named like PyTorch's
(`weight`), linear layers, argument checks, and loading a transformers folder.

Name mapping from a transformers checkpoint: a Flax `kernel` is the checkpoint's
`weight` transposed; every other parameter keeps its dotted name.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.checkpoint import (CheckpointError, TensorFiles, fill_model, flat_params,
                               read_json, safetensors_files)
from models.conversion import plan_stream, torch_layout


def linear(cin: int, cout: int, rngs, dtype, bias: bool = True) -> nnx.Linear:
    return nnx.Linear(cin, cout, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Embedding(nnx.Module):
    """A lookup table `weight [num, dim]`, as `torch.nn.Embedding` names it."""

    def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs, dtype):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (num, dim), dtype) * 0.02)

    def __call__(self, ids):
        return jnp.take(self.weight[...], ids, axis=0)


def check_dtype(dtype, allowed, what: str):
    """`dtype` as a NumPy dtype if it is one of `allowed`, else a ValueError."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{what} must be a dtype, got {dtype!r}") from None
    if dt not in [jnp.dtype(a) for a in allowed]:
        raise ValueError(f"{what} must be one of {[jnp.dtype(a).name for a in allowed]}, "
                         f"got {dt.name}")
    return dt


def check_ids(ids, name: str, max_len: int | None = None) -> None:
    """Token ids must be a `[B, L]` integer array (L <= max_len when given)."""
    if not hasattr(ids, "shape") or not hasattr(ids, "dtype"):
        raise TypeError(f"{name} must be an integer array [B, L], got {type(ids).__name__}")
    if len(ids.shape) != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} must have shape [B, L] with L >= 1, got {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {ids.dtype}")
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(f"{name} has {ids.shape[1]} tokens; the model has "
                         f"{max_len} positions")


def load_params(folder: str, config_from_hf: Callable, model_cls, *, dtype,
                aliases: dict[str, str] | None = None, strip_prefix: str = "",
                ignore: Callable[[str], bool] = lambda name: False):
    """A `model_cls(config, rngs=..., dtype=dtype)` filled from a transformers folder
    (`config.json` read by `config_from_hf`, safetensors single or sharded).

    `aliases` maps a duplicate name (a tied copy) to the name it duplicates: the copy is
    read only when the original is absent. Names for which `ignore` is true (buffers)
    are skipped. Every other tensor must be a parameter of the model, in the shape the
    config implies; `CheckpointError` names the folder and the checkpoint tensor
    otherwise (missing, unexpected or mis-shaped), and names `config.json` when the
    config is not one the model supports.
    """
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    config_path = os.path.join(folder, "config.json")
    try:
        config = config_from_hf(read_json(config_path))
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    abstract = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0), dtype=dtype))
    expected = flat_params(abstract)
    aliases = aliases or {}
    files = TensorFiles(safetensors_files(folder), strip_prefix=strip_prefix)
    present = files.names()
    # A tied copy stands in for its original only when the original is absent.
    stand_in = {target: copy for copy, target in aliases.items()
                if copy in present and target not in present}
    recipe = {}
    for flax_name, value in expected.items():
        name = torch_layout(flax_name, len(value.shape))[0]
        recipe[name] = ([stand_in.get(name, name)], lambda x: x)
    skip = lambda name: ignore(name) or (name in aliases and name not in stand_in.values())
    with plan_stream(files, expected, recipe, model=model_cls.__name__, where=folder,
                     ignore=skip) as tensors:
        return fill_model(abstract, tensors)
