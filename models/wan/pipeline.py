"""Wan2.1 text-to-video in JAX: prompt -> umT5 -> flow-matching sampling (UniPC or Euler)
with guidance -> video VAE.

`WanPipeline` follows diffusers' `WanPipeline` (text-to-video, Wan2.1): the same call
arguments and defaults, the same prompt cleaning, the same text states (umT5 with an
attention mask, each prompt's states cut to its real length and zero-padded back to
`max_sequence_length`), the same latent layout (`latents=` accepts diffusers' tensors
`[B, 16, F', H/8, W/8]`, so the same noise gives the same video), classifier-free
guidance when `guidance_scale > 1` with an empty negative prompt by default, and the
same post-processing (float32 `[B, F, H, W, 3]` in [0, 1]). Each stage is one compiled
function per shape, cached on the pipeline: the text encoder, the whole denoising loop
(a `fori_loop` over the steps, the conditional and unconditional passes as one batch of
2B) and the VAE decoder. A second call at the same batch size, size, frame count and
step count traces and compiles nothing.

The call returns a `WanPipelineOutput` whose `.frames` are the videos, or `(frames,)`
with `return_dict=False`, as diffusers' does.

Sampler: the folder's. FlowMatchEulerDiscreteScheduler (a constant shift): flow-matching
Euler on its sigmas (`SchedulerConfig.sigmas`). UniPCMultistepScheduler with flow sigmas,
which diffusers' released Wan2.1 folders ship (flow_shift 3.0 for 480p, 5.0 for 720p):
diffusers' UniPC predictor-corrector (`models.wan.unipc`; orders 1-3, bh2, data
prediction, lower order at the last steps; other settings are refused at loading). Both
are followed exactly: the same `latents` give diffusers' video. The sigmas and solver
coefficients are computed on the host and are inputs of the compiled loop.

Prompt cleaning: diffusers unescapes HTML entities twice, strips, and collapses runs of
whitespace to one space; so does this pipeline. When the `ftfy` package is installed
diffusers also runs `ftfy.fix_text` (repairing mis-decoded text such as "cafÃ©"); this
pipeline does not, so such prompts can tokenize differently.

Other differences from diffusers: noise comes from `jax.random` (pass `latents` for the
same video as torch gives); the latents stay float32 through the loop and enter the
transformer in float32 (diffusers casts them to the model dtype); sizes and frame counts
that diffusers rounds with a warning are errors here; there is no
`num_videos_per_prompt` (repeat the prompt), `generator` (give `seed` or `latents`),
`prompt_embeds`, `callback_on_step_end` (see `progress`), Wan2.2's `transformer_2` /
`boundary_ratio`, or `output_type="pt"`.

The batch is split over the pipeline's devices with `shard_map` (weights replicated, each
device running the whole loop on its share); a batch that does not divide is padded with
copies of its last video, dropped from the result. Finding and reading the components is
`models.wan.pipeline_loading`.
"""

from __future__ import annotations

import dataclasses
import html
import re
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from models.pipeline_common import (CompiledStages, StageClock, check_int, check_latents,
                                    check_prompt, check_real, check_seed, euler_loop)
from models.wan.autoencoder import from_transformer_layout
from models.wan.pipeline_loading import SchedulerConfig, load_components
from models.wan.sampling import NUM_TRAIN_TIMESTEPS
from models.wan.unipc import unipc_loop

OUTPUT_TYPES = ("np", "pil", "latent")
# diffusers' whitespace (the `regex` module's \s): Python's \s without \x1c-\x1f.
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")


def clean_prompt(text: str) -> str:
    """diffusers' Wan prompt cleaning without ftfy: HTML entities unescaped twice, then
    runs of whitespace collapsed to one space, ends stripped."""
    return _WHITESPACE.sub(" ", html.unescape(html.unescape(text)).strip()).strip()


@dataclasses.dataclass(frozen=True)
class WanPipelineOutput:
    """What `WanPipeline.__call__` returns (as diffusers' `WanPipelineOutput`): `frames` is
    a float32 `[B, F, H, W, 3]` array in [0, 1], a list (per video) of lists of PIL
    images, or the final latents `[B, 16, F', H/8, W/8]`, following `output_type`."""
    frames: list | np.ndarray


def to_pil(videos: np.ndarray) -> list:
    """float `[B, F, H, W, 3]` in [0, 1] -> per video, a list of PIL frames (rounded as
    diffusers does)."""
    from PIL import Image
    return [[Image.fromarray(f) for f in v] for v in (videos * 255).round().astype(np.uint8)]


