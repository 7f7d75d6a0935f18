"""FLUX.1-dev text-to-image end to end: our pipeline (dense, PISA) against diffusers'.

    python benchmarks/pipeline.py [--sizes 1024,2048] [--steps 50] [--out pipeline.json]
        [--no-diffusers] [--tiny]

Random bf16 weights are drawn once in PyTorch (diffusers' FluxTransformer2DModel and
AutoencoderKL, transformers' CLIP-L and T5-XXL encoders, FLUX.1-dev's sizes) and shared:
the transformer is copied into the Flax model through the converter's diffusers mapping
(as benchmarks/flux.py does), the encoders and the VAE go through a temporary folder and
our loaders. The tokenizers are the small ones of tests/fixtures/tokenizers (their ids
are valid for the full vocabularies; tokenizing takes no measurable time either way).

Measured, per image size: diffusers' FluxPipeline and ours (dense: every layer, every
step; PISA: the published setting, first 4 layers dense, density 0.15) end to end with
the same initial `latents`, 3.5 guidance, 512 T5 tokens; for ours the first call
(compile included) and the second (no compile) split into text encoding, denoising and
decoding. Each part alone against diffusers': T5 at 512 tokens, CLIP, VAE decode (with
its peak memory beyond the weights). Images per second with a batch of 2 on one and on
two GPUs (PISA, first size) when two are visible.

`--steps N` (< 50) runs N steps and extrapolates to 50 with the measured per-step time:
`text encoding + decoding + 50 * denoising / N` (for diffusers, the per-step time is its
total minus its measured parts, over N). `--tiny` runs a tiny random model on any device
(no torch, no diffusers), to check the script.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # share the GPU with torch

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.attention import timeit  # noqa: E402
from benchmarks.flux import diffusers_model, torch_median_ms  # noqa: E402
from models.flux import FLUX_DEV, Flux, FluxConfig, default_policies  # noqa: E402
from models.flux.autoencoder import AutoEncoder, AutoEncoderConfig  # noqa: E402
from models.flux.pipeline import FluxPipeline  # noqa: E402
from models.text_encoders import CLIPTextConfig, CLIPTextModel, T5Config, T5Encoder  # noqa: E402
from models.text_encoders.tokenizers import CLIPTokenizer, T5Tokenizer  # noqa: E402
from pisa_jax.cli import comma_list, int_at_least  # noqa: E402
from pisa_jax.metrics import relative_error  # noqa: E402

TOKENIZERS = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tokenizers")
PROMPT = "A photograph of a red fox sitting in the snow, soft morning light."
GUIDANCE, T5_TOKENS, REFERENCE_STEPS = 3.5, 512, 50


# --------------------------------------------------------------------- weights

def tiny_components(seed: int = 0):
    """Tiny random JAX modules (FLUX structure), for --tiny."""
    rngs = nnx.Rngs(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2),
                         rngs=rngs, dtype=jnp.float32)
    t5 = T5Encoder(T5Config(vocab_size=1000, d_model=24, d_kv=8, d_ff=32, num_layers=2,
                            num_heads=3), rngs=rngs, dtype=jnp.float32)
    cfg = FluxConfig(vec_in_dim=16, context_in_dim=24, hidden_size=32, num_heads=2, depth=2,
                     depth_single_blocks=2, axes_dim=(4, 6, 6))
    flux = Flux(cfg, rngs=rngs, dtype=jnp.float32,
                policies=default_policies(cfg, "pisa", dense_layers=1, density=0.5))
    vae = AutoEncoder(AutoEncoderConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                                        norm_num_groups=4), rngs=rngs, dtype=jnp.float32)
    return flux, clip, t5, vae


def torch_components():
    """diffusers' and transformers' full-size FLUX.1-dev modules, random bf16 on the GPU."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig as HFCLIP, CLIPTextModel as HFCLIPModel
    from transformers import T5Config as HFT5, T5EncoderModel
    transformer = diffusers_model()
    torch.manual_seed(1)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        clip = HFCLIPModel(HFCLIP(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                  num_hidden_layers=12, num_attention_heads=12,
                                  max_position_embeddings=77, hidden_act="quick_gelu",
                                  eos_token_id=2, projection_dim=768))
        t5 = T5EncoderModel(HFT5(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                                 num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                                 is_encoder_decoder=False, use_cache=False))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            scaling_factor=0.3611, shift_factor=0.1159,
                            use_quant_conv=False, use_post_quant_conv=False)
    torch.set_default_dtype(torch.float32)
    return transformer, clip.eval(), t5.eval(), vae.eval()


