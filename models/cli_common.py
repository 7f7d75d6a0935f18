"""What the `generate` and `generate-video` commands share: the attention flags, errors
as one line."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Callable

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
    """--density, --dense-layers, --dense-steps and --dtype (defaults: the published
    setting, no dense steps, bf16)."""
    p.add_argument("--density", type=float, default=None,
                   help="PISA density, the fraction of key blocks computed exactly "
                        "(default 0.15, the published setting)")
    p.add_argument("--dense-layers", type=int, default=None,
                   help="first attention layers kept dense in every step (default 4, the "
                        "published setting)")
    p.add_argument("--dense-steps", type=int, default=0,
                   help="first sampling steps run dense in every layer (default 0)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"),
                   help="parameter and compute dtype (default bf16)")
