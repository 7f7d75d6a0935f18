"""Loading a FLUX.1 pipeline's parts: where each component is (a diffusers pipeline
folder, or a path per component), the scheduler config, and the loaders that read them.
`FluxPipeline.from_pretrained` (in `models.flux.pipeline`) is the public entry point.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import jax.numpy as jnp
import numpy as np

from models.checkpoint import CheckpointError, read_json
from models.flux.sampling import schedule
from models.pipeline_common import component_paths as common_component_paths

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae", "tokenizer",
              "tokenizer_2")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The flow-matching schedule as diffusers' FlowMatchEulerDiscreteScheduler config
    names it (`use_dynamic_shifting`, `shift`, `base_shift`, `max_shift`,
    `base_image_seq_len`, `max_image_seq_len`)."""
    dynamic_shift: bool = True
    shift: float = 1.0
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_tokens: int = 256
    max_tokens: int = 4096

    def __post_init__(self):
        if self.shift <= 0 or self.max_tokens <= self.base_tokens:
            raise ValueError(f"SchedulerConfig: shift must be > 0 and max_tokens > base_tokens;"
                             f" got {self}")

    @classmethod
    def for_variant(cls, guidance_embed: bool) -> "SchedulerConfig":
        """FLUX.1-dev's (dynamic shift) or FLUX.1-schnell's (none)."""
        return cls(dynamic_shift=guidance_embed)

    @classmethod
    def from_diffusers(cls, path: str) -> "SchedulerConfig":
        c = read_json(path)
        if c.get("time_shift_type", "exponential") != "exponential" or any(
                c.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas",
                                   "use_beta_sigmas", "shift_terminal", "invert_sigmas")):
            raise CheckpointError(f"{path}: only FLUX's exponential time shift is supported")
        return cls(dynamic_shift=bool(c.get("use_dynamic_shifting", False)),
                   shift=float(c.get("shift", 1.0)), base_shift=c.get("base_shift", 0.5),
                   max_shift=c.get("max_shift", 1.15),
                   base_tokens=c.get("base_image_seq_len", 256),
                   max_tokens=c.get("max_image_seq_len", 4096))

    def sigmas(self, num_steps: int, image_tokens: int) -> np.ndarray:
        return schedule(num_steps, image_tokens, shift=self.dynamic_shift,
                        base_shift=self.base_shift, max_shift=self.max_shift,
                        base_tokens=self.base_tokens, max_tokens=self.max_tokens,
                        constant_shift=self.shift)


def scheduler_for_variant(scheduler: SchedulerConfig | None, is_dev: bool) -> SchedulerConfig:
    """`scheduler`, or the variant's (dev: `is_dev`) when none is given or when its dynamic
    shifting contradicts the variant's, with a warning saying which and why."""
    own = SchedulerConfig.for_variant(is_dev)
    if scheduler is None:
        return own
    if scheduler.dynamic_shift != is_dev:
        variant, other = ("dev", "schnell") if is_dev else ("schnell", "dev")
        warnings.warn(
            f"the scheduler config has use_dynamic_shifting={scheduler.dynamic_shift}, "
            f"which is FLUX.1-{other}'s schedule, but the transformer's weights are "
            f"FLUX.1-{variant}'s ({'with' if is_dev else 'without'} a guidance embedding): "
            f"using FLUX.1-{variant}'s schedule ("
            + ("shift growing with the image size" if is_dev else "no shift") + ")",
            stacklevel=3)
        return own
    return scheduler


# ------------------------------------------------------------------------- loading

def load_components(path: str | None, *, dtype=jnp.bfloat16, attention: str = "pisa",
                    policies=None, given: dict | None = None, **policy_options
                    ) -> tuple[tuple, SchedulerConfig | None]:
    """((transformer, text_encoder, text_encoder_2, vae, tokenizer, tokenizer_2), scheduler
    config or None) read from the places `component_paths(path, given)` gives; the
    scheduler config is read from `path/scheduler/` when there is one. Arguments and errors
    are `FluxPipeline.from_pretrained`'s."""
    from models.flux.autoencoder import load_autoencoder
    from models.flux.convert import load_flux
    from models.text_encoders import load_clip, load_t5
    from models.text_encoders.tokenizers import CLIPTokenizer, T5Tokenizer
    paths = component_paths(path, given or {})
    # Read first: a scheduler config we refuse should not cost loading the weights.
    sched_file = os.path.join(path or "", "scheduler", "scheduler_config.json")
    sched = (SchedulerConfig.from_diffusers(sched_file)
             if path is not None and os.path.isfile(sched_file) else None)
    flux = load_flux(paths["transformer"], dtype=dtype, attention=attention,
                     policies=policies, **policy_options)
    parts = (flux, load_clip(paths["text_encoder"], dtype=dtype),
             load_t5(paths["text_encoder_2"], dtype=dtype),
             load_autoencoder(paths["vae"], dtype=dtype),
             CLIPTokenizer.from_folder(paths["tokenizer"]),
             T5Tokenizer.from_folder(paths["tokenizer_2"]))
    return parts, sched


def component_paths(path: str | None, given: dict) -> dict[str, str]:
    """Where each component is: `given[name]` (relative to `path` unless it exists as
    given or is absolute) or `path/name`. Raises `CheckpointError` naming what is missing."""
    return common_component_paths(path, given, COMPONENTS, "FLUX.1")
