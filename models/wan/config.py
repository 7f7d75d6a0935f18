"""Wan2.1 transformer hyperparameters: one frozen dataclass, one instance per released variant."""

from __future__ import annotations

import dataclasses
import json

# Frame x height x width tile of one 64-token block in the video self-attention: the
# lowest PISA error against dense among the 64-token tiles measured (benchmarks/wan.py).
DEFAULT_TILE = (4, 4, 4)


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Wan2.1 diffusion transformer (names as in the official code's `WanModel`).

    Attributes:
      dim, num_heads, num_layers, ffn_dim: width, heads, blocks, feed-forward width.
      in_channels, out_channels: latent channels (16 for text-to-video).
      text_dim: width of the text encoder's states (umT5-XXL: 4096).
      text_len: text tokens the model was trained with (512): the official model zero-pads
        every prompt's states to this length, and cross-attention attends over all of them,
        padding included (`models.wan.pad_text`; `denoise` pads).
      freq_dim: width of the sinusoidal timestep embedding.
      patch_size: (frames, height, width) of one patch.
      eps: epsilon of every norm.
      theta: rotary embedding base.
      qk_norm: RMS norm on queries and keys (across all heads).
      cross_attn_norm: affine layer norm before the cross-attention.
      image_dim: width of the image encoder's states for image-to-video (CLIP: 1280); None
        for text-to-video. Image-to-video is not implemented yet.
    """

    dim: int = 5120
    num_heads: int = 40
    num_layers: int = 40
    ffn_dim: int = 13824
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    theta: float = 10_000.0
    qk_norm: bool = True
    cross_attn_norm: bool = True
    image_dim: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        positive = ("dim", "num_heads", "num_layers", "ffn_dim", "in_channels",
                    "out_channels", "text_dim", "text_len", "freq_dim")
        bad = {n: getattr(self, n) for n in positive
               if not isinstance(getattr(self, n), int) or getattr(self, n) < 1}
        if bad:
            raise ValueError(f"WanConfig: expected positive ints; got {bad}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (frames, height, width); "
                             f"got {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of num_heads "
                             f"({self.num_heads})")
        if self.head_dim % 2 or min(self.rope_dims) < 2:
            raise ValueError(f"head dim {self.head_dim} must be even and at least 6 so that "
                             f"each rotary axis gets a pair; got axes {self.rope_dims}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even; got {self.freq_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head dims given to the frame, height and width rotations (44/42/42 for 128)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    @property
    def num_attention_layers(self) -> int:
        """Self-attention layers, the ones a policy applies to (cross-attention is dense)."""
        return self.num_layers

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "WanConfig":
        return cls(**json.loads(text))


WAN_T2V_1_3B = WanConfig(dim=1536, num_heads=12, num_layers=30, ffn_dim=8960)
WAN_T2V_14B = WanConfig(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824)
