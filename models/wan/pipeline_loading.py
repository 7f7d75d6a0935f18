"""Loading a Wan2.1 text-to-video pipeline's parts: where each component is (a diffusers
pipeline folder, or a path per component), the scheduler config and its sigmas, and the
loaders that read them. `WanPipeline.from_pretrained` (in `models.wan.pipeline`) is the
public entry point.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import jax.numpy as jnp
import numpy as np

from models.checkpoint import CheckpointError, read_json
from models.pipeline_common import component_paths as common_component_paths
from models.wan.sampling import FLOW_SHIFT, NUM_TRAIN_TIMESTEPS

COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae")
_EULER = "FlowMatchEulerDiscreteScheduler"
_UNIPC = "UniPCMultistepScheduler"


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The flow-matching schedule: a constant `shift` (diffusers' `shift` of
    FlowMatchEulerDiscreteScheduler, `flow_shift` of Wan's UniPCMultistepScheduler) and
    the scheduler class the folder named (`source`; the sampler is Euler either way)."""
    shift: float = FLOW_SHIFT["480p"]
    source: str = _EULER

    def __post_init__(self):
        if not (isinstance(self.shift, (int, float)) and self.shift > 0):
            raise ValueError(f"SchedulerConfig: shift must be a positive number; got "
                             f"{self.shift!r}")

    @classmethod
    def from_diffusers(cls, path: str) -> "SchedulerConfig":
        """From a diffusers `scheduler_config.json`: FlowMatchEulerDiscreteScheduler with
        a constant shift (taken as is), or Wan's UniPCMultistepScheduler with flow sigmas
        (its `flow_shift` is used with the Euler sampler, with a warning). Raises
        `CheckpointError` naming the file for any other class or setting."""
        c = read_json(path)
        kind = c.get("_class_name")
        if kind == _EULER:
            bad = [k for k in ("use_dynamic_shifting", "use_karras_sigmas",
                               "use_exponential_sigmas", "use_beta_sigmas", "shift_terminal",
                               "invert_sigmas", "stochastic_sampling") if c.get(k)]
            if bad or c.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS) != NUM_TRAIN_TIMESTEPS:
                raise CheckpointError(
                    f"{path}: only a constant shift over {NUM_TRAIN_TIMESTEPS} training steps "
                    f"is supported; the config sets {bad or c.get('num_train_timesteps')}")
            return cls(shift=float(c.get("shift", 1.0)), source=_EULER)
        if kind == _UNIPC:
            if not (c.get("use_flow_sigmas") or c.get("prediction_type") == "flow_prediction"):
                raise CheckpointError(f"{path}: a UniPCMultistepScheduler without flow sigmas "
                                      "(use_flow_sigmas) is not a flow-matching schedule")
            shift = float(c.get("flow_shift", 1.0))
            warnings.warn(f"{path}: the folder's scheduler is UniPCMultistepScheduler, which is "
                          f"not implemented; sampling uses the flow-matching Euler sampler "
                          f"with its flow_shift {shift} (diffusers' "
                          f"FlowMatchEulerDiscreteScheduler(shift={shift}) schedule)",
                          UserWarning, stacklevel=4)
            return cls(shift=shift, source=_UNIPC)
        raise CheckpointError(f"{path}: scheduler {kind!r} is not supported; expected "
                              f"{_EULER} or {_UNIPC} (flow sigmas)")

    def sigmas(self, num_steps: int) -> np.ndarray:
        """`num_steps + 1` float32 sigmas from 1 to 0, as diffusers'
        FlowMatchEulerDiscreteScheduler(shift).set_timesteps(num_steps) gives them.

        diffusers spaces the steps uniformly between 1 and its smallest training sigma (the
        shifted 1/1000, computed in float32) and shifts them a second time:
        `s -> shift s / (1 + (shift - 1) s)`; a final 0 is appended. (This differs from
        `models.wan.sampling.schedule`, the official code's grid from 1 to 0 shifted once.)
        The model's timestep is `1000 * sigma` in float32.
        """
        n = int(num_steps)
        if n != num_steps or n < 1:
            raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")
        f32 = np.float32
        last = f32(1.0) / f32(NUM_TRAIN_TIMESTEPS)       # the last training sigma, float32
        sigma_min = float(f32(self.shift) * last / (f32(1.0) + f32(self.shift - 1.0) * last))
        s = np.linspace(NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, n)
        s = s / NUM_TRAIN_TIMESTEPS
        s = self.shift * s / (1 + (self.shift - 1) * s)
        return np.append(s.astype(np.float32), np.float32(0.0))


# ------------------------------------------------------------------------- loading

def load_components(path: str | None, *, dtype=jnp.bfloat16, vae_dtype=None,
                    attention: str = "pisa", policies=None, given: dict | None = None,
                    **policy_options) -> tuple[tuple, SchedulerConfig | None]:
    """((transformer, text_encoder, vae, tokenizer), scheduler config or None) read from the
    places `component_paths(path, given)` gives; the scheduler config is read first from
    `path/scheduler/` when there is one. Arguments and errors are
    `WanPipeline.from_pretrained`'s."""
    from models.text_encoders import load_t5
    from models.text_encoders.tokenizers import T5Tokenizer
    from models.wan.autoencoder import load_wan_autoencoder
    from models.wan.convert import load_wan
    paths = component_paths(path, given or {})
    sched_file = os.path.join(path or "", "scheduler", "scheduler_config.json")
    sched = (SchedulerConfig.from_diffusers(sched_file)
             if path is not None and os.path.isfile(sched_file) else None)
    text_config = os.path.join(paths["text_encoder"], "config.json")
    if os.path.isfile(text_config) and read_json(text_config).get("model_type") != "umt5":
        raise CheckpointError(f"{text_config}: Wan2.1's text encoder is umT5 (model_type "
                              f"'umt5', UMT5EncoderModel); got model_type "
                              f"{read_json(text_config).get('model_type')!r}")
    transformer = load_wan(paths["transformer"], dtype=dtype, attention=attention,
                           policies=policies, **policy_options)
    parts = (transformer, load_t5(paths["text_encoder"], dtype=dtype),
             load_wan_autoencoder(paths["vae"], dtype=vae_dtype or dtype),
             T5Tokenizer.from_folder(paths["tokenizer"]))
    return parts, sched


def component_paths(path: str | None, given: dict) -> dict[str, str]:
    """Where each component is: `given[name]` (relative to `path` unless it exists as
    given or is absolute) or `path/name`. Raises `CheckpointError` naming what is missing."""
    return common_component_paths(path, given, COMPONENTS, "Wan2.1")