class WanPipeline(CompiledStages):
    """Wan2.1 text-to-video; see `from_pretrained` and `__call__`.

    Args:
      transformer: a `models.wan.Wan`.
      text_encoder: a umT5 `models.text_encoders.t5.T5Encoder`.
      vae: a `models.wan.WanAutoencoder`.
      tokenizer: a `T5Tokenizer` (`tok(prompts, max_length) -> ids`).
      scheduler: a `SchedulerConfig` (default: shift 3.0, diffusers' advice for 480p).
      devices: the devices the batch is split over (default: every local device).
    Raises ValueError when the parts do not fit together (latent channels, text width).
    """

    def __init__(self, transformer, text_encoder, vae, tokenizer, *,
                 scheduler: SchedulerConfig | None = None,
                 devices: Sequence[jax.Device] | None = None):
        self.config = c = transformer.config
        if c.in_channels != vae.config.z_dim or c.out_channels != vae.config.z_dim:
            raise ValueError(f"the transformer takes {c.in_channels} and gives "
                             f"{c.out_channels} latent channels; the VAE has "
                             f"{vae.config.z_dim}")
        if c.text_dim != text_encoder.config.d_model:
            raise ValueError(f"the transformer takes text states of width {c.text_dim}; the "
                             f"text encoder gives {text_encoder.config.d_model}")
        self.scheduler = scheduler or SchedulerConfig()
        self.has_pisa = bool(transformer.block_size)
        self.spatial_factor = vae.config.spatial_factor * c.patch_size[1]
        self.temporal_factor = vae.config.temporal_factor
        self.tokenizer = tokenizer
        self._hold(dict(transformer=transformer, t5=text_encoder, vae=vae), devices)
        # Built once per pipeline; `_run` lowers and compiles each once per shape.
        self._jits = {"encode": jax.jit(self._encode),
                      "noise": jax.jit(self._noise, static_argnames="shape"),
                      "denoise": jax.jit(self._denoise,
                                         static_argnames=("guided", "dense_steps", "solver")),
                      "decode": jax.jit(self._decode)}

    # --------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | None = None, *, dtype=jnp.bfloat16, vae_dtype=None,
                        attention: str = "pisa", policies=None,
                        devices: Sequence[jax.Device] | None = None,
                        transformer: str | None = None, text_encoder: str | None = None,
                        vae: str | None = None, tokenizer: str | None = None,
                        **policy_options) -> "WanPipeline":
        """Loads a Wan2.1 text-to-video pipeline folder.

        `path` is a diffusers pipeline folder (`model_index.json`, `transformer/`,
        `text_encoder/` (UMT5EncoderModel), `tokenizer/`, `vae/`, optionally
        `scheduler/`); `transformer/` may also be an official or converted checkpoint
        (`models.wan.convert`). A keyword naming a component replaces its path (relative
        to `path` unless it exists as given or is absolute; `path=None` when all four are
        given). `dtype` (bfloat16 or float32) is the transformer's and text encoder's,
        `vae_dtype` the VAE's (default: `dtype`). `attention` ("pisa": the published
        setting, or "dense"), `policies` (one `AttentionPolicy` per layer) and
        `policy_options` (e.g. `density=0.15`) are as in `models.wan.load_wan`.

        The scheduler config (see the module docstring): FlowMatchEulerDiscreteScheduler
        with a constant shift (Euler), or UniPCMultistepScheduler with flow sigmas
        (UniPC); none: Euler with shift 3.0. Raises `CheckpointError` naming a missing
        component and where it was looked for, an unreadable file, or a scheduler config
        that is neither or sets something not implemented (naming the keys).
        """
        t0 = time.perf_counter()
        parts, sched = load_components(
            path, dtype=dtype, vae_dtype=vae_dtype, attention=attention, policies=policies,
            given=dict(transformer=transformer, text_encoder=text_encoder, vae=vae,
                       tokenizer=tokenizer), **policy_options)
        pipe = cls(*parts, scheduler=sched, devices=devices)
        jax.block_until_ready(pipe._states)
        pipe.load_seconds = time.perf_counter() - t0
        return pipe

    # ---------------------------------------------------------- traced stages
    def _encode(self, state, ids, lengths):
        self.traces["encode"] += 1

        def local(state, ids, lengths):
            keep = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]       # [B, L]
            states = nnx.merge(self._graphs["t5"], state)(ids, keep.astype(jnp.int32))
            # diffusers keeps each prompt's real tokens and zero-pads the rest.
            return jnp.where(keep[..., None], states, 0).astype(states.dtype)
        b = P("batch")
        return self._per_device(local, (P(), b, b), b)(state, ids, lengths)

    def _noise(self, seeds, *, shape):
        self.traces["noise"] += 1
        draw = lambda s: jax.random.normal(jax.random.key(s), shape, jnp.float32)
        return jax.vmap(draw)(seeds)

    def _denoise(self, state, latents, context, negative, guidance, plan, *, guided,
                 dense_steps, solver):
        # `plan`: the sigmas (solver "euler") or a UniPCSchedule ("unipc"), replicated.
        self.traces["denoise"] += 1

        def local(state, latents, context, negative, guidance, plan):
            model = nnx.merge(self._graphs["transformer"], state)
            both = jnp.concatenate([context, negative]) if guided else context
            g = guidance[:, None, None, None, None]

            # `t`: the transformer's timestep [B] in [0, 1000]. unipc_loop passes its
            # integer timesteps as they are; euler_loop passes the sigma, scaled below.
            def velocity(x, t, dense):
                xs = jnp.concatenate([x, x]) if guided else x
                v = model(xs, jnp.concatenate([t, t]) if guided else t, both, dense=dense)
                if not guided:
                    return v
                v_cond, v_uncond = jnp.split(v, 2)
                return v_uncond + g * (v_cond - v_uncond)

            if solver == "unipc":
                return unipc_loop(velocity, latents, plan, dense_steps=dense_steps,
                                  on_step=self._report_step)
            return euler_loop(
                lambda x, sigma, dense: velocity(x, NUM_TRAIN_TIMESTEPS * sigma, dense),
                latents, plan, dense_steps=dense_steps, on_step=self._report_step)
        b = P("batch")
        return self._per_device(local, (P(), b, b, b, b, P()), b)(
            state, latents, context, negative, guidance, plan)

    def _decode(self, state, latents):
        self.traces["decode"] += 1

        def local(state, latents):
            video = nnx.merge(self._graphs["vae"], state).decode(
                from_transformer_layout(latents))
            return jnp.clip(video.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
        return self._per_device(local, (P(), P("batch")), P("batch"))(state, latents)

    # ------------------------------------------------------------------ text
    def encode_prompt(self, prompt: str | Sequence[str],
                      negative_prompt: str | Sequence[str] | None = None, *,
                      do_classifier_free_guidance: bool = True,
                      max_sequence_length: int = 512) -> tuple[jax.Array, jax.Array | None]:
        """(prompt states, negative states or None), each `[B, max_sequence_length,
        text_dim]` in the text encoder's dtype, zero past each prompt's tokens, as
        diffusers' `WanPipeline.encode_prompt` (negative: "" by default; None without
        guidance; diffusers' `encode_prompt` defaults to 226 tokens, its call to 512, as
        here). Raises ValueError / TypeError naming a bad argument."""
        prompts = check_prompt(prompt)
        negatives = _check_negative(negative_prompt, len(prompts))
        self._check_max_len(max_sequence_length)
        b, pad = len(prompts), -len(prompts) % len(self.devices)
        txt = self._encode_padded(prompts + prompts[-1:] * pad, max_sequence_length)[:b]
        if not do_classifier_free_guidance:
            return txt, None
        neg = self._encode_padded(negatives + negatives[-1:] * pad, max_sequence_length)
        return txt, neg[:b]

    def _check_max_len(self, max_sequence_length) -> None:
        check_int("max_sequence_length", max_sequence_length, 1, self.config.text_len)

    def _encode_padded(self, prompts: list[str], max_sequence_length: int):
        # `prompts` divides over the devices.
        ids = np.asarray(self.tokenizer([clean_prompt(p) for p in prompts],
                                        max_length=max_sequence_length), np.int32)
        # Every row ends with the end token: the real length runs to the last non-pad id.
        real = ids != self.tokenizer.pad_id
        lengths = np.where(real.any(1), ids.shape[1] - np.argmax(real[:, ::-1], 1), 0)
        shard = NamedSharding(self.mesh, P("batch"))
        return self._run("encode", self._states["t5"], jax.device_put(ids, shard),
                         jax.device_put(lengths.astype(np.int32), shard))

    # ------------------------------------------------------------------ call
    def __call__(self, prompt: str | Sequence[str],
                 negative_prompt: str | Sequence[str] | None = None, *, height: int = 480,
                 width: int = 832, num_frames: int = 81, num_inference_steps: int = 50,
                 guidance_scale: float = 5.0, seed: int | Sequence[int] = 0, latents=None,
                 max_sequence_length: int = 512, dense_steps: int = 0,
                 output_type: str = "np", return_dict: bool = True,
                 progress: Callable[[int], None] | None = None) -> WanPipelineOutput | tuple:
        """Generates one video per prompt: `WanPipelineOutput(frames=...)`, or `(frames,)`
        with `return_dict=False`.

        Args:
          prompt: a string or a non-empty list of strings (the batch).
          negative_prompt: a string (for every prompt) or one per prompt; None: "" (as
            diffusers). Used only with guidance.
          height, width: frame size in pixels, multiples of 16 (the VAE's 8, then 2x2
            patches).
          num_frames: 1 + 4k frames (the VAE's temporal compression); 81 by default.
          num_inference_steps: sampling steps (default 50), each one transformer pass.
          guidance_scale: classifier-free guidance, applied when > 1 (diffusers' rule);
            any finite real number. An input of the compiled loop: changing it compiles
            nothing, unless it crosses 1 (with / without the unconditional pass).
          seed: an int (video i draws its noise from `jax.random.key(seed + i)`) or one int
            per prompt. jax.random's noise differs from torch's; pass `latents` to
            reproduce another implementation's video exactly.
          latents: initial noise `[B, 16, (num_frames - 1) / 4 + 1, height / 8, width / 8]`,
            as diffusers' `latents=` (overrides `seed`).
          max_sequence_length: umT5 tokens, in [1, 512] (default 512, as diffusers).
          dense_steps: the first steps attend densely in every layer (0 by default).
          output_type: "np" (float32 `[B, F, H, W, 3]` in [0, 1]), "pil" (per video a list
            of PIL frames) or "latent" (the final latents, float32, diffusers' layout).
          return_dict: False returns the tuple `(frames,)`.
          progress: called with the number of steps done, from the compiled loop; an
            exception it raises stops nothing inside the loop and is raised after it.
        Raises ValueError / TypeError naming the argument for anything else.
        """
        prompts = check_prompt(prompt)
        negatives = _check_negative(negative_prompt, len(prompts))
        for name, value in (("height", height), ("width", width)):
            check_int(name, value, 1, multiple=self.spatial_factor)
        _check_frames(num_frames, self.temporal_factor)
        check_int("num_inference_steps", num_inference_steps, 1)
        check_int("dense_steps", dense_steps, 0, num_inference_steps)
        self._check_max_len(max_sequence_length)
        guidance = check_real(guidance_scale)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        if not isinstance(return_dict, bool):
            raise TypeError(f"return_dict must be True or False; got {return_dict!r}")
        self._check_progress(progress)
        b, vae_s = len(prompts), self.spatial_factor // self.config.patch_size[1]
        shape = (b, self.config.in_channels, (num_frames - 1) // self.temporal_factor + 1,
                 height // vae_s, width // vae_s)
        seeds = check_seed(seed, b)
        latents = check_latents(latents, shape, f"batch, channels, (num_frames - 1)/"
                                f"{self.temporal_factor} + 1, height/{vae_s}, width/{vae_s}")
        guided = guidance > 1.0
        if not self.has_pisa:
            dense_steps = 0          # every layer is dense anyway: one compiled loop

        # Pad the batch to a multiple of the device count; extra videos are dropped.
        pad = -b % len(self.devices)
        prompts, negatives = prompts + prompts[-1:] * pad, negatives + negatives[-1:] * pad
        self.last_timings = {"compile": 0.0}

        clock = StageClock(self.last_timings)
        context = self._encode_padded(prompts, max_sequence_length)
        negative = self._encode_padded(negatives, max_sequence_length) if guided else context
        clock.lap("text_encoding")
        x, g = self._start(seeds, latents, pad, shape[1:], guidance)
        plan = jax.tree.map(jnp.asarray, self.scheduler.plan(num_inference_steps))
        out = self._run_loop(progress, "denoise", self._states["transformer"], x, context,
                             negative, g, plan, guided=guided, dense_steps=dense_steps,
                             solver=self.scheduler.solver)
        clock.lap("denoising")
        if output_type != "latent":
            out = self._run("decode", self._states["vae"], out)
        out = np.asarray(out)[:b]
        clock.lap("decoding")
        frames = to_pil(out) if output_type == "pil" else out
        return WanPipelineOutput(frames=frames) if return_dict else (frames,)


def _check_negative(negative_prompt, b: int) -> list[str]:
    """diffusers' rule: None -> "" for every prompt, a string for every prompt, or a list
    of one string per prompt."""
    if negative_prompt is None:
        return [""] * b
    if isinstance(negative_prompt, str):
        return [negative_prompt] * b
    if not isinstance(negative_prompt, (list, tuple)) or not all(
            isinstance(p, str) for p in negative_prompt):
        raise TypeError(f"negative_prompt must be None, a string or a list of strings; got "
                        f"{negative_prompt!r}")
    if len(negative_prompt) != b:
        raise ValueError(f"negative_prompt must be a string or one string per prompt ({b}); "
                         f"got {len(negative_prompt)}")
    return list(negative_prompt)


def _check_frames(num_frames, temporal_factor: int) -> None:
    check_int("num_frames", num_frames, 1)
    if (num_frames - 1) % temporal_factor:
        raise ValueError(f"num_frames must be 1 + {temporal_factor}k (the VAE compresses "
                         f"{temporal_factor} frames into one after the first), e.g. "
                         f"{(num_frames - 1) // temporal_factor * temporal_factor + 1} or "
                         f"{((num_frames - 1) // temporal_factor + 1) * temporal_factor + 1}; "
                         f"got {num_frames}")
