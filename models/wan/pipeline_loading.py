"""Loading a Wan2.1 text-to-video pipeline's parts: where each component is (a diffusers
pipeline folder, or a path per component), the scheduler config and its sigmas, and the
loaders that read them. `WanPipeline.from_pretrained` (in `models.wan.pipeline`) is the
public entry point.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax.numpy as jnp
import numpy as np

from models.checkpoint import CheckpointError, read_json
from models.pipeline_common import component_paths as common_component_paths
from models.wan.sampling import FLOW_SHIFT, NUM_TRAIN_TIMESTEPS
from models.wan.unipc import UniPCConfig, unipc_sigmas

COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae")
_EULER = "FlowMatchEulerDiscreteScheduler"
_UNIPC = "UniPCMultistepScheduler"


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The flow-matching sampler: a constant `shift` (diffusers' `shift` of
    FlowMatchEulerDiscreteScheduler, `flow_shift` of Wan's UniPCMultistepScheduler), the
    scheduler class the folder named (`source`), which picks the solver (Euler, or UniPC,
    `models.wan.unipc`), and UniPC's settings (`unipc`: `UniPCConfig()` by default when
    `source` is UniPC, None for Euler). Raises ValueError for a bad shift or source, or
    UniPC settings given with Euler; TypeError if `unipc` is not a UniPCConfig."""
    shift: float = FLOW_SHIFT["480p"]
    source: str = _EULER
    unipc: UniPCConfig | None = None

    def __post_init__(self):
        if not (isinstance(self.shift, (int, float)) and not isinstance(self.shift, bool)
                and math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"SchedulerConfig: shift must be a finite positive number; got "
                             f"{self.shift!r}")
        if self.source not in (_EULER, _UNIPC):
            raise ValueError(f"SchedulerConfig: source must be {_EULER!r} or {_UNIPC!r}; got "
                             f"{self.source!r}")
        if self.unipc is not None and not isinstance(self.unipc, UniPCConfig):
            raise TypeError(f"SchedulerConfig: unipc must be a UniPCConfig or None; got "
                            f"{type(self.unipc).__name__}")
        if self.source == _UNIPC and self.unipc is None:
            object.__setattr__(self, "unipc", UniPCConfig())
        if self.source == _EULER and self.unipc is not None:
            raise ValueError(f"SchedulerConfig: unipc settings were given with source "
                             f"{_EULER!r}; use source={_UNIPC!r}")

    @property
    def solver(self) -> str:
        """"unipc" or "euler": the sampling loop that runs."""
        return "unipc" if self.source == _UNIPC else "euler"

    @classmethod
    def from_diffusers(cls, path: str) -> "SchedulerConfig":
        """From a diffusers `scheduler_config.json`: FlowMatchEulerDiscreteScheduler with
        a constant shift, or UniPCMultistepScheduler with flow sigmas (Wan's released
        folders), each followed exactly. Raises `CheckpointError` naming the file (and the
        keys) for any other class or a setting that is not implemented."""
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
            return cls(shift=_shift(c, "shift", path), source=_EULER)
        if kind == _UNIPC:
            return cls(shift=_shift(c, "flow_shift", path), source=_UNIPC,
                       unipc=_unipc_settings(c, path))
        raise CheckpointError(f"{path}: scheduler {kind!r} is not supported; expected "
                              f"{_EULER} or {_UNIPC} (flow sigmas)")

    def plan(self, num_steps: int):
        """What the sampling loop takes for `num_steps` steps: the `[num_steps + 1]` sigmas
        (Euler) or a `UniPCSchedule` (UniPC), numpy on the host."""
        if self.unipc is not None:
            return self.unipc.schedule(num_steps, self.shift)
        return self.sigmas(num_steps)

    def sigmas(self, num_steps: int) -> np.ndarray:
        """`num_steps + 1` float32 sigmas from 1 to 0 of the solver that runs. UniPC:
        `models.wan.unipc.unipc_sigmas` (its model timesteps are integers, see there).
        Euler: as diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps(num_steps)
        gives them.

        diffusers spaces the steps uniformly between 1 and its smallest training sigma (the
        shifted 1/1000, computed in float32) and shifts them a second time:
        `s -> shift s / (1 + (shift - 1) s)`; a final 0 is appended. (This differs from
        `models.wan.sampling.schedule`, the official code's grid from 1 to 0 shifted once.)
        The model's timestep is `1000 * sigma` in float32.
        """
        if self.unipc is not None:
            return unipc_sigmas(num_steps, self.shift)[0]
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


def _shift(c: dict, key: str, path: str) -> float:
    """The shift `c[key]` of a scheduler config read from `path` (diffusers' default 1.0);
    `CheckpointError` naming the file and the key unless it is a finite positive number."""
    value = c.get(key, 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (math.isfinite(value) and value > 0):
        raise CheckpointError(f"{path}: {key} must be a finite positive number; got "
                              f"{value!r}")
    return float(value)


# Keys of UniPCMultistepScheduler and the values implemented (others are refused; the
# beta schedule and timestep spacing have no effect with flow sigmas).
_UNIPC_FIXED = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "predict_x0": True,
                "thresholding": False, "use_karras_sigmas": False,
                "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "final_sigmas_type": "zero", "use_dynamic_shifting": False,
                "shift_terminal": None, "solver_p": None}
# diffusers runs these solver types as bh2.
_BH2 = ("bh2", "midpoint", "heun", "logrho")


def _unipc_settings(c: dict, path: str) -> UniPCConfig:
    """The UniPC solver settings of a diffusers UniPCMultistepScheduler config `c` (read
    from `path`); `CheckpointError` naming the keys that are not implemented."""
    if not c.get("use_flow_sigmas") or c.get("prediction_type") != "flow_prediction":
        raise CheckpointError(f"{path}: a UniPCMultistepScheduler without flow sigmas "
                              f"(use_flow_sigmas true, prediction_type 'flow_prediction') is "
                              f"not a flow-matching schedule; got use_flow_sigmas="
                              f"{c.get('use_flow_sigmas')!r}, prediction_type="
                              f"{c.get('prediction_type')!r}")
    # An unset flag (false, null) is the default off.
    bad = {k: c[k] for k, want in _UNIPC_FIXED.items()
           if k in c and c[k] != want and (want not in (False, None) or c[k])}
    order = c.get("solver_order", 2)
    if isinstance(order, bool) or order not in (1, 2, 3):
        bad["solver_order"] = order
    if c.get("solver_type", "bh2") not in _BH2:
        bad["solver_type"] = c["solver_type"]
    if not c.get("lower_order_final", True) and order != 1:
        bad["lower_order_final"] = c["lower_order_final"]   # diffusers' last step is NaN
    skip = c.get("disable_corrector") or []
    if not isinstance(skip, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in skip):
        bad["disable_corrector"] = skip
    if bad:
        want = {k: repr(v) for k, v in _UNIPC_FIXED.items()} | {
            "solver_order": "1, 2 or 3", "solver_type": "'bh2'",
            "lower_order_final": "True, or any with solver_order 1",
            "disable_corrector": "a list of step indices >= 0"}
        raise CheckpointError(
            f"{path}: UniPCMultistepScheduler settings not implemented: "
            + ", ".join(f"{k}={v!r} (implemented: {want[k]})" for k, v in bad.items()))
    return UniPCConfig(solver_order=int(order), disable_corrector=tuple(skip))


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
