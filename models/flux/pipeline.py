"""FLUX.1 text-to-image in JAX: prompt -> tokens -> CLIP and T5 -> Euler sampling -> VAE.

`FluxPipeline` follows diffusers' `FluxPipeline`: the same call arguments, the same text
ids and image ids, the same packed latent layout (`latents=` accepts diffusers' tensors),
the same sigmas (`models.flux.sampling.schedule`), and the same image post-processing.
Each stage is one compiled function per shape, cached on the pipeline: the text encoders,
the whole denoising loop (a `fori_loop` over the steps) and the VAE decoder. A second
call at the same batch size, resolution and step count traces and compiles nothing.

The call returns a `FluxPipelineOutput` whose `.images` are the images, or `(images,)`
with `return_dict=False`, as diffusers' does, so `pipe(prompt).images[0]` works in both.

Where it differs from diffusers: noise comes from `jax.random` (pass `latents` for the
same image as torch gives); the latents stay float32 through the loop and the time and
the guidance are passed in float32 (diffusers rounds them to the model dtype);
`num_inference_steps` defaults to 50 on dev, the published PISA setting (diffusers: 28);
`guidance_scale` defaults to None (3.5 on dev, so schnell warns only when one is given);
`max_sequence_length` defaults to 256 on schnell (as Black Forest Labs' reference); a
size that is not a multiple of 16 is an error, not resized; there is no
`num_images_per_prompt` (repeat the prompt), `generator` (give `seed` or `latents`),
`prompt_embeds` / `pooled_prompt_embeds`, `prompt_2` or true CFG (`negative_prompt`).
A scheduler config that contradicts the weights (dynamic shifting on schnell, none on
dev) is replaced by the variant's own schedule, with a warning.

The batch is split over the pipeline's devices with `shard_map` (weights replicated,
each device running the whole loop on its share); a batch that does not divide is padded
with copies of its last image, which are dropped from the result. Finding and reading
the components is `models.flux.pipeline_loading`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

# COMPONENTS and component_paths stay importable from here, where they used to live.
from models.flux.pipeline_loading import (COMPONENTS, SchedulerConfig,  # noqa: F401
                                          component_paths, load_components,
                                          scheduler_for_variant)
from models.flux.pipeline_checks import MAX_SEQUENCE_LENGTH, check_arguments  # noqa: F401
from models.flux.sampling import image_ids, unpack_latents
from models.pipeline_common import (CompiledStages, StageClock, check_int, check_latents,
                                    check_prompt, check_real, check_seed, euler_loop)

OUTPUT_TYPES = ("pil", "np", "latent")


# ------------------------------------------------------------------------ pipeline

@dataclasses.dataclass(frozen=True)
class FluxPipelineOutput:
    """What `FluxPipeline.__call__` returns (as diffusers' `FluxPipelineOutput`): `images`
    is a list of PIL images, a float32 `[B, H, W, 3]` array or the packed latents,
    following `output_type`."""
    images: list | np.ndarray


def to_pil(images: np.ndarray) -> list:
    """float `[B, H, W, 3]` in [0, 1] -> PIL images (rounded as diffusers does)."""
    from PIL import Image
    return [Image.fromarray(x) for x in (images * 255).round().astype(np.uint8)]


class FluxPipeline(CompiledStages):
    """FLUX.1 (dev or schnell) from prompt to image; see `from_pretrained` and `__call__`.

    Args:
      transformer: a `models.flux.Flux`; dev or schnell is read from its config.
      text_encoder, text_encoder_2: the CLIP and T5 text encoders.
      vae: a `models.flux.autoencoder.AutoEncoder`.
      tokenizer, tokenizer_2: CLIP and T5 tokenizers (`tok(prompts, max_length) -> ids`).
      scheduler: a `SchedulerConfig` (default: the variant's). One whose dynamic shifting
        contradicts the variant (dev shifts with the resolution, schnell does not) is
        replaced by the variant's, with a warning.
      devices: the devices the batch is split over (default: every local device).
    """

    def __init__(self, transformer, text_encoder, text_encoder_2, vae, tokenizer,
                 tokenizer_2, *, scheduler: SchedulerConfig | None = None,
                 devices: Sequence[jax.Device] | None = None):
        self.config = transformer.config
        self.is_dev = bool(self.config.guidance_embed)
        self.scheduler = scheduler_for_variant(scheduler, self.is_dev)
        self.has_pisa = bool(transformer.block_size)
        self.vae_factor = vae.config.downsample_factor
        if self.config.in_channels != 4 * vae.config.latent_channels:
            raise ValueError(f"the transformer takes {self.config.in_channels} channels per "
                             f"token; the VAE's {vae.config.latent_channels} latent channels "
                             f"give {4 * vae.config.latent_channels}")
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self._hold(dict(transformer=transformer, clip=text_encoder, t5=text_encoder_2,
                        vae=vae), devices)
        # Built once per pipeline; `_run` lowers and compiles each once per shape.
        self._jits = {"encode": jax.jit(self._encode),
                      "noise": jax.jit(self._noise, static_argnames="shape"),
                      "denoise": jax.jit(self._denoise, static_argnames=("grid", "dense_steps")),
                      "decode": jax.jit(self._decode, static_argnames="grid")}

    # --------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | None = None, *, dtype=jnp.bfloat16,
                        attention: str = "pisa", policies=None,
                        devices: Sequence[jax.Device] | None = None,
                        transformer: str | None = None, text_encoder: str | None = None,
                        text_encoder_2: str | None = None, vae: str | None = None,
                        tokenizer: str | None = None, tokenizer_2: str | None = None,
                        **policy_options) -> "FluxPipeline":
        """Loads a FLUX.1 pipeline folder.

        `path` is a diffusers pipeline folder (`transformer/`, `text_encoder/`,
        `text_encoder_2/`, `vae/`, `tokenizer/`, `tokenizer_2/`, optionally `scheduler/`),
        or any folder with those names where `transformer/` is a converted checkpoint
        (`python -m models.flux.convert`). A keyword naming a component replaces that
        component's path: a file or folder, relative to `path` unless it exists as given
        or is absolute, e.g. `transformer="flux1-dev.safetensors", vae="ae.safetensors"`
        for Black Forest Labs' single files (`path=None` when every component is given).
        dev or schnell is read from the transformer's weights (guidance embedding).

        `attention` ("pisa": the published setting, or "dense"), `policies` (one
        `AttentionPolicy` per layer) and `policy_options` (e.g. `density=0.15`) are as in
        `models.flux.load_flux`. Raises `CheckpointError` naming a missing component and
        the path where it was looked for, or the unreadable file.
        """
        t0 = time.perf_counter()
        parts, sched = load_components(
            path, dtype=dtype, attention=attention, policies=policies,
            given=dict(transformer=transformer, text_encoder=text_encoder,
                       text_encoder_2=text_encoder_2, vae=vae, tokenizer=tokenizer,
                       tokenizer_2=tokenizer_2), **policy_options)
        pipe = cls(*parts, scheduler=sched, devices=devices)
        jax.block_until_ready(pipe._states)
        pipe.load_seconds = time.perf_counter() - t0
        return pipe

    # ---------------------------------------------------------- traced stages
    def _encode(self, clip_state, t5_state, clip_ids, t5_ids):
        self.traces["encode"] += 1

        def local(clip_state, t5_state, clip_ids, t5_ids):
            _, pooled = nnx.merge(self._graphs["clip"], clip_state)(clip_ids)
            return nnx.merge(self._graphs["t5"], t5_state)(t5_ids), pooled
        return self._per_device(local, (P(), P(), P("batch"), P("batch")),
                                (P("batch"), P("batch")))(clip_state, t5_state, clip_ids,
                                                          t5_ids)

    def _noise(self, seeds, *, shape):
        self.traces["noise"] += 1
        draw = lambda s: jax.random.normal(jax.random.key(s), shape, jnp.float32)
        return jax.vmap(draw)(seeds)

    def _denoise(self, state, img, txt, y, guidance, sigmas, *, grid, dense_steps):
        self.traces["denoise"] += 1
        ids = jnp.asarray(image_ids(*grid))

        def local(state, img, txt, y, guidance, sigmas):
            model = nnx.merge(self._graphs["transformer"], state)
            b = img.shape[0]
            img_ids = jnp.broadcast_to(ids, (b,) + ids.shape)
            txt_ids = jnp.zeros((b, txt.shape[1], 3), jnp.float32)
            g = guidance if self.is_dev else None

            def velocity(x, t, dense):
                return model(x, img_ids, txt, txt_ids, t, y, g, dense=dense)
            return euler_loop(velocity, img, sigmas, dense_steps=dense_steps,
                              on_step=self._report_step)
        b = P("batch")
        return self._per_device(local, (P(), b, b, b, b, P()), b)(state, img, txt, y,
                                                                  guidance, sigmas)

    def _decode(self, state, latents, *, grid):
        self.traces["decode"] += 1

        def local(state, latents):
            z = unpack_latents(latents, 2 * grid[0], 2 * grid[1])
            image = nnx.merge(self._graphs["vae"], state).decode(z)
            return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
        return self._per_device(local, (P(), P("batch")), P("batch"))(state, latents)

    # ------------------------------------------------------------------ call
    def encode_prompt(self, prompt: str | Sequence[str], max_sequence_length: int | None = None
                      ) -> tuple[jax.Array, jax.Array]:
        """(T5 states `[B, max_sequence_length, D_t5]`, CLIP pooled `[B, D_clip]`), in the
        model dtype, for a prompt or a non-empty list of B prompts. `max_sequence_length` is
        as in `__call__`. A batch that does not divide over the devices is padded with its
        last prompt, dropped again from the result. Raises ValueError / TypeError naming a
        bad argument."""
        prompts = check_prompt(prompt)
        max_len = self._max_len(max_sequence_length)
        check_int("max_sequence_length", max_len, 1, MAX_SEQUENCE_LENGTH)
        b, pad = len(prompts), -len(prompts) % len(self.devices)
        txt, y = self._encode_padded(prompts + prompts[-1:] * pad, max_len)
        return (txt[:b], y[:b]) if pad else (txt, y)

    def _max_len(self, max_sequence_length: int | None):
        if max_sequence_length is not None:
            return max_sequence_length
        return 512 if self.is_dev else 256

    def _encode_padded(self, prompts: list[str], max_sequence_length: int):
        # `prompts` divides over the devices.
        shard = NamedSharding(self.mesh, P("batch"))
        clip_ids = jax.device_put(np.asarray(self.tokenizer(prompts), np.int32), shard)
        t5_ids = jax.device_put(np.asarray(self.tokenizer_2(
            prompts, max_length=max_sequence_length), np.int32), shard)
        return self._run("encode", self._states["clip"], self._states["t5"], clip_ids, t5_ids)

    def __call__(self, prompt: str | Sequence[str], *, height: int = 1024, width: int = 1024,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 seed: int | Sequence[int] = 0, latents=None,
                 max_sequence_length: int | None = None, dense_steps: int = 0,
                 output_type: str = "pil", return_dict: bool = True,
                 progress: Callable[[int], None] | None = None
                 ) -> FluxPipelineOutput | tuple:
        """Generates one image per prompt: `FluxPipelineOutput(images=...)`, or `(images,)`
        with `return_dict=False`.

        Args:
          prompt: a string or a non-empty list of strings (the batch).
          height, width: image size in pixels, multiples of 16.
          num_inference_steps: Euler steps (default 50 for dev, 4 for schnell).
          guidance_scale: dev's distilled guidance (default 3.5), any finite real number
            (Python, NumPy scalar or 0-d array); schnell has none and warns when one is
            given. It is an input of the compiled loop: changing it compiles nothing.
          seed: an int (image i draws its noise from `jax.random.key(seed + i)`) or one
            int per image. jax.random's noise differs from torch's generators; pass
            `latents` to reproduce another implementation's image exactly.
          latents: initial noise `[B, (height/16)*(width/16), 64]`, packed as diffusers'
            `latents=` argument (overrides `seed`).
          max_sequence_length: T5 tokens (default 512 for dev, 256 for schnell; <= 512).
          dense_steps: the first steps attend densely in every layer (0 by default, the
            published setting); `num_inference_steps` makes the whole run dense.
          output_type: "pil" (list of PIL images), "np" (float32 `[B, H, W, 3]` in
            [0, 1]) or "latent" (the final packed latents, float32).
          return_dict: False returns the tuple `(images,)`.
          progress: called with the number of steps done, from the compiled loop; an
            exception it raises stops nothing inside the loop and is raised after it.
        Raises ValueError / TypeError naming the argument for anything else.
        """
        prompts = check_prompt(prompt)
        steps = num_inference_steps if num_inference_steps is not None else (
            50 if self.is_dev else 4)
        max_len = self._max_len(max_sequence_length)
        check_arguments(height=height, width=width, num_inference_steps=steps,
                        dense_steps=dense_steps, max_sequence_length=max_len,
                        guidance_scale=guidance_scale, multiple=2 * self.vae_factor)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        if not isinstance(return_dict, bool):
            raise TypeError(f"return_dict must be True or False; got {return_dict!r}")
        self._check_progress(progress)
        if not self.is_dev and guidance_scale is not None:
            warnings.warn("guidance_scale is ignored: FLUX.1-schnell has no guidance "
                          f"embedding (got {guidance_scale})", stacklevel=2)
        guidance = 3.5 if guidance_scale is None else check_real(guidance_scale)
        grid = (height // (2 * self.vae_factor), width // (2 * self.vae_factor))
        b, tokens = len(prompts), grid[0] * grid[1]
        shape = (b, tokens, self.config.in_channels)
        seeds = check_seed(seed, b)
        latents = check_latents(latents, shape, f"batch, (height/16)*(width/16), {shape[2]}")
        if not self.has_pisa:
            dense_steps = 0          # every layer is dense anyway: one compiled loop

        # Pad the batch to a multiple of the device count; extra images are dropped.
        n_dev = len(self.devices)
        pad = -b % n_dev
        prompts = prompts + prompts[-1:] * pad
        self.last_timings = {"compile": 0.0}

        clock = StageClock(self.last_timings)
        txt, y = self._encode_padded(prompts, max_len)
        clock.lap("text_encoding")
        img, guidance_arr = self._start(seeds, latents, pad, shape[1:], guidance)
        sigmas = jnp.asarray(self.scheduler.sigmas(steps, tokens))
        out = self._run_loop(progress, "denoise", self._states["transformer"], img, txt, y,
                             guidance_arr, sigmas, grid=grid, dense_steps=dense_steps)
        clock.lap("denoising")
        if output_type != "latent":
            out = self._run("decode", self._states["vae"], out, grid=grid)
        out = np.asarray(out)[:b]
        clock.lap("decoding")
        images = to_pil(out) if output_type == "pil" else out
        return FluxPipelineOutput(images=images) if return_dict else (images,)
