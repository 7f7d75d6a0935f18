"""`pisa-jax generate` (prompt -> PNG) and `pisa-jax compare` (dense vs PISA, side by side).

    pisa-jax generate "a red fox in the snow" --model FLUX.1-dev --out fox.png
    pisa-jax compare "a red fox" "a lighthouse" --model FLUX.1-dev --out grid.png --seeds 0,1

`generate` shows a progress bar over the steps (reported from inside the compiled loop
through `jax.debug.callback`), prints a line of timings (load, compile, text encoding,
denoising, decoding) and writes the PNG atomically, with the prompt, seed, steps,
guidance, attention settings and model in its text chunks. With `--batch N` it writes
`out-0.png` ... `out-{N-1}.png`, image i from seed `--seed + i`.

Every argument the pipeline checks (sizes, step counts, T5 tokens, guidance, seeds,
attention options) is checked before anything is loaded. Errors, out-of-memory included,
are one `error:` line and exit status 1.

`compare` runs every prompt and seed twice with one pipeline: dense (every layer, every
step) and PISA, and saves a grid (one row per prompt and seed; columns dense | PISA |
4 x |PISA - dense|). It prints the PSNR and SSIM of each PISA image against its dense one
and their means. SSIM is the usual one (Wang et al. 2004): 11x11 Gaussian window with
sigma 1.5, K1 = 0.01, K2 = 0.03, images in [0, 1], valid positions only, averaged over
the color channels.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import numpy as np

from models.checkpoint import DTYPES
from models.cli_common import (add_attention_flags, add_sampling_flags, atomic_write,
                               batch_seeds, check_output_file, guarded, pisa_settings,
                               policy_options, step_progress, timing_line)


# ----------------------------------------------------------------- image metrics

def psnr(x: np.ndarray, ref: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (inf for identical images)."""
    mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1D Gaussian weights; the 2D window is their outer product."""
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filter(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable valid-mode weighted sum over the first two axes of `[H, W, C]`."""
    k = len(g)
    rows = sum(g[i] * img[i:img.shape[0] - k + 1 + i] for i in range(k))
    return sum(g[j] * rows[:, j:rows.shape[1] - k + 1 + j] for j in range(k))


def ssim(x: np.ndarray, ref: np.ndarray, *, size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03, data_range: float = 1.0) -> float:
    """Mean structural similarity of two `[H, W]` or `[H, W, C]` images (1 when equal).

    Raises ValueError for different shapes or images smaller than the window.
    """
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"images must have the same shape; got {x.shape} and {ref.shape}")
    if x.ndim == 2:
        x, ref = x[..., None], ref[..., None]
    if x.ndim != 3 or min(x.shape[:2]) < size:
        raise ValueError(f"images must be [H, W] or [H, W, C] with H, W >= {size}; got "
                         f"{x.shape}")
    g = gaussian_window(size, sigma)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mx, my = _filter(x, g), _filter(ref, g)
    vx = _filter(x * x, g) - mx * mx
    vy = _filter(ref * ref, g) - my * my
    cov = _filter(x * ref, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


# -------------------------------------------------------------------- writing

def save_png(image, out: str, text: dict[str, str]) -> None:
    """Writes a PIL image to `out` with PNG text chunks, atomically (temp file, rename)."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, str(v))
    atomic_write(out, lambda f: image.save(f, format="PNG", pnginfo=info))


def output_names(out: str, n: int) -> list[str]:
    if n == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}-{i}{ext}" for i in range(n)]


# ------------------------------------------------------------------- commands

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="FLUX.1 pipeline folder (diffusers layout; transformer/ may be a "
                        "converted checkpoint)")
    p.add_argument("--transformer", help="transformer file or folder replacing "
                                         "MODEL/transformer (e.g. flux1-dev.safetensors)")
    p.add_argument("--vae", help="autoencoder file or folder replacing MODEL/vae "
                                 "(e.g. ae.safetensors)")
    p.add_argument("--height", type=int, default=1024, help="image height in pixels, a "
                                                            "multiple of 16 (default 1024)")
    p.add_argument("--width", type=int, default=1024, help="image width in pixels, a "
                                                           "multiple of 16 (default 1024)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default 50 for dev, 4 for schnell)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale for dev (default 3.5; schnell ignores it)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens (default 512 for dev, 256 for schnell)")
    add_attention_flags(p)


def check_arguments(args, attention: str, seeds: list[int]) -> None:
    """Fails before any work for arguments the pipeline would refuse after loading, or that
    would do nothing; `seeds` are the run's noise seeds."""
    from models.flux.pipeline_checks import check_arguments as check
    if attention == "dense":
        given = [f"--{k.replace('_', '-')} {v}" for k, v in (
            ("density", args.density), ("block_size", args.block_size),
            ("dense_layers", args.dense_layers), ("dense_steps", args.dense_steps or None))
            if v is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} would do nothing with --attention dense "
                             f"(every layer dense); drop {'them' if len(given) > 1 else 'it'} "
                             f"or use --attention pisa")
    if args.density is not None and not 0.0 < args.density <= 1.0:   # also refuses nan
        raise ValueError(f"--density must be in (0, 1]; got {args.density}")
    if args.dense_layers is not None and args.dense_layers < 0:
        raise ValueError(f"--dense-layers must be >= 0; got {args.dense_layers}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1; got {args.steps}")
    if args.dense_steps < 0 or (args.steps is not None and args.dense_steps > args.steps):
        bound = "" if args.steps is None else f" and <= --steps ({args.steps})"
        raise ValueError(f"--dense-steps must be >= 0{bound}; got {args.dense_steps}")
    bad = [s for s in seeds if not 0 <= s < 2**32]
    if bad:
        flag = "--seeds" if hasattr(args, "seeds") else "--seed (and --batch)"
        raise ValueError(f"{flag}: seeds must be in [0, 2**32); got {bad[:3]}"
                         + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))
    try:
        check(height=args.height, width=args.width, max_sequence_length=args.max_sequence_length,
              guidance_scale=args.guidance)
    except (TypeError, ValueError) as e:   # the flag's name, not the keyword's
        for key, flag in (("max_sequence_length", "--max-sequence-length"),
                          ("guidance_scale", "--guidance"), ("height", "--height"),
                          ("width", "--width")):
            if str(e).startswith(key):
                raise ValueError(flag + str(e)[len(key):]) from None
        raise


