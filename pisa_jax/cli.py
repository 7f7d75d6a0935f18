"""`pisa-jax demo`: the attention library's own command (the model commands live in
`models.cli`, which is the `pisa-jax` console script)."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> argparse.ArgumentParser:
    """Adds the `demo` subcommand to an argparse subparsers object."""
    demo = sub.add_parser("demo", help="compare dense, PISA and keep-or-drop attention",
                          description="Compare dense, PISA and keep-or-drop attention on a "
                                      "structured problem.")
    demo.add_argument("--side", type=int, default=48, help="latent grid side (T = side^2)")
    demo.add_argument("--heads", type=int, default=4)
    demo.add_argument("--head-dim", type=int, default=64, choices=(64, 128))
    demo.add_argument("--densities", default="0.1,0.15,0.25,0.5")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plot", metavar="PNG", help="also save error vs density as a PNG")
    demo.set_defaults(func=lambda args: run_demo(args, demo))
    return demo


def run_demo(args, parser: argparse.ArgumentParser) -> int:
    try:
        densities = tuple(float(x) for x in args.densities.split(","))
    except ValueError:
        parser.error(f"--densities: expected comma-separated numbers, got {args.densities!r}")
    if args.side < 8:
        parser.error(f"--side: expected at least 8, got {args.side}")
    if args.heads < 1:
        parser.error(f"--heads: expected at least 1, got {args.heads}")
    if not all(0 < d <= 1 for d in densities):
        parser.error(f"--densities: expected numbers in (0, 1], got {args.densities!r}")
    from pisa_jax import demo as demo_mod
    rows = demo_mod.run(side=args.side, heads=args.heads, head_dim=args.head_dim,
                        densities=densities, seed=args.seed)
    if args.plot:
        demo_mod.plot(rows, args.plot)
        print(f"\nwrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pisa_jax.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
