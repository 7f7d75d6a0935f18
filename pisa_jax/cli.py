"""`pisa-jax demo`: the attention library's own command (the model commands live in
`models.cli`, which is the `pisa-jax` console script), and the argument types that every
command shares (comma-separated lists, bounded integers, writable output files)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable


def comma_list(convert: Callable, what: str, ok: Callable = lambda x: True) -> Callable:
    """An argparse `type` for comma-separated values: each converted by `convert`, all
    passing `ok`; otherwise an error quoting `what` was expected and what was given."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(convert(x) for x in text.split(","))
        except ValueError:
            values = None
        if not values or not all(ok(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values
    return parse


def int_at_least(low: int) -> Callable:
    """An argparse `type` for an integer >= `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def writable_file(path: str) -> str:
    """An argparse `type` for an output file: its folder must exist and be writable, and
    the path must not be a folder. Checked when the arguments are parsed, before any work."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is a folder, expected a file name")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {path}: no folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path)
                                                    and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {path}: permission denied")
    return path


def register(sub) -> argparse.ArgumentParser:
    """Adds the `demo` subcommand to an argparse subparsers object."""
    demo = sub.add_parser(
        "demo", help="compare dense, PISA and keep-or-drop attention",
        description="Compare dense, PISA (orders 1 and 0) and keep-or-drop attention on a "
                    "structured problem: relative error against dense attention and time "
                    "per call.")
    demo.add_argument("--side", type=int_at_least(8), default=48,
                      help="latent grid side, at least 8 (T = side^2 tokens; default 48)")
    demo.add_argument("--heads", type=int_at_least(1), default=4,
                      help="attention heads (default 4)")
    demo.add_argument("--head-dim", type=int, default=64, choices=(64, 128),
                      help="head dim D (default 64)")
    demo.add_argument("--densities", default=(0.1, 0.15, 0.25, 0.5),
                      type=comma_list(float, "comma-separated numbers in (0, 1]",
                                      lambda d: 0 < d <= 1),
                      help="fractions of key blocks computed exactly, comma-separated "
                           "(default 0.1,0.15,0.25,0.5)")
    demo.add_argument("--seed", type=int_at_least(0), default=0,
                      help="seed of the random problem, >= 0 (default 0)")
    demo.add_argument("--plot", metavar="PNG", type=writable_file,
                      help="also save error vs density as a PNG (needs matplotlib)")
    demo.set_defaults(func=run_demo)
    return demo


def run_demo(args) -> int:
    from pisa_jax import demo as demo_mod
    if args.plot:
        demo_mod.check_plotting()          # before the work, not after it
    rows = demo_mod.run(side=args.side, heads=args.heads, head_dim=args.head_dim,
                        densities=args.densities, seed=args.seed)
    if args.plot:
        demo_mod.plot(rows, args.plot)
        print(f"\nwrote {args.plot}")
    return 0


def add_version(parser: argparse.ArgumentParser) -> None:
    from pisa_jax import __version__
    parser.add_argument("--version", action="version", version=f"pisa-jax {__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pisa_jax.cli")
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
