"""Text encoders shared by the diffusion pipelines: T5 v1.1 (FLUX's `text_encoder_2`),
umT5 (Wan2.1's `text_encoder`, the same T5 code with a bias table per layer) and the CLIP
text transformer (FLUX's `text_encoder`), loaded from transformers folders."""

from models.text_encoders.clip import (CLIP_VIT_L14_TEXT, CLIPTextConfig, CLIPTextModel,
                                       load_clip)
from models.text_encoders.t5 import T5_V1_1_XXL, UMT5_XXL, T5Config, T5Encoder, load_t5

__all__ = ["CLIP_VIT_L14_TEXT", "CLIPTextConfig", "CLIPTextModel", "load_clip",
           "T5_V1_1_XXL", "UMT5_XXL", "T5Config", "T5Encoder", "load_t5"]
