"""Flax NNX attention module running PISA (or dense attention) under a per-layer policy.

Inference only: the Pallas kernels have no backward pass.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
from flax import nnx

from pisa_jax._blocks import LAYOUTS, num_blocks, token_axis
from pisa_jax._checks import (ORDERS, check_block_size, check_bool, check_choice,
                              check_density, check_implementation)
from pisa_jax.api import dense_attention, piecewise_sparse_attention

KINDS = ("pisa", "dense")


@dataclasses.dataclass(frozen=True)
class AttentionPolicy:
    """How one attention layer attends.

    Attributes:
      kind: "pisa" or "dense".
      density, order, use_bias, block_size: PISA options (see `piecewise_sparse_attention`).
      exact_text: keep the blocks holding the text tokens (the sequence's first tokens in
        a joint text-image sequence) always selected.
      implementation: "auto", "triton", "mosaic" or "reference" for the PISA layers
        (see `piecewise_sparse_attention`); the old name "pallas" is stored as "triton"
        with a DeprecationWarning.

    Every field is checked when the policy is built. A dense policy takes no PISA option:
    `AttentionPolicy(kind="dense", density=0.3)` is refused, as the density would do
    nothing.
    """

    kind: str = "pisa"
    density: float = 0.15
    order: int = 1
    use_bias: bool = True
    block_size: int = 64
    exact_text: bool = False
    implementation: str = "auto"

    def __post_init__(self):
        check_choice("kind", self.kind, KINDS)
        if self.kind == "dense":
            defaults = AttentionPolicy.__dataclass_fields__
            given = {f: getattr(self, f) for f in defaults if f != "kind"
                     and getattr(self, f) != defaults[f].default}
            if given:
                raise ValueError("AttentionPolicy(kind='dense') takes no PISA options (they "
                                 f"would do nothing); got {given}")
            return
        object.__setattr__(self, "density", check_density(self.density))
        check_choice("order", self.order, ORDERS)
        check_block_size(self.block_size)
        check_bool("use_bias", self.use_bias)
        check_bool("exact_text", self.exact_text)
        # Warns at the code that builds the policy (through __init__ and __post_init__).
        object.__setattr__(self, "implementation",
                           check_implementation(self.implementation, stacklevel=4))


DENSE = AttentionPolicy(kind="dense")


def layer_policies(num_layers: int, *, dense_layers: int = 4, **pisa_options) -> tuple:
    """The published FLUX setting by default: first `dense_layers` dense, the rest PISA.

    `pisa_options` are `AttentionPolicy` fields of the PISA layers (density, order, ...);
    they are refused when every layer is dense, since they would do nothing.
    """
    for name, value, low in (("num_layers", num_layers, 1), ("dense_layers", dense_layers, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    if dense_layers > num_layers:
        raise ValueError(f"dense_layers must be in [0, num_layers = {num_layers}]; "
                         f"got {dense_layers}")
    if "kind" in pisa_options:
        raise TypeError("layer_policies sets each layer's kind itself; got kind="
                        f"{pisa_options['kind']!r}")
    if dense_layers == num_layers and pisa_options:
        raise ValueError(f"all {num_layers} layers are dense (dense_layers = {dense_layers}): "
                         f"the PISA options {sorted(pisa_options)} would do nothing")
    pisa = AttentionPolicy(kind="pisa", **pisa_options)
    return tuple(DENSE if i < dense_layers else pisa for i in range(num_layers))


def model_policies(num_layers: int, attention: str = "pisa", **options) -> tuple:
    """One policy per attention layer of a model, from its `attention` setting.

    "pisa": `layer_policies` (the published setting: the first 4 layers dense, fewer when
    the model has fewer layers, then PISA with `options` as there). "dense": every layer
    dense; options are refused since they would do nothing. Raises ValueError for another
    `attention`.
    """
    if attention == "dense":
        if options:
            raise ValueError(f"attention='dense' takes no PISA options (they would do "
                             f"nothing); got {sorted(options)}")
        return (DENSE,) * num_layers
    if attention != "pisa":
        raise ValueError(f"attention must be 'pisa' or 'dense'; got {attention!r}")
    if isinstance(num_layers, numbers.Integral) and not isinstance(num_layers, bool):
        options = {"dense_layers": min(4, num_layers)} | options
    return layer_policies(num_layers, **options)


class Attention(nnx.Module):
    """Parameter-free attention op of one layer, following its `AttentionPolicy`.

    Call with q, k, v `[B, T, H, D]` (layout "bthd", the default, as everywhere in
    pisa_jax) or `[B, H, T, D]` with `layout="bhtd"`; returns the same layout and dtype.
    `num_text_tokens` (>= 0) counts the text tokens at the start of a joint sequence.
    `dense=True` forces dense attention for this call (e.g. a sampler's first steps).
    Dense attention is cuDNN on a GPU (half types) and XLA elsewhere.
    """

    def __init__(self, policy: AttentionPolicy = DENSE):
        if not isinstance(policy, AttentionPolicy):
            raise TypeError(f"policy must be an AttentionPolicy; got {type(policy).__name__}")
        self.policy = policy

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, num_text_tokens: int = 0,
                 dense: bool = False, layout: str = "bthd") -> jax.Array:
        p = self.policy
        if (isinstance(num_text_tokens, bool) or not isinstance(num_text_tokens, numbers.Integral)
                or num_text_tokens < 0):
            raise ValueError(f"num_text_tokens must be an integer >= 0; got {num_text_tokens!r}")
        if check_bool("dense", dense) or p.kind == "dense":
            return dense_attention(q, k, v, layout=layout)
        forced = None
        if p.exact_text and num_text_tokens > 0 and getattr(q, "ndim", 0) == 4:
            check_choice("layout", layout, LAYOUTS)
            t = q.shape[token_axis(layout)]
            forced = range(min(num_blocks(num_text_tokens, p.block_size), num_blocks(t, p.block_size)))
        return piecewise_sparse_attention(
            q, k, v, density=p.density, block_size=p.block_size, order=p.order,
            use_bias=p.use_bias, forced_blocks=forced, layout=layout,
            implementation=p.implementation)
