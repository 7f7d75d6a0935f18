"""`pisa-jax generate-video` (prompt -> animated WebP) with Wan2.1.

    pisa-jax generate-video "a red fox running in the snow" --model Wan2.1-T2V-1.3B-Diffusers \
        --out fox.webp --frames 81 --fps 16

It shows a progress bar over the steps (reported from inside the compiled loop), prints a
line of timings (load, compile, text encoding, denoising, decoding) and writes the video
as an animated WebP atomically (temporary file, then rename); with `--frames-dir DIR` it
also writes every frame as a PNG (`DIR/frame-00000.png`, ...; with `--batch N`,
`DIR/video-{i}/frame-00000.png`), each with the prompt, seed and settings in its text
chunks. With `--batch N` the videos are `out-0.webp` ... `out-{N-1}.webp`, video i from
seed `--seed + i`.

Every argument the pipeline checks (sizes, frame count, steps, umT5 tokens, guidance,
seeds, attention options, fps, output paths) is checked before anything is loaded.
Errors, out-of-memory included, are one `error:` line and exit status 1.
"""

from __future__ import annotations

import math
import os
import time

from models.checkpoint import DTYPES
from models.cli_common import (add_attention_flags, add_sampling_flags, atomic_write,
                               batch_seeds, check_output_file, check_writable, guarded,
                               pisa_settings, policy_options, step_progress, timing_line)
from models.flux.generate import check_arguments as check_common, output_names, save_png

TEMPORAL_FACTOR = 4        # Wan2.1's VAE: 1 + 4k frames (checked again by the pipeline)


def check_output(out: str, frames_dir: str | None) -> None:
    """Fails before any work when `out` is not a .webp we may write, or `frames_dir` is an
    existing file or could not be made."""
    check_output_file(out, ".webp")
    if frames_dir:
        check_writable(os.path.join(frames_dir, "x"))


def save_webp(frames, out: str, fps: float) -> None:
    """Writes PIL frames to `out` as an animated, looping WebP, atomically."""
    atomic_write(out, lambda f: frames[0].save(
        f, format="WEBP", save_all=True, append_images=list(frames[1:]),
        duration=round(1000 / fps), loop=0, quality=90))


def check_arguments(args) -> list[int]:
    """The run's seeds, after refusing (before loading) what the pipeline would refuse."""
    seeds = batch_seeds(args)
    check_common(args, args.attention, seeds)
    if args.frames < 1 or (args.frames - 1) % TEMPORAL_FACTOR:
        raise ValueError(f"--frames must be 1 + {TEMPORAL_FACTOR}k (e.g. 81); got "
                         f"{args.frames}")
    if not (math.isfinite(args.fps) and args.fps > 0):
        raise ValueError(f"--fps must be a positive number; got {args.fps}")
    check_output(args.out, args.frames_dir)
    return seeds


def run_generate_video(args) -> int:
    from models.wan.pipeline import WanPipeline, to_pil
    seeds = check_arguments(args)
    t0 = time.perf_counter()
    pipe = WanPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype],
                                       attention=args.attention, transformer=args.transformer,
                                       vae=args.vae, **policy_options(args))
    load_s = time.perf_counter() - t0
    with step_progress(args.steps, "denoising") as progress:
        videos = pipe([args.prompt] * args.batch, args.negative_prompt, height=args.height,
                      width=args.width, num_frames=args.frames,
                      num_inference_steps=args.steps, guidance_scale=args.guidance,
                      seed=seeds, max_sequence_length=args.max_sequence_length,
                      dense_steps=args.dense_steps, progress=progress).frames
    print(timing_line(load_s, pipe.last_timings, args.steps))
    settings = {"prompt": args.prompt, "negative_prompt": args.negative_prompt or "",
                "steps": args.steps, "guidance": args.guidance, "frames": args.frames,
                "fps": args.fps, "height": args.height, "width": args.width,
                "attention": args.attention, **pisa_settings(args, args.attention),
                "dense_steps": args.dense_steps,
                "model": os.path.abspath(args.model), "dtype": args.dtype,
                "software": "pisa-jax"}
    for i, (frames, seed, out) in enumerate(zip(to_pil(videos), seeds,
                                                 output_names(args.out, args.batch))):
        save_webp(frames, out, args.fps)
        print(f"wrote {out} ({len(frames)} frames at {args.fps:g} fps)")
        if args.frames_dir:
            folder = (args.frames_dir if args.batch == 1
                      else os.path.join(args.frames_dir, f"video-{i}"))
            for j, frame in enumerate(frames):
                save_png(frame, os.path.join(folder, f"frame-{j:05d}.png"),
                         settings | {"seed": seed, "frame": j})
            print(f"wrote {len(frames)} frames to {folder}")
    return 0


def _too_large(args) -> str:
    return (f"{args.batch} video(s) of {args.frames} frames at {args.height}x{args.width} "
            f"were too large for the device memory; try fewer --frames, a smaller --height "
            f"/ --width or --batch")


def _guarded(fn):
    return guarded(fn, _too_large)


def register(sub) -> None:
    """Adds the `generate-video` subcommand to an argparse subparsers object."""
    g = sub.add_parser("generate-video", help="Wan2.1 text-to-video: prompt -> animated WebP",
                       description="Generate a video from a prompt with Wan2.1 (text-to-"
                                   "video), PISA attention by default.")
    g.add_argument("prompt", help="the text prompt")
    g.add_argument("--model", required=True,
                   help="Wan2.1 pipeline folder (diffusers layout; transformer/ may be an "
                        "official or converted checkpoint)")
    g.add_argument("--out", required=True,
                   help="output animated WebP (with --batch N: OUT-0.webp ...)")
    g.add_argument("--negative-prompt", default=None,
                   help="what to steer away from with guidance (default: empty, as diffusers)")
    g.add_argument("--frames", type=int, default=81, help="frames, 1 + 4k (default 81)")
    g.add_argument("--fps", type=float, default=16.0,
                   help="frames per second of the WebP (default 16, Wan2.1's)")
    g.add_argument("--frames-dir", default=None, help="also write every frame as a PNG here")
    add_sampling_flags(g, "video")
    g.add_argument("--transformer", help="transformer file or folder replacing "
                                         "MODEL/transformer (official or converted)")
    g.add_argument("--vae", help="VAE folder replacing MODEL/vae")
    g.add_argument("--height", type=int, default=480, help="frame height in pixels, a "
                                                           "multiple of 16 (default 480)")
    g.add_argument("--width", type=int, default=832, help="frame width in pixels, a "
                                                          "multiple of 16 (default 832)")
    g.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    g.add_argument("--guidance", type=float, default=5.0,
                   help="classifier-free guidance scale, applied when > 1 (default 5.0)")
    g.add_argument("--max-sequence-length", type=int, default=512,
                   help="umT5 tokens (default 512)")
    add_attention_flags(g)
    g.set_defaults(func=_guarded(run_generate_video))