def _default_steps(args, pipe) -> int:
    return args.steps if args.steps is not None else (50 if pipe.is_dev else 4)


def _load(args, attention: str):
    import time
    from models.flux.pipeline import FluxPipeline
    # check_arguments refused the PISA flags (--density, --block-size, --dense-layers,
    # --dense-steps) with dense attention.
    t0 = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype],
                                        attention=attention, transformer=args.transformer,
                                        vae=args.vae, **policy_options(args))
    return pipe, time.perf_counter() - t0


def _generate(pipe, prompts, seeds, args, *, dense_steps, desc):
    steps = _default_steps(args, pipe)
    with step_progress(steps, desc) as progress:
        images = pipe(prompts, height=args.height, width=args.width, num_inference_steps=steps,
                      guidance_scale=args.guidance, seed=seeds,
                      max_sequence_length=args.max_sequence_length,
                      dense_steps=dense_steps, output_type="np", progress=progress).images
    return images, steps


def run_generate(args) -> int:
    from models.flux.pipeline import to_pil
    check_output_file(args.out, ".png")
    seeds = batch_seeds(args)
    check_arguments(args, args.attention, seeds)
    pipe, load_s = _load(args, args.attention)
    images, steps = _generate(pipe, [args.prompt] * args.batch, seeds, args,
                              dense_steps=args.dense_steps, desc="denoising")
    print(timing_line(load_s, pipe.last_timings, steps))
    for image, seed, out in zip(to_pil(images), seeds, output_names(args.out, args.batch)):
        save_png(image, out, {
            "prompt": args.prompt, "seed": seed, "steps": steps,
            "guidance": (args.guidance if args.guidance is not None else 3.5)
            if pipe.is_dev else "none (schnell)",
            "height": args.height, "width": args.width, "attention": args.attention,
            **pisa_settings(args, args.attention), "dense_steps": args.dense_steps,
            "model": os.path.abspath(args.model),
            "transformer": args.transformer or "", "dtype": args.dtype,
            "variant": "dev" if pipe.is_dev else "schnell", "software": "pisa-jax"})
        print(f"wrote {out}")
    return 0


