"""The `pisa-jax` command: `demo` (attention only), `convert` (FLUX weights), and the
commands of the models. Each subcommand registers its own parser, with its own help."""

from __future__ import annotations

import argparse
import sys

from pisa_jax import cli as attention_cli


def build_parser() -> argparse.ArgumentParser:
    from models.flux import convert, generate
    from models.wan import generate as wan_generate
    parser = argparse.ArgumentParser(
        prog="pisa-jax", description="Piecewise sparse attention (PISA) for diffusion "
                                     "transformers in JAX.")
    attention_cli.add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    attention_cli.register(sub)
    convert.register(sub)
    generate.register(sub)
    wan_generate.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
