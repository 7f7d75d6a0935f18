"""What the `generate` and `generate-video` commands share: the sampling and attention
flags, errors as one line, the progress bar and timings line, output checks and atomic
writes."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import sys
import tempfile
import warnings
from typing import Callable, Iterator

from models.checkpoint import CheckpointError


def is_out_of_memory(e: BaseException) -> bool:
    """XLA's out-of-memory error (XlaRuntimeError / JaxRuntimeError: RESOURCE_EXHAUSTED)."""
    return (type(e).__name__ in ("XlaRuntimeError", "JaxRuntimeError")
            and "RESOURCE_EXHAUSTED" in str(e))


def first_line(e: BaseException, limit: int = 200) -> str:
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def guarded(fn: Callable, too_large: Callable[[object], str]) -> Callable:
    """`fn(args)` with bad input (CheckpointError, ValueError, TypeError) as one `error:`
    line and exit status 1, out of device memory as one line saying what was too large
    (`too_large(args)`) and what to try, and warnings as one line each. Other errors are
    raised as they are."""
    def show(message, *_, **__):
        print(f"warning: {message}", file=sys.stderr)

    def run(args) -> int:
        with warnings.catch_warnings():
            warnings.showwarning = show
            try:
                return fn(args)
            except (CheckpointError, ValueError, TypeError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            except RuntimeError as e:
                if not is_out_of_memory(e):
                    raise
                print(f"error: out of device memory: {too_large(args)} ({first_line(e)})",
                      file=sys.stderr)
                return 1
    return run


def add_attention_flags(p: argparse.ArgumentParser) -> None:
    """--density, --block-size, --dense-layers, --dense-steps and --dtype (defaults: the
    published setting, no dense steps, bf16)."""
    p.add_argument("--density", type=float, default=None,
                   help="PISA density, the fraction of key blocks computed exactly "
                        "(default 0.15, the published setting)")
    p.add_argument("--block-size", type=int, choices=(64, 128), default=None,
                   help="PISA block size in tokens (default 64, the published setting; 128 "
                        "selects coarser blocks and runs faster on Hopper GPUs)")
    p.add_argument("--dense-layers", type=int, default=None,
                   help="first attention layers kept dense in every step (default 4, the "
                        "published setting)")
    p.add_argument("--dense-steps", type=int, default=0,
                   help="first sampling steps run dense in every layer (default 0)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"),
                   help="parameter and compute dtype (default bf16)")


def add_sampling_flags(p: argparse.ArgumentParser, item: str) -> None:
    """--seed, --batch and --attention of a generating command; `item` names what one seed
    makes ("image", "video")."""
    p.add_argument("--seed", type=int, default=0, help=f"noise seed of the first {item} "
                                                       "(default 0)")
    p.add_argument("--batch", type=int, default=1,
                   help=f"{item}s of the prompt, seeds SEED, SEED+1, ... (default 1); split "
                        "over the visible devices")
    p.add_argument("--attention", choices=("pisa", "dense"), default="pisa",
                   help="pisa: the published setting (first 4 layers dense); dense: all "
                        "layers dense (default pisa)")


def batch_seeds(args) -> list[int]:
    """The seeds of `--seed` and `--batch`: SEED, SEED+1, ...; refuses a batch below 1."""
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1; got {args.batch}")
    return [args.seed + i for i in range(args.batch)]


@functools.cache
def pisa_flags() -> tuple[tuple[str, object], ...]:
    """(option, default) of the PISA flags, the defaults read from pisa_jax itself."""
    import inspect
    from pisa_jax.nn import AttentionPolicy, layer_policies
    fields = {f.name: f.default for f in dataclasses.fields(AttentionPolicy)}
    dense_layers = inspect.signature(layer_policies).parameters["dense_layers"].default
    return (("density", fields["density"]), ("block_size", fields["block_size"]),
            ("dense_layers", dense_layers))


def policy_options(args) -> dict:
    """The PISA options given on the command line (--density, --block-size,
    --dense-layers)."""
    return {k: getattr(args, k) for k, _ in pisa_flags() if getattr(args, k) is not None}


def pisa_settings(args, attention: str) -> dict:
    """The PISA options in effect (given or default), as written into the outputs'
    metadata; "n/a" for each with dense attention."""
    return {k: (getattr(args, k) if getattr(args, k) is not None else default)
            if attention == "pisa" else "n/a" for k, default in pisa_flags()}


# ------------------------------------------------------------------ progress, timings

@contextlib.contextmanager
def step_progress(steps: int, desc: str) -> Iterator[Callable[[int], None]]:
    """Yields a pipeline `progress` callback driving a tqdm bar over `steps` steps. The bar
    opens at the first step, so compiling is not counted in, and closes at the last one
    (before decoding) or when the block ends."""
    from tqdm import tqdm
    bars = []

    def progress(done: int) -> None:
        if not bars:
            bars.append(tqdm(total=steps, desc=desc, unit="step"))
        bars[0].update(done - bars[0].n)
        if done == steps:
            bars[0].close()
    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()


def timing_line(load_s: float, timings: dict, steps: int) -> str:
    """One line: load, compile, text encoding, denoising (and per step) and decoding."""
    return (f"timings: load {load_s:.1f} s, compile {timings['compile']:.1f} s, text encoding "
            f"{timings['text_encoding']:.2f} s, denoising {timings['denoising']:.2f} s "
            f"({timings['denoising'] / steps:.3f} s/step), decoding "
            f"{timings['decoding']:.2f} s")


# --------------------------------------------------------------------------- writing

def check_writable(path: str) -> None:
    """Fails before any work when `path` could not be written: the nearest existing folder
    above it must be writable, and an existing `path` must be a writable file."""
    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: {probe} is not a folder we may write in")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"cannot write {path}: the file exists and is read-only")


def check_output_file(out: str, suffix: str) -> None:
    """Fails before any work when `--out` does not end in `suffix` (".png"), is a folder, or
    could not be written."""
    if not out.lower().endswith(suffix):
        raise ValueError(f"--out must end in {suffix}; got {out}")
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder; give a file name ending in {suffix}")
    check_writable(out)


def atomic_write(out: str, write: Callable) -> None:
    """`write(f)` into a temporary file beside `out`, renamed to `out` when it succeeds and
    removed when it fails, so `out` is either complete or as it was. The file gets the
    permissions the umask gives, like any file the user makes."""
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(out)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