def run_compare(args) -> int:
    check_output_file(args.out, ".png")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") \
            from None
    check_arguments(args, "pisa", seeds)
    pipe, load_s = _load(args, "pisa")
    prompts = [p for p in args.prompts for _ in seeds]
    all_seeds = [s for _ in args.prompts for s in seeds]
    steps = _default_steps(args, pipe)
    dense, _ = _generate(pipe, prompts, all_seeds, args, dense_steps=steps, desc="dense")
    print(timing_line(load_s, pipe.last_timings, steps))
    sparse, _ = _generate(pipe, prompts, all_seeds, args, dense_steps=args.dense_steps,
                          desc="PISA")
    print(timing_line(load_s, pipe.last_timings, steps))
    rows, scores = [], []
    for prompt, seed, d, s in zip(prompts, all_seeds, dense, sparse):
        scores.append((psnr(s, d), ssim(s, d)))
        print(f"seed {seed:>4}  PSNR {scores[-1][0]:6.2f} dB  SSIM {scores[-1][1]:.4f}  "
              f"{prompt}")
        rows.append(np.concatenate([d, s, np.clip(4 * np.abs(s - d), 0, 1)], axis=1))
    p_mean, s_mean = np.mean([p for p, _ in scores]), np.mean([s for _, s in scores])
    print(f"mean       PSNR {p_mean:6.2f} dB  SSIM {s_mean:.4f}  (PISA against dense, "
          f"{len(scores)} images)")
    captions = [f"seed {seed}  PSNR {p:.2f} dB  SSIM {q:.4f}  {prompt}"
                for prompt, seed, (p, q) in zip(prompts, all_seeds, scores)]
    grid = labelled_grid(rows, captions, ("dense", "PISA", "4 x |PISA - dense|"))
    save_png(grid, args.out, {
        "prompts": " | ".join(args.prompts), "seeds": args.seeds, "steps": steps,
        "columns": "dense | PISA | 4 x abs diff", "rows": "prompts x seeds",
        **pisa_settings(args, "pisa"), "dense_steps": args.dense_steps,
        "model": os.path.abspath(args.model),
        "mean_psnr": f"{p_mean:.3f}", "mean_ssim": f"{s_mean:.5f}", "software": "pisa-jax"})
    print(f"wrote {args.out}")
    return 0


def labelled_grid(rows: list[np.ndarray], captions: list[str], columns: Sequence[str]):
    """A PIL image: a header naming the columns, then each row `[H, n*W, 3]` (values in
    [0, 1], `n = len(columns)` panels side by side) under a one-line caption."""
    from PIL import Image, ImageDraw
    line = 14                                           # PIL's default bitmap font is ~11 px
    width = rows[0].shape[1]
    panel = width // len(columns)
    height = line + sum(line + r.shape[0] for r in rows)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, name in enumerate(columns):
        draw.text((i * panel + 3, 1), name, fill=(0, 0, 0))
    y = line
    for row, caption in zip(rows, captions):
        draw.text((3, y + 1), caption, fill=(0, 0, 0))
        y += line
        grid.paste(Image.fromarray((np.clip(row, 0, 1) * 255).round().astype(np.uint8)), (0, y))
        y += row.shape[0]
    return grid


def _too_large(args) -> str:
    batch = (args.batch if hasattr(args, "batch")     # generate; compare:
             else len(args.prompts) * len(args.seeds.split(",")))
    return (f"{args.height}x{args.width} images in a batch of {batch} were too large for "
            f"the device memory; try a smaller --height / --width or batch")


def _guarded(fn):
    return guarded(fn, _too_large)


def register(sub) -> None:
    """Adds the `generate` and `compare` subcommands to an argparse subparsers object."""
    g = sub.add_parser("generate", help="FLUX.1 text-to-image: prompt -> PNG",
                       description="Generate an image from a prompt with FLUX.1 (dev or "
                                   "schnell), PISA attention by default.")
    g.add_argument("prompt", help="the text prompt")
    g.add_argument("--out", required=True, help="output PNG (with --batch N: OUT-0.png ...)")
    add_sampling_flags(g, "image")
    _common(g)
    g.set_defaults(func=_guarded(run_generate))

    c = sub.add_parser("compare", help="dense vs PISA side by side, with PSNR and SSIM",
                       description="Generate the same prompts and seeds dense and with PISA; "
                                   "save a grid (dense | PISA | 4 x abs diff) and print the "
                                   "PSNR and SSIM of PISA against dense.")
    c.add_argument("prompts", nargs="+", help="one or more prompts")
    c.add_argument("--out", required=True, help="output grid PNG")
    c.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    _common(c)
    c.set_defaults(func=_guarded(run_compare))
