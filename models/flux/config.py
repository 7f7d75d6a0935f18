"""FLUX.1 hyperparameters: one frozen dataclass, one instance per released variant."""

from __future__ import annotations

import dataclasses
import json
import numbers


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "vec_in_dim", "context_in_dim",
                     "hidden_size", "num_heads", "depth", "depth_single_blocks", "theta"):
            value = getattr(self, name)
            low = 0 if name.startswith("depth") else 1
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"FluxConfig.{name} must be an integer >= {low}; got {value!r}")
        if (isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, numbers.Real)
                or not self.mlp_ratio > 0):
            raise ValueError(f"FluxConfig.mlp_ratio must be a positive number; got "
                             f"{self.mlp_ratio!r}")
        for name in ("qkv_bias", "guidance_embed"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FluxConfig.{name} must be True or False; got "
                                 f"{getattr(self, name)!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_heads ({self.num_heads})")
        try:
            axes = tuple(self.axes_dim)
        except TypeError:
            axes = None
        if (axes is None or len(axes) != 3 or any(isinstance(a, bool) or not isinstance(a, numbers.Integral)
                            for a in axes)
                or any(a <= 0 or a % 2 for a in axes) or sum(axes) != self.head_dim):
            raise ValueError(f"axes_dim (the rotary embedding's dims per position axis) must be "
                             f"three positive even integers (one per id axis) summing to the head dim "
                             f"{self.head_dim} = hidden_size / num_heads; got {self.axes_dim!r}")
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in axes))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_attention_layers(self) -> int:
        return self.depth + self.depth_single_blocks

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "FluxConfig":
        return cls(**json.loads(text))


FLUX_DEV = FluxConfig()
FLUX_SCHNELL = FluxConfig(guidance_embed=False)