def jax_from_torch(transformer, clip, t5, vae, workdir: str):
    """Our modules with the torch modules' weights (transformer in memory, the rest
    through `save_pretrained` and our loaders)."""
    from models.flux.autoencoder import load_autoencoder
    from models.flux.convert import iter_diffusers_state, model_from_tensors
    from models.text_encoders import load_clip, load_t5
    for name, module in (("text_encoder", clip), ("text_encoder_2", t5), ("vae", vae)):
        module.save_pretrained(os.path.join(workdir, name))
    to_array = lambda x: jnp.array(jax.dlpack.from_dlpack(x.detach().contiguous()), copy=True)
    flux = model_from_tensors(FLUX_DEV, iter_diffusers_state(
        transformer.state_dict(), FLUX_DEV, dtype=jnp.bfloat16, to_array=to_array),
        dtype=jnp.bfloat16, policies=default_policies(FLUX_DEV, "pisa"))
    return (flux, load_clip(os.path.join(workdir, "text_encoder"), dtype=jnp.bfloat16),
            load_t5(os.path.join(workdir, "text_encoder_2"), dtype=jnp.bfloat16),
            load_autoencoder(os.path.join(workdir, "vae"), dtype=jnp.bfloat16))


# ------------------------------------------------------------------------ parts

def jax_parts(clip, t5, vae, sizes, t5_tokens: int) -> dict:
    """Median ms of T5, CLIP and VAE decode alone (jitted), with the decoder's memory."""
    out = {}
    for name, module, shape in (("t5", t5, (1, t5_tokens)), ("clip", clip, (1, 77))):
        graph, state = nnx.split(module)
        fn = jax.jit(lambda s, ids, g=graph: nnx.merge(g, s)(ids))
        ids = jnp.ones(shape, jnp.int32)
        out[name] = {"ours_ms": 1e3 * timeit(fn, state, ids)}
    graph, state = nnx.split(vae)
    decode = jax.jit(lambda s, z: nnx.merge(graph, s).decode(z))
    f = vae.config.downsample_factor
    for size in sizes:
        z = jax.random.normal(jax.random.key(0), (1, size // f, size // f,
                                                  vae.config.latent_channels), vae.dtype)
        mem = decode.lower(state, z).compile().memory_analysis()
        out[f"vae_decode_{size}"] = {
            "ours_ms": 1e3 * timeit(decode, state, z),
            "ours_peak_extra_gib": (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**30}
    return out


def torch_parts(clip, t5, vae, sizes, t5_tokens: int) -> dict:
    import torch
    out = {}
    with torch.no_grad():
        for name, module, shape in (("t5", t5, (1, t5_tokens)), ("clip", clip, (1, 77))):
            ids = torch.ones(shape, dtype=torch.long, device="cuda")
            out[name] = {"diffusers_ms": torch_median_ms(lambda: module(ids))}
        for size in sizes:
            z = torch.randn((1, 16, size // 8, size // 8), device="cuda", dtype=torch.bfloat16)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            ms = torch_median_ms(lambda: vae.decode(z).sample)
            out[f"vae_decode_{size}"] = {
                "diffusers_ms": ms,
                "diffusers_peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}
    return out


# ------------------------------------------------------------------ end to end

def extrapolate(r: dict, steps: int) -> None:
    r["per_step_ms"] = 1e3 * r["denoising_s"] / steps
    r[f"est_total_s_at_{REFERENCE_STEPS}"] = (r["text_encoding_s"] + r["decoding_s"]
                                              + REFERENCE_STEPS * r["denoising_s"] / steps)


def ours_end_to_end(pipe, prompts, size, steps, dense_steps, latents, max_len) -> tuple:
    r, images = {}, None
    for call in ("first", "second"):
        t0 = time.perf_counter()
        images = pipe(prompts, height=size, width=size, num_inference_steps=steps,
                      guidance_scale=GUIDANCE, latents=latents, max_sequence_length=max_len,
                      dense_steps=dense_steps, output_type="np").images
        r[f"{call}_call_s"] = time.perf_counter() - t0
        r[f"{call}_call_compile_s"] = pipe.last_timings["compile"]
    for k in ("text_encoding", "denoising", "decoding"):
        r[f"{k}_s"] = pipe.last_timings[k]
    extrapolate(r, steps)
    return r, images


def diffusers_end_to_end(pipe, size, steps, latents, parts) -> tuple:
    import torch
    kwargs = dict(prompt=PROMPT, height=size, width=size, num_inference_steps=steps,
                  guidance_scale=GUIDANCE, max_sequence_length=T5_TOKENS,
                  latents=torch.from_numpy(latents).cuda().to(torch.bfloat16),
                  output_type="np")
    with torch.no_grad():
        pipe(**kwargs)                                   # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        images = pipe(**kwargs).images
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
    text = (parts["t5"]["diffusers_ms"] + parts["clip"]["diffusers_ms"]) / 1e3
    decode = parts[f"vae_decode_{size}"]["diffusers_ms"] / 1e3
    r = {"second_call_s": total, "text_encoding_s": text, "decoding_s": decode,
         "denoising_s": total - text - decode}
    extrapolate(r, steps)
    return r, images


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=comma_list(int, "comma-separated positive multiples of 16",
                                              lambda s: s > 0 and s % 16 == 0),
                   help="image sides in pixels (default 1024,2048; --tiny: 64,128)")
    p.add_argument("--steps", type=int_at_least(1), default=None,
                   help=f"sampling steps (default {REFERENCE_STEPS}; --tiny: 2); fewer are "
                        f"extrapolated to {REFERENCE_STEPS}")
    p.add_argument("--out", default="pipeline.json", help="JSON file to write")
    p.add_argument("--no-diffusers", action="store_true",
                   help="skip diffusers' timings (its modules still draw the weights)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny random model on any device, no torch or diffusers")
    args = p.parse_args(argv)
    sizes = list(args.sizes or ((64, 128) if args.tiny else (1024, 2048)))
    steps = args.steps if args.steps is not None else (2 if args.tiny else REFERENCE_STEPS)
    results = {"device": jax.devices()[0].device_kind, "devices": len(jax.devices()),
               "jax": jax.__version__, "tiny": args.tiny, "steps": steps, "sizes": {}}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    tokenizers = (CLIPTokenizer.from_folder(os.path.join(TOKENIZERS, "clip")),
                  T5Tokenizer.from_folder(os.path.join(TOKENIZERS, "t5_json")))
    max_len = 16 if args.tiny else T5_TOKENS
    ref_images, parts = {}, {}
    if args.tiny:
        flux, clip, t5, vae = tiny_components()
    else:
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline as DiffusersFlux
        from transformers import CLIPTokenizer as HFCLIPTok, T5TokenizerFast
        modules = torch_components()
        workdir = tempfile.mkdtemp(prefix="pipeline-bench-")
        try:
            flux, clip, t5, vae = jax_from_torch(*modules, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if not args.no_diffusers:
            parts = torch_parts(*modules[1:], sizes, T5_TOKENS)
            dpipe = DiffusersFlux(
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                vae=modules[3], text_encoder=modules[1], text_encoder_2=modules[2],
                tokenizer=HFCLIPTok.from_pretrained(os.path.join(TOKENIZERS, "clip")),
                tokenizer_2=T5TokenizerFast.from_pretrained(os.path.join(TOKENIZERS, "t5_json")),
                transformer=modules[0])
            for size in sizes:
                lat = latents_for(size, flux.config.in_channels, 1)
                r, ref_images[size] = diffusers_end_to_end(dpipe, size, steps, lat, parts)
                results["sizes"].setdefault(str(size), {})["diffusers"] = r
                print(f"{size}: diffusers {r['second_call_s']:.2f} s", flush=True)
            del dpipe
        del modules
        torch.cuda.empty_cache()
    for name, r in jax_parts(clip, t5, vae, sizes, max_len).items():
        parts[name] = parts.get(name, {}) | r
    results["parts"] = parts
    save()

    pipe = FluxPipeline(flux, clip, t5, vae, *tokenizers, devices=jax.devices()[:1])
    for size in sizes:
        r = results["sizes"].setdefault(str(size), {})
        lat = latents_for(size, flux.config.in_channels, 1)
        images = {}
        for mode, dense_steps in (("dense", steps), ("pisa", 0)):
            r[mode], images[mode] = ours_end_to_end(pipe, [PROMPT], size, steps, dense_steps,
                                                    lat, max_len)
            print(f"{size}: ours {mode} {r[mode]['second_call_s']:.2f} s (first call "
                  f"{r[mode]['first_call_s']:.1f} s, compile "
                  f"{r[mode]['first_call_compile_s']:.1f} s)", flush=True)
        r["pisa_speedup_over_dense"] = r["dense"]["second_call_s"] / r["pisa"]["second_call_s"]
        r["pisa_vs_dense_image_rel"] = relative_error(images["pisa"], images["dense"])
        if size in ref_images:
            r["dense_vs_diffusers_image_rel"] = relative_error(images["dense"], ref_images[size])
            key = f"est_total_s_at_{REFERENCE_STEPS}"
            r["dense_time_over_diffusers"] = r["dense"][key] / r["diffusers"][key]
            r["pisa_speedup_over_diffusers"] = r["diffusers"][key] / r["pisa"][key]
        save()

    if len(jax.devices()) >= 2:
        size, rate = sizes[0], {}
        lat = latents_for(size, flux.config.in_channels, 2)
        for n in (1, 2):
            pipe_n = pipe if n == 1 else FluxPipeline(flux, clip, t5, vae, *tokenizers,
                                                      devices=jax.devices()[:2])
            r, _ = ours_end_to_end(pipe_n, [PROMPT] * 2, size, steps, 0, lat, max_len)
            rate[f"{n}_devices_images_per_s"] = 2 / r["second_call_s"]
            rate[f"{n}_devices_stages_s"] = {k: r[f"{k}_s"] for k in
                                             ("second_call", "text_encoding", "denoising",
                                              "decoding")}
            print(f"{n} device(s), batch 2: {rate[f'{n}_devices_images_per_s']:.3f} "
                  f"images/s", flush=True)
        rate["scaling"] = rate["2_devices_images_per_s"] / rate["1_devices_images_per_s"]
        results["multi_device"] = {"size": size, "batch": 2, **rate}
        save()
    print(json.dumps(results, indent=1))


def latents_for(size: int, channels: int, batch: int) -> np.ndarray:
    rng = np.random.default_rng(size)
    return rng.standard_normal((batch, (size // 16) ** 2, channels)).astype(np.float32)


if __name__ == "__main__":
    main()
